"""CPU benchmark: VLAE on static binarized MNIST for a fixed wall-clock budget.

Trains the VLAE of Chen et al. (2017) (AF prior, local PixelCNN decoder, weight norm with
data-dependent init, Adamax 2e-3, free bits 0.01 nats/data-dim, Polyak averaging) with
Lightning, measures training images/s (after a few warm-up steps), then evaluates the
Polyak-averaged weights on a fixed random subset of the test split: -ELBO, recon, KL in nats
and bits per image (the paper's "13.3 nats = 19.2 bits" is this KL at convergence), and the
IWAE NLL with k samples. A script, not a test: see benchmarks/README.md for a recorded run.

    python benchmarks/vlae_mnist.py --data ../shared/data/binarized_mnist.npz --minutes 20

The paper's alpha = 0.998 averages over ~500 steps; a short CPU budget runs a few thousand
steps at most, so the default --polyak-decay here is 0.99 (say which you used).
"""

import argparse
import json
import math
import os
import time
from pathlib import Path

import lightning as L
from cpu_bench import SUBSET_SEED, Throughput, data_root, start, test_subset, train_then_test
from torch.utils.data import DataLoader

from callbacks import PolyakAveraging
from datamodules import BinarizedMNIST
from datamodules.binarized_mnist import STATIC_NPZ, STATIC_SIZES
from lightning_modules import VLAE
from lightning_modules.backbone import LocalPixelCNN

KEYS = ("train/nelbo", "train/recon", "train/kl/z")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data", required=True, help=f"{STATIC_NPZ} or the directory holding it")
    p.add_argument("--minutes", type=float, default=20.0, help="training budget")
    p.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    p.add_argument("--n-test", type=int, default=1000, help="test images (fixed random subset)")
    p.add_argument("--iwae-k", type=int, default=100, help="importance samples of test/nll_iwae")
    p.add_argument("--iwae-batch", type=int, default=1000, help="decoder passes per IWAE forward")
    p.add_argument("--width", type=int, default=64, help="ResNet VAE channels")
    p.add_argument("--blocks", type=int, default=2, help="residual blocks per resolution")
    p.add_argument("--flow-hidden", type=int, default=640, help="MADE hidden units")
    p.add_argument("--prior", choices=["af", "gaussian"], default="af")
    p.add_argument("--posterior", choices=["gaussian", "iaf"], default="gaussian")
    p.add_argument(
        "--decoder", choices=["pixelcnn", "factorized", "unconditional"], default="pixelcnn"
    )
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--free-bits", type=float, default=0.01, help="nats per data dim; 0 = off")
    p.add_argument("--polyak-decay", type=float, default=0.99, help="0 = no averaging")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup-steps", type=int, default=10, help="steps left out of images/s")
    p.add_argument("--log-every", type=float, default=60.0, help="progress line every N seconds")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if not 1 <= args.n_test <= STATIC_SIZES["test"]:
        p.error(f"--n-test must be in 1..{STATIC_SIZES['test']}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    env = start()

    root, tmp = data_root(args.data)
    dm = BinarizedMNIST(root=root, batch_size=args.batch_size, seed=args.seed, download=False)
    dm.setup("fit")
    print(f"data: {Path(root) / STATIC_NPZ}: train {len(dm.train_set)}, test {len(dm.test_set)}")

    L.seed_everything(args.seed, verbose=False)
    model = VLAE(
        prior=args.prior,
        posterior=args.posterior,
        pixelcnn=None if args.decoder == "factorized" else LocalPixelCNN,
        latent=args.decoder != "unconditional",
        width=args.width,
        blocks=args.blocks,
        flow_hidden=args.flow_hidden,
        optimizer="adamax",
        lr=args.lr,
        free_bits=args.free_bits,
        free_bits_unit="data_dim",
        iwae_k=args.iwae_k,
        iwae_batch=args.iwae_batch,
    )
    params = sum(p.numel() for p in model.parameters())
    print(
        f"model: VLAE prior {args.prior}, posterior {args.posterior}, decoder {args.decoder}, "
        f"ResNet width {args.width} x {args.blocks} blocks, MADE {args.flow_hidden}, "
        f"{params / 1e6:.2f}M parameters; batch {args.batch_size}, Adamax {args.lr:g}, free bits "
        f"{args.free_bits:g} nats/data-dim, Polyak {args.polyak_decay:g}, {args.precision}"
    )

    meter = Throughput(args.batch_size, args.warmup_steps, args.log_every, KEYS)
    polyak = [PolyakAveraging(decay=args.polyak_decay)] if args.polyak_decay > 0 else []
    loader = DataLoader(test_subset(dm.test_set, args.n_test), batch_size=100, shuffle=False)
    note = f"  evaluating {args.n_test} test images (subset seed {SUBSET_SEED}), k={args.iwae_k}"
    print(f"\n=== training for {args.minutes:g} min ===", flush=True)
    t0 = time.perf_counter()
    steps, epochs, metrics, eval_s = train_then_test(
        model, dm, meter, args.minutes, args.precision, loader, note, callbacks=polyak
    )
    kl = metrics.get("test/kl/z", 0.0)
    result = {
        "train_images_per_s": meter.images_per_s,
        "steps": steps,
        "epochs": epochs,
        "train_s": meter.train_seconds,
        "test_nelbo": metrics["test/nelbo"],
        "test_recon": metrics["test/recon"],
        "test_kl_nats": kl,
        "test_kl_bits": kl / math.log(2),
        "test_nll_iwae": metrics["test/nll_iwae"],
        "n_test": args.n_test,
        "iwae_k": args.iwae_k,
        "eval_s": eval_s,
        "wall_s": time.perf_counter() - t0,
        "history": meter.history,
    }
    print(
        f"\ntrain {result['train_images_per_s']:.1f} images/s ({args.precision}), {steps} steps\n"
        f"test (Polyak weights, {args.n_test} images): -ELBO {result['test_nelbo']:.2f}  "
        f"recon {result['test_recon']:.2f}  KL {kl:.2f} nats = {result['test_kl_bits']:.2f} bits"
        f"  IWAE NLL (k={args.iwae_k}) {result['test_nll_iwae']:.2f} nats  (eval {eval_s:.0f} s)"
    )
    env["load_average_at_end"] = os.getloadavg()
    load = ", ".join(f"{x:.2f}" for x in env["load_average_at_end"])
    print(f"load average at end (1/5/15 min): {load}")
    if args.out:
        out = {"args": vars(args), "environment": env, "result": result}
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
        print(f"results written to {args.out}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
