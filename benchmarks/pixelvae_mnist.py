"""CPU benchmark: Gated PixelVAE on static binarized MNIST, fp32 vs bf16-mixed.

For each precision: train for a fixed wall-clock budget with Lightning, measure training
images/s (end-to-end, after a few warm-up steps), then evaluate on a fixed random subset of
the test split: -ELBO, recon, KL (one z per image) and the IWAE NLL with k samples, all in
nats per image. A script, not a test: see benchmarks/README.md for a recorded run.

    python benchmarks/pixelvae_mnist.py --data ../shared/data/binarized_mnist.npz

Model: the appendix-E.1 Gated PixelVAE of Gulrajani et al. (2017): conv encoder, latent_dim
16, upsampling conv decoder, gated PixelCNN layers with 32 channels (first 7x7 mask A, then
5x5 mask B). Three PixelCNN layers by default: the module's default, and a size that trains
at about the issue's reference speed (100-150 images/s fp32 on 2 cores). Each extra 5x5 layer
costs CPU time and makes the decoder strong enough to ignore z sooner (Table 1 / Fig. 2 of
the paper: a few layers already give most of the gain).

IWAE at k = 100 costs ~100 decoder passes per test image (1M for the full test set, hours on
2 cores), so by default (--n-test 0) the script measures the evaluation speed first and
takes the largest subset that fits --eval-minutes for all precisions together. The test
file is sorted by digit class, so the subset is a fixed-seed random one (always the first n
of the same permutation), never the first n images.
"""

import argparse
import json
import math
import os
import time
from functools import partial
from pathlib import Path

import lightning as L
import torch
from cpu_bench import SUBSET_SEED, Throughput, data_root, start, test_subset, train_then_test
from torch.utils.data import DataLoader

from datamodules import BinarizedMNIST
from datamodules.binarized_mnist import STATIC_NPZ, STATIC_SIZES
from lightning_modules import PixelVAE
from lightning_modules.backbone import GatedPixelCNN, PlainPixelCNN

