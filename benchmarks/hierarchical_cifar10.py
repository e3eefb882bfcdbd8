"""CPU benchmark: a two-level hierarchical PixelVAE on CIFAR-10 for a fixed time budget.

Trains with Lightning on the CPU for --minutes, measures training images/s (after a few
warm-up steps), then tests on a fixed random subset of the test split and prints -ELBO,
recon, the KL of each level (nats and bits per image) and both bounds in bits per dimension
(test/bpd: the ELBO; test/bpd_iwae: k importance samples). A script, not a test: see
benchmarks/README.md for a recorded run.

    python benchmarks/hierarchical_cifar10.py --data ../shared/data/cifar10_jpeg_q75.npz

--data is anything the CIFAR10 datamodule reads (a directory with the official pickles,
the tarball, an npz or an HF copy) or an npz file. The ../shared copy is JPEG-degraded
(quality 75): its bits/dim check the pipeline and are NOT CIFAR-10 results.

The model is appendix E.2's layout (z1 8x8 maps, z2 a vector, ResNet encoders/decoders,
gated PixelCNNs over pixels and over z1) at a CPU width: see --help for the sizes.
"""

import argparse
import json
import math
import os
import sys
import tempfile
from functools import partial
from pathlib import Path

import lightning as L
from cpu_bench import Throughput, start, test_subset, train_then_test
from torch.utils.data import DataLoader

from datamodules import CIFAR10
from lightning_modules import HierarchicalPixelVAE
from lightning_modules.backbone import GatedPixelCNN


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data", required=True, help="a CIFAR10 root directory or an npz file")
    p.add_argument("--minutes", type=float, default=10.0, help="training budget")
    p.add_argument("--n-test", type=int, default=500, help="test images (fixed random subset)")
    p.add_argument("--iwae-k", type=int, default=10, help="importance samples of test/bpd_iwae")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--eval-batch-size", type=int, default=50)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--kl-warmup-steps", type=int, default=500)
    p.add_argument("--latent-channels", type=int, nargs=2, default=[16, 64], metavar=("Z1", "Z2"))
    p.add_argument("--pixel-widths", type=int, nargs=3, default=[32, 48, 64])
    p.add_argument("--latent-width", type=int, default=64)
    p.add_argument("--blocks", type=int, default=1, help="residual blocks per stage")
    p.add_argument("--embed-dim", type=int, default=8)
    p.add_argument("--pixel-layers", type=int, default=3)
    p.add_argument("--pixel-channels", type=int, default=48)
    p.add_argument("--prior-layers", type=int, default=3)
    p.add_argument("--prior-channels", type=int, default=32)
    p.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
    p.add_argument("--warmup-steps", type=int, default=5, help="steps left out of images/s")
    p.add_argument("--log-every", type=float, default=60.0, help="progress line every N seconds")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    return p.parse_args(argv)


def data_root(path: str) -> tuple[str, tempfile.TemporaryDirectory | None]:
    """A directory CIFAR10 reads: the given one, or a temporary one linking an npz file."""
    p = Path(path).expanduser().resolve()
    if p.is_dir():
        return str(p), None
    if not p.is_file():
        sys.exit(f"error: {p} does not exist")
    tmp = tempfile.TemporaryDirectory(prefix="cifar_bench_")
    (Path(tmp.name) / "cifar10.npz").symlink_to(p)
    return tmp.name, tmp


def make_model(args: argparse.Namespace) -> HierarchicalPixelVAE:
    return HierarchicalPixelVAE(
        image_shape=(3, 32, 32),
        data_kind="8bit",
        latent_channels=tuple(args.latent_channels),
        latent_sizes=(8, 1),
        pixel_widths=tuple(args.pixel_widths),
        latent_width=args.latent_width,
        blocks=args.blocks,
        embed_dim=args.embed_dim,
        pixelcnn=partial(
            GatedPixelCNN,
            n_layers=args.pixel_layers,
            channels=args.pixel_channels,
            first_kernel=3,
            kernel=3,
        )
        if args.pixel_layers
        else None,
        n_prior_layers=args.prior_layers,
        prior_channels=args.prior_channels,
        lr=args.lr,
        kl_warmup_steps=args.kl_warmup_steps,
        iwae_k=args.iwae_k,
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    env = start(args.threads)  # flushes denormals, as the CLI does

    root, tmp = data_root(args.data)
    dm = CIFAR10(root=root, batch_size=args.batch_size, seed=args.seed, download=False)
    dm.setup("fit")
    dm.setup("test")
    jpeg = "jpeg" in Path(args.data).name.lower()
    print(
        f"data: {args.data}: train {len(dm.train_set)}, val {len(dm.val_set)}, "
        f"test {len(dm.test_set)}"
        + ("  [JPEG-degraded copy: bits/dim are NOT CIFAR-10 results]" if jpeg else "")
    )
    L.seed_everything(args.seed, verbose=False)
    model = make_model(args)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters; {vars(args)}", flush=True)

    keys = ("train/bpd", "train/nelbo", "train/kl/z1", "train/kl/z2", "train/kl_weight")
    meter = Throughput(args.batch_size, args.warmup_steps, args.log_every, keys)
    subset = test_subset(dm.test_set, args.n_test)
    loader = DataLoader(subset, batch_size=args.eval_batch_size)
    note = f"  testing {len(subset)} test images (fp32, k={args.iwae_k}) ..."
    print(f"\n=== training for {args.minutes:g} min ({args.precision}) ===", flush=True)
    steps, epochs, metrics, eval_s = train_then_test(
        model, dm, meter, args.minutes, args.precision, loader, note
    )

    bits = 1 / math.log(2)
    print(
        f"\ntrain {meter.images_per_s:.1f} img/s, {steps} steps, {epochs:.2f} epochs\n"
        f"test ({len(subset)} images): -ELBO {metrics['test/nelbo']:.1f} nats = "
        f"{metrics['test/bpd']:.3f} bits/dim;  IWAE (k={args.iwae_k}) "
        f"{metrics['test/bpd_iwae']:.3f} bits/dim\n"
        f"  recon {metrics['test/recon']:.1f} nats;  "
        + ";  ".join(
            f"KL {lvl} {metrics[f'test/kl/{lvl}']:.2f} nats = "
            f"{metrics[f'test/kl/{lvl}'] * bits:.2f} bits"
            for lvl in model.levels
        )
        + f"\n  (eval {eval_s:.0f} s; load average at end "
        + ", ".join(f"{x:.2f}" for x in os.getloadavg())
        + ")"
    )
    if jpeg:
        print("note: JPEG-degraded data: these bits/dim are not comparable to CIFAR-10 results")
    if args.out:
        out = {
            "args": vars(args),
            "environment": env,
            "n_params": n_params,
            "train_images_per_s": meter.images_per_s,
            "steps": steps,
            "epochs": epochs,
            "history": meter.history,
            "n_test": len(subset),
            "eval_s": eval_s,
            "metrics": metrics,
        }
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
        print(f"results written to {args.out}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
