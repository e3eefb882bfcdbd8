"""The importance-weighted test bound on the CPU, side by side in one run.

Model: PixelVAE's Table 1 "Gated PixelVAE" (experiments/pixelvae/gated_pixelvae.yaml: 16-d
z, 13 gated layers x 32 channels on the upsampled decoding of z) with fresh weights, or the
PixelVAE of a checkpoint (``--ckpt``, e.g. the quick start's: the bf16 effect means more on
a trained model). Data:
the first ``--images`` (100: one test batch of the config) test images of ``--data`` (an
npz with ``test`` images; default the binarized-MNIST sample shipped in the package).

For each way of running the bound, ``log_likelihood_bound(x, k)`` of the batch is timed with
``--k-probe`` importance samples (its cost is linear in k; every sample is one decoder
evaluation per image) and reported as test images/s at k = 100 and at k = 5000:

- ``fixed 100`` / ``fixed 1000``: passes of 100 / 1000 decoder evaluations (``iwae_batch``;
  the old CPU and GPU defaults);
- ``tuned``: ``iwae_batch: null``, the pass size found on this batch (it doubles from 64
  evaluations while the time per evaluation falls); its second batch runs at the size found;
- ``tuned bf16``: the same under bf16 autocast (``iwae_bf16``).

Then the bf16 bound against the float32 one on the same images and samples: mean
difference and its standard error in nats per image. ``--k5000-images N`` runs the real
k = 5000 bound of N images (tuned, float32) and times it. Last, the predicted time of the
full k = 5000 test of 10,000 images at the best rate.

    python benchmarks/iwae_speed.py
    python benchmarks/iwae_speed.py --ckpt runs/quickstart/version_0/checkpoints/last.ckpt
"""

import argparse
import os
import shlex
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from cpu_bench import cpu_flags

from lightning_modules import PixelVAE
from lightning_modules.backbone import GatedPixelCNN

SAMPLE = Path(__file__).resolve().parents[1] / "datamodules/assets/binarized_mnist_sample.npz"


def table1_model(args, **options) -> PixelVAE:
    if args.ckpt is not None:
        model = PixelVAE.load_from_checkpoint(args.ckpt, map_location="cpu", **options)
    else:
        torch.manual_seed(0)
        net = partial(GatedPixelCNN, n_layers=13, channels=32, first_kernel=7, kernel=5)
        model = PixelVAE(latent_dim=16, conditioning="upsample", pixelcnn=net, **options)
    return model.eval()


def test_images(path: Path, n: int) -> torch.Tensor:
    with np.load(path) as data:
        images = data["test"][:n]
    if images.ndim == 2 and images.shape[1] == 98:  # the shipped sample: 784 bits per image
        images = np.unpackbits(images, axis=1)
    return torch.from_numpy(images.astype(np.float32)).reshape(-1, 1, 28, 28)


@torch.no_grad()
def timed_bound(model: PixelVAE, x: torch.Tensor, k: int) -> tuple[float, torch.Tensor]:
    """Seconds of one bound of the batch with k samples, and the bound (same samples for
    every model: per-example noise)."""
    with model.per_example_noise(torch.arange(x.shape[0])):
        start = time.perf_counter()
        bound = model.log_likelihood_bound(x, k)
    return time.perf_counter() - start, bound


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=SAMPLE)
    parser.add_argument("--ckpt", type=Path)
    parser.add_argument("--images", type=int, default=100, help="a test batch")
    parser.add_argument("--k-probe", type=int, default=20, help="samples timed per run")
    parser.add_argument("--k5000-images", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("command: python " + shlex.join(sys.argv))
    cpu, flags = cpu_flags()
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    bf16 = "native bf16" if flags & {"avx512_bf16", "amx_bf16"} else "no native bf16"
    print(f"torch {torch.__version__}, CPU {cpu} ({bf16}), threads {torch.get_num_threads()}, "
          f"load {load}")  # fmt: skip
    x = test_images(args.data, args.images)
    b, k = x.shape[0], args.k_probe
    model = "Table 1 Gated PixelVAE, fresh weights" if args.ckpt is None else f"{args.ckpt}"
    print(f"model: {model}; {b} test images of {args.data.name}; "
          f"each run times k = {k} samples\n")  # fmt: skip

    runs = {
        "fixed 100": dict(iwae_batch=100),
        "fixed 1000": dict(iwae_batch=1000),
        "tuned": dict(iwae_batch=None),
        "tuned bf16": dict(iwae_batch=None, iwae_bf16=True),
    }
    rates, bounds = {}, {}
    print("| run | samples per pass | s per batch | test images/s at k = 100 | at k = 5000 |")
    print("|---|---|---|---|---|")
    for name, options in runs.items():
        model = table1_model(args, **options)
        timed_bound(model, x[:2], 2)  # warm-up (allocator, oneDNN kernels), not tuning b
        seconds, bounds[name] = timed_bound(model, x, k)
        label = [name]
        if options["iwae_batch"] is None:  # the first batch tuned; time one at its size
            label = [f"{name} (first batch, tuning)", f"{name} (settled)"]
            print(f"| {label[0]} | 1, 2, 4, ... | {seconds:.1f} | {b * k / 100 / seconds:.3f} "
                  f"| {b * k / 5000 / seconds:.4f} |", flush=True)  # fmt: skip
            seconds, bounds[name] = timed_bound(model, x, k)
        n = model.iwae_samples_per_pass(b)
        rates[name] = b * k / seconds  # image-samples per second
        print(f"| {label[-1]} | {n} ({n * b} evaluations) | {seconds:.1f} | "
              f"{rates[name] / 100:.3f} | {rates[name] / 5000:.4f} |", flush=True)  # fmt: skip

    diff = (bounds["tuned bf16"] - bounds["tuned"]).double()
    se = diff.std() / diff.numel() ** 0.5
    print(f"\nbf16 - float32 bound (k = {k}, same samples): {diff.mean():+.4f} ± {se:.4f} nats "
          f"per image (|max| {diff.abs().max():.4f}; float32 mean "
          f"{bounds['tuned'].mean():.2f} nats)")  # fmt: skip
    fixed = max(rates["fixed 100"], rates["fixed 1000"])
    print(f"tuned / best fixed: {rates['tuned'] / fixed:.2f}x; bf16 / float32 (tuned): "
          f"{rates['tuned bf16'] / rates['tuned']:.2f}x")  # fmt: skip
    if args.k5000_images:
        model = table1_model(args, iwae_batch=None)
        timed_bound(model, x[:2], 2)
        seconds, _ = timed_bound(model, x[: args.k5000_images], 5000)
        n = model.iwae_samples_per_pass(args.k5000_images)
        print(
            f"k = 5000, {args.k5000_images} image(s), tuned float32: {seconds:.1f} s = "
            f"{args.k5000_images / seconds:.4f} test images/s ({n} samples per pass)"
        )
    best = max(rates.values())
    days = 10_000 * 5000 / best / 86400
    print(f"predicted full test (10,000 images, k = 5000) at the best rate here "
          f"({best:.0f} image-samples/s): {days:.1f} days on this CPU")  # fmt: skip


if __name__ == "__main__":
    main()