N_TEST_ALL = STATIC_SIZES["test"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data", required=True, help=f"{STATIC_NPZ} or the directory holding it")
    p.add_argument("--minutes", type=float, default=8.0, help="training budget per precision")
    p.add_argument("--precisions", nargs="+", default=["32-true", "bf16-mixed"])
    p.add_argument(
        "--n-test",
        type=int,
        default=0,
        help="test images to evaluate (fixed random subset); 0 = as many as fit --eval-minutes",
    )
    p.add_argument("--eval-minutes", type=float, default=15.0, help="eval budget, all precisions")
    p.add_argument("--iwae-k", type=int, default=100, help="importance samples of test/nll_iwae")
    p.add_argument("--iwae-batch", type=int, default=1000, help="decoder passes per IWAE forward")
    p.add_argument(
        "--eval-precision",
        default="32-true",
        help='precision of the test pass; "same" = the training precision',
    )
    p.add_argument("--layers", type=int, default=3, help="PixelCNN layers of the decoder")
    p.add_argument("--channels", type=int, default=32, help="PixelCNN channels")
    p.add_argument("--latent-dim", type=int, default=16)
    p.add_argument("--conditioning", choices=["upsample", "vector"], default="upsample")
    p.add_argument("--pixelcnn", choices=["gated", "plain"], default="gated")
    p.add_argument("--batch-size", type=int, default=100, help="training batch (paper code: 100)")
    p.add_argument("--eval-batch-size", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--kl-warmup-steps", type=int, default=0, help="0 = the plain ELBO")
    p.add_argument("--free-bits", type=float, default=0.0, help="nats per latent dim; 0 = off")
    p.add_argument("--seed", type=int, default=0, help="init and data order (same per precision)")
    p.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
    p.add_argument(
        "--keep-denormals",
        action="store_true",
        help="do not flush denormal floats to zero (they made fp32 steps ~4x slower here)",
    )
    p.add_argument(
        "--compile", action="store_true", help="compile_training: torch.compile the training step"
    )
    p.add_argument("--warmup-steps", type=int, default=10, help="steps left out of images/s")
    p.add_argument("--log-every", type=float, default=60.0, help="progress line every N seconds")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    allowed = {"32-true", "bf16-mixed"}  # the two this script was run and checked with
    for prec in args.precisions + ([] if args.eval_precision == "same" else [args.eval_precision]):
        if prec not in allowed:
            p.error(f"precision {prec!r} not in {sorted(allowed)}")
    if not 0 <= args.n_test <= N_TEST_ALL:
        p.error(f"--n-test must be in 0..{N_TEST_ALL}, got {args.n_test}")
    return args


# --------------------------------------------------------------------------------- model
def make_model(args: argparse.Namespace) -> PixelVAE:
    return PixelVAE(
        latent_dim=args.latent_dim,
        conditioning=args.conditioning,
        pixelcnn=partial(
            PlainPixelCNN if args.pixelcnn == "plain" else GatedPixelCNN,
            n_layers=args.layers,
            channels=args.channels,
            first_kernel=7,
            kernel=5,
        )
        if args.layers
        else None,
        lr=args.lr,
        kl_warmup_steps=args.kl_warmup_steps,
        free_bits=args.free_bits,
        iwae_k=args.iwae_k,
        iwae_batch=args.iwae_batch,
        compile_training=args.compile,
    )


def autocast(precision: str):
    """The autocast context Lightning uses on CPU for this precision (none for fp32)."""
    if precision == "bf16-mixed":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


@torch.no_grad()
def eval_seconds_per_image(args: argparse.Namespace, precision: str, x: torch.Tensor) -> float:
    """Seconds per test image of the test step (ELBO + IWAE with k), from one timed batch
    with fewer importance samples, scaled to k (IWAE cost is linear in k)."""
    model = make_model(args).eval()
    b = x.shape[0]
    index = torch.arange(b)
    k_probe = min(args.iwae_k, 2 * model.iwae_samples_per_pass(b))
    with autocast(precision):
        model.log_likelihood_bound(x[:2], 1)  # warm-up (allocator, oneDNN kernels)
    with autocast(precision), model.per_example_noise(index):
        t0 = time.perf_counter()
        model.elbo_terms(x)
        t1 = time.perf_counter()
        model.log_likelihood_bound(x, k_probe)
        t2 = time.perf_counter()
    return ((t1 - t0) + (t2 - t1) * args.iwae_k / k_probe) / b


# ------------------------------------------------------------------------------ one run
def run_precision(
    args: argparse.Namespace, precision: str, dm: BinarizedMNIST, test_loader: DataLoader
) -> dict:
    print(f"\n=== {precision}: training for {args.minutes:g} min ===", flush=True)
    t_run = time.perf_counter()
    L.seed_everything(args.seed, verbose=False)
    model = make_model(args)
    meter = Throughput(args.batch_size, args.warmup_steps, args.log_every)
    eval_precision = precision if args.eval_precision == "same" else args.eval_precision
    n_test = len(test_loader.dataset)
    note = f"  evaluating {n_test} test images, {eval_precision}, k={args.iwae_k} ..."
    steps, epochs, metrics, eval_s = train_then_test(
        model, dm, meter, args.minutes, precision, test_loader, note, eval_precision
    )
    result = {
        "precision": precision,
        "eval_precision": eval_precision,
        "train_images_per_s": meter.images_per_s,
        "steps": steps,
        "epochs": epochs,
        "train_s": meter.train_seconds,
        "test_nelbo": metrics["test/nelbo"],
        "test_recon": metrics["test/recon"],
        "test_kl": metrics["test/kl/z"],
        "test_nll_iwae": metrics["test/nll_iwae"],
        "n_test": n_test,
        "iwae_k": args.iwae_k,
        "eval_s": eval_s,
        "wall_s": time.perf_counter() - t_run,
        "history": meter.history,
    }
    print(
        f"  -ELBO {result['test_nelbo']:.2f}  recon {result['test_recon']:.2f}  "
        f"KL {result['test_kl']:.2f}  IWAE NLL {result['test_nll_iwae']:.2f} nats  "
        f"(eval {eval_s:.0f} s)",
        flush=True,
    )
    return result


def print_table(results: list[dict], k: int) -> None:
    head = (
        "precision",
        "train img/s",
        "steps",
        "epochs",
        "test -ELBO",
        "recon",
        "KL",
        f"IWAE NLL (k={k})",
        "n_test",
        "train s",
        "eval s",
        "wall s",
    )
    rows = [
        (
            r["precision"],
            f"{r['train_images_per_s']:.1f}",
            str(r["steps"]),
            f"{r['epochs']:.2f}",
            f"{r['test_nelbo']:.2f}",
            f"{r['test_recon']:.2f}",
            f"{r['test_kl']:.2f}",
            f"{r['test_nll_iwae']:.2f}",
            str(r["n_test"]),
            f"{r['train_s']:.0f}",
            f"{r['eval_s']:.0f}",
            f"{r['wall_s']:.0f}",
        )
        for r in results
    ]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    line = "  ".join(h.rjust(w) for h, w in zip(head, widths, strict=True))
    print("\n" + line + "\n" + "-" * len(line))
    for row in rows:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))
    print(
        "(nats per image; -ELBO, recon and KL with one z per image; eval precision "
        + ", ".join(sorted({r["eval_precision"] for r in results}))
        + ")"
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # When gradients vanish (a collapsed posterior, saturated gates) denormal floats appear,
    # likely in Adam's second moments (grad**2), and x86 handles them in microcode: fp32 steps
    # went from 1.2 s to ~5 s after ~30 steps here (1 thread); --keep-denormals keeps them.
    env = start(args.threads, flush_denormal=not args.keep_denormals)

    root, tmp = data_root(args.data)
    dm = BinarizedMNIST(root=root, batch_size=args.batch_size, seed=args.seed, download=False)
    dm.setup("fit")
    print(f"data: {Path(root) / STATIC_NPZ}: train {len(dm.train_set)}, test {len(dm.test_set)}")
    print(
        f"model: {args.pixelcnn} PixelVAE, {args.layers} PixelCNN layers x {args.channels} ch "
        f"(7x7 then 5x5), latent {args.latent_dim}, conditioning {args.conditioning}; "
        f"batch {args.batch_size}, lr {args.lr:g}, KL warm-up {args.kl_warmup_steps} steps, "
        f"free bits {args.free_bits:g}, seed {args.seed}"
    )

    # Evaluation cost: measured before training (it does not depend on the weights).
    eval_precisions = [
        p if args.eval_precision == "same" else args.eval_precision for p in args.precisions
    ]
    probe = torch.stack([dm.test_set[i][0] for i in test_subset(dm.test_set, 100).indices])
    probe = probe[: args.eval_batch_size]
    per_image = {p: eval_seconds_per_image(args, p, probe) for p in set(eval_precisions)}
    total_per_image = sum(per_image[p] for p in eval_precisions)
    for p, s in per_image.items():
        print(
            f"eval speed ({p}, k={args.iwae_k}): {1 / s:.2f} test images/s; all "
            f"{N_TEST_ALL} would take {N_TEST_ALL * s / 60:.0f} min per precision"
        )
    if args.n_test:
        n_test = args.n_test
        why = "--n-test"
    else:
        fit = int(args.eval_minutes * 60 / total_per_image)
        n_test = min(N_TEST_ALL, max(args.eval_batch_size, fit // 100 * 100))
        why = f"largest multiple of 100 fitting --eval-minutes {args.eval_minutes:g}"
    print(
        f"n_test = {n_test} of {N_TEST_ALL} ({why}); fixed random subset (seed {SUBSET_SEED}); "
        f"estimated eval {n_test * total_per_image / 60:.1f} min for all precisions",
        flush=True,
    )
    test_loader = DataLoader(
        test_subset(dm.test_set, n_test), batch_size=args.eval_batch_size, shuffle=False
    )

    results = [run_precision(args, p, dm, test_loader) for p in args.precisions]
    env["load_average_at_end"] = os.getloadavg()
    print_table(results, args.iwae_k)
    for r in results:
        if r["test_kl"] < 1.0:
            print(
                f"note: {r['precision']}: KL {r['test_kl']:.2f} nats < 1: z is barely used "
                "(posterior collapse or close to it)"
            )
    if len(results) > 1 and all(math.isfinite(r["train_images_per_s"]) for r in results):
        base = results[0]
        for r in results[1:]:
            ratio = r["train_images_per_s"] / base["train_images_per_s"]
            print(f"{r['precision']} trains at {ratio:.2f}x the speed of {base['precision']}")
    load = ", ".join(f"{x:.2f}" for x in env["load_average_at_end"])
    print(f"load average at end (1/5/15 min): {load}")

    if args.out:
        out = {
            "args": vars(args),
            "environment": env,
            "eval_s_per_image": per_image,
            "results": results,
        }
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
        print(f"results written to {args.out}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
