"""Cached against uncached autoregressive sampling (Ramachandran et al. 2017) on the CPU:
seconds to draw one batch of images, side by side in one run, and whether both samplers draw
the same images.

Model: ``PixelCNN`` on 1x28x28 binary images (Bernoulli likelihood) with arvae's Gated
PixelCNN, ``--layers`` (20) gated layers of ``--channels`` (32) channels (the first 7x7 mask
A, then ``--kernel`` x ``--kernel`` blocks, 5 by default), fresh He-initialized weights
(sampling speed does not depend on them), batch ``--batch`` (16). Methods:

- ``cached``: ``model.sample(n, noise)``, arvae's cached sampler: each new pixel costs one
  position of work per layer (``lightning_modules/backbone/sampling_cache.py``);
- ``uncached``: the same call inside ``reference_sampling()``, which runs the whole network
  on canvas rows 0..i for each pixel of row i (the receptive field of a 20-layer network
  spans every row above, so nothing is cropped away at 28x28).

Both draw from the same noise (``model.sample_noise(n, torch.Generator().manual_seed(0))``),
so their images must be equal (``torch.equal``): the 'identical' column. The cached sampler
is timed ``--rounds`` times after one untimed warm-up run, the uncached one
``--uncached-rounds`` times (default once: it takes minutes); min / median / max seconds per
batch are printed, and 'x faster' is the median of the network's uncached run over this
row's median. The issue's goal for the gated network is cached >= 50x faster.

``--also-plain-local`` adds the same for ``PlainPixelCNN`` (same layers, channels and
kernels) and ``LocalPixelCNN`` with VLAE's default options (unconditional here; its window of
6 rows is what the uncached sampler crops the canvas to).

``--pytorch-generative PATH``: a peer, EugenHotaj/pytorch-generative's ``GatedPixelCNN``,
checked out outside this repository (nothing of it is copied here; PATH goes on sys.path),
sampled by its own ``model.sample(n_samples=...)``, which runs the whole network on the whole
28x28 canvas for every pixel (its sampler has no cache and no cropping) and draws Bernoulli
pixels from torch's global generator (so there is no parity with arvae to check). Matched:
20 gated layers (its 7x7 input layer + ``n_gated`` = layers - 1 layers), ``gated_channels`` =
``head_channels`` = ``--channels``, 1 input and 1 output channel; its gated layers' kernels
are fixed at 3x3 by its constructor (``--kernel 3`` gives arvae the same). Its package's
``__init__`` imports its training tools (scikit-learn, torchvision, tensorboard); where those
are not installed only the three files the network needs are loaded (``nn``, ``models/base``,
``models/autoregressive/gated_pixel_cnn``), unchanged, and the output says so.

``--pixelcnnpp``: PixelCNN++ at the size of experiments/pixelcnnpp/cifar10.yaml (5 blocks
per stage, 160 filters, 10 logistics, 3 resolutions) on 3x32x32 8-bit images, batch
``--batch``: the cached sampler timed over a whole batch (``--pp-rounds``, default 1); the
uncached one would run 1,024 forward passes (~40 min on 2 cores), so its time is predicted:
one forward pass timed per canvas height h = 1..32 (the uncached sampler runs rows 0..i for
each pixel of row i), total = width x the sum over h. Parity for PixelCNN++ is what
tests/test_cached_sampling.py checks (same draws at odd sizes), not repeated here.
``--pixel-cnn-pp PATH``: the peer pclucas14/pixel-cnn-pp (checkout outside this repository,
loaded as benchmarks/pixelcnnpp_peer.py does), at the same size: its sampler (main.py's
``sample``) runs the whole network on the whole canvas for every pixel and draws with its
``sample_from_discretized_mix_logistic``; its time is predicted as H x W x one such step
(every step costs the same), timed ``--peer-rounds`` times.

    python benchmarks/sampling_speed.py
    python benchmarks/sampling_speed.py --pytorch-generative /tmp/pytorch-generative
    python benchmarks/sampling_speed.py --pixelcnnpp --pixel-cnn-pp /tmp/pixel-cnn-pp
    python benchmarks/sampling_speed.py --also-plain-local --rounds 5
"""

import argparse
import functools
import importlib
import os
import shlex
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

import pixelcnnpp_peer
import torch
from cpu_bench import cpu_flags

from lightning_modules import PixelCNN
from lightning_modules.backbone import (
    GatedPixelCNN,
    LocalPixelCNN,
    PixelCNNppNet,
    PlainPixelCNN,
    reference_sampling,
)
from lightning_modules.likelihoods import DiscretizedLogisticMixture

IMAGE_SHAPE = (1, 28, 28)
PEER_PACKAGES = {"pytorch_generative": "", "pytorch_generative.models": "models"}
PEER_MODULE = "pytorch_generative.models.autoregressive.gated_pixel_cnn"


def timed(fn: Callable[[], torch.Tensor], rounds: int) -> tuple[list[float], torch.Tensor]:
    """Seconds of each of ``rounds`` calls of fn, and the last call's result."""
    seconds, out = [], None
    for _ in range(rounds):
        start = time.perf_counter()
        out = fn()
        seconds.append(time.perf_counter() - start)
    return seconds, out


def arvae_model(network: str, args) -> PixelCNN:
    nets = {
        "gated": functools.partial(
            GatedPixelCNN, n_layers=args.layers, channels=args.channels, kernel=args.kernel
        ),
        "plain": functools.partial(
            PlainPixelCNN, n_layers=args.layers, channels=args.channels, kernel=args.kernel
        ),
        "local": LocalPixelCNN,  # VLAE's defaults: 6 masked 3x3 layers of 12 filters
    }
    return PixelCNN(image_shape=IMAGE_SHAPE, pixelcnn=nets[network]).eval()


def describe(network: str, args) -> str:
    if network == "local":
        return "arvae LocalPixelCNN (VLAE defaults: 6 layers x 12 ch, 3x3, tied)"
    kind = {"gated": "GatedPixelCNN", "plain": "PlainPixelCNN"}[network]
    return (
        f"arvae {kind} {args.layers} layers x {args.channels} ch (7x7, {args.kernel}x{args.kernel})"
    )


@torch.no_grad()
def bench_arvae(network: str, args) -> list[dict]:
    """The cached and the uncached sampler of one network, from the same noise."""
    torch.manual_seed(0)
    model = arvae_model(network, args)
    params = sum(p.numel() for p in model.parameters())
    noise = model.sample_noise(args.batch, torch.Generator().manual_seed(0))
    name = describe(network, args)
    print(f"\n{name}: {params / 1e6:.3f}M parameters, receptive rows "
          f"{model.net.receptive_rows}", flush=True)  # fmt: skip
    model.sample(args.batch, noise)  # warm-up, untimed
    cached_s, cached = timed(lambda: model.sample(args.batch, noise), args.rounds)
    print(f"  cached: {fmt_seconds(cached_s)} s", flush=True)
    with reference_sampling():
        ref_s, reference = timed(lambda: model.sample(args.batch, noise), args.uncached_rounds)
    print(f"  uncached: {fmt_seconds(ref_s)} s", flush=True)
    same = torch.equal(cached, reference)
    logits = model.params(cached)
    print(
        f"  parity: identical images {same} ({int((cached != reference).sum())} of "
        f"{cached.numel()} pixels differ); fraction of ones {cached.mean().item():.3f}; "
        f"logits on the sample: std {logits.std().item():.2f}, "
        f"|max| {logits.abs().max().item():.1f} (the draws depend on the network)",
        flush=True,
    )
    return [
        {"network": name, "method": "cached", "seconds": cached_s, "identical": same,
         "base": ref_s},
        {"network": name, "method": "uncached (reference_sampling)", "seconds": ref_s,
         "identical": "reference", "base": ref_s},
    ]  # fmt: skip


def load_peer(path: Path) -> tuple[types.ModuleType, str]:
    """pytorch-generative's gated_pixel_cnn module from its checkout at ``path``, and how it
    was imported. Its package ``__init__`` files import its datasets and trainer (scikit-learn,
    torchvision, tensorboard); when one of those is missing, the two packages are registered
    bare (their directories as ``__path__``, their ``__init__`` not run), so that only the
    network's own modules load, from the checkout, unchanged."""
    sys.path.insert(0, str(path))
    try:
        return importlib.import_module(PEER_MODULE), "imported as a package"
    except ModuleNotFoundError as error:
        missing = error.name
        if missing is None or missing.startswith("pytorch_generative"):
            raise
        for name in [m for m in sys.modules if m.startswith("pytorch_generative")]:
            del sys.modules[name]
    for name, sub in PEER_PACKAGES.items():
        package = types.ModuleType(name)
        package.__path__ = [str(path / "pytorch_generative" / sub)]
        sys.modules[name] = package
    module = importlib.import_module(PEER_MODULE)
    how = (
        f"its package __init__ needs {missing!r} (not installed), so only its nn, models/base "
        "and models/autoregressive/gated_pixel_cnn modules were loaded, unchanged"
    )
    return module, how


def peer_commit(path: Path) -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(path), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git work tree)"


@torch.no_grad()
def bench_peer(path: Path, args) -> list[dict]:
    module, how = load_peer(path)
    torch.manual_seed(0)
    model = module.GatedPixelCNN(
        in_channels=1, out_channels=1, n_gated=args.layers - 1,
        gated_channels=args.channels, head_channels=args.channels,
    ).eval()  # fmt: skip
    model(torch.zeros(1, *IMAGE_SHAPE))  # its sample() reads the image shape from a forward
    params = sum(p.numel() for p in model.parameters())
    name = f"pytorch-generative GatedPixelCNN {args.layers} layers x {args.channels} ch (7x7, 3x3)"
    print(f"\n{name}: {params / 1e6:.3f}M parameters; checkout {path} at {peer_commit(path)}")
    print(f"  import: {how}")
    print(
        f"  matched: n_gated={args.layers - 1} (+ its 7x7 input layer = {args.layers} gated "
        f"layers), gated_channels={args.channels}, head_channels={args.channels}, 1 channel in "
        "and out, Bernoulli logits; not matched: its gated layers are 3x3 (fixed in its "
        f"constructor; arvae's here {args.kernel}x{args.kernel}), its head sums every layer's "
        "skip output then ReLU-1x1-ReLU-1x1 (arvae: two gated 1x1 layers on the last "
        "horizontal stack), and its sampler runs the network on the whole canvas per pixel",
        flush=True,
    )
    seconds, out = timed(lambda: model.sample(n_samples=args.batch), args.peer_rounds)
    print(f"  sample: {fmt_seconds(seconds)} s, fraction of ones {out.mean().item():.3f}")
    return [{"network": name, "method": "its model.sample", "seconds": seconds,
             "identical": None, "base": None}]  # fmt: skip


@torch.no_grad()
def bench_pixelcnnpp(args) -> None:
    """PixelCNN++ at the CIFAR-10 config's size: cached (timed), uncached and the peer
    (predicted from timed forward passes; see the module docstring)."""
    shape, n_mix = (3, 32, 32), 10
    torch.manual_seed(0)
    model = PixelCNN(
        image_shape=shape, data_kind="8bit", likelihood=DiscretizedLogisticMixture(n_mix=n_mix),
        pixelcnn=functools.partial(PixelCNNppNet, nr_resnet=5, channels=160, dropout=0.5),
    ).eval()  # fmt: skip
    params = sum(p.numel() for p in model.parameters())
    print(f"\narvae PixelCNN++ 5 blocks x 160 filters, 3x32x32, batch {args.batch}: "
          f"{params / 1e6:.2f}M parameters", flush=True)  # fmt: skip
    noise = model.sample_noise(args.batch, torch.Generator().manual_seed(0))
    cached_s, _ = timed(lambda: model.sample(args.batch, noise), args.pp_rounds)
    print(f"  cached: {fmt_seconds(cached_s)} s per batch", flush=True)
    x = torch.zeros(args.batch, *shape)
    per_height = [timed(lambda h=h: model.params(x[:, :, :h]), 1)[0][0] for h in range(1, 33)]
    uncached = shape[2] * sum(per_height)
    print(f"  uncached (predicted): {uncached:.0f} s per batch = 32 x the sum of one forward "
          f"pass per canvas height ({per_height[0]:.2f} s at 1 row .. {per_height[-1]:.2f} s at "
          "32)", flush=True)  # fmt: skip
    print(f"  cached is {uncached / statistics.median(cached_s):.1f}x faster than uncached "
          "(the issue's goal for PixelCNN++: >= 20x)", flush=True)  # fmt: skip
    if args.pixel_cnn_pp is None:
        return
    peer = pixelcnnpp_peer.load_peer(args.pixel_cnn_pp.expanduser())
    net = pixelcnnpp_peer.build_peer(
        peer, argparse.Namespace(nr_resnet=5, nr_filters=160, nr_mix=n_mix, dropout=0.5)
    ).eval()
    canvas = torch.zeros(args.batch, *shape)

    def peer_step() -> torch.Tensor:  # one pixel of its sampler: a whole forward + a draw
        out = pixelcnn_peer_out(net, canvas)
        return peer.sample(out, n_mix)

    with pixelcnnpp_peer.peer_on_cpu():
        peer_step()  # warm-up (builds its padding cache)
        step_s, _ = timed(peer_step, args.peer_rounds)
    predicted = shape[1] * shape[2] * statistics.median(step_s)
    print(f"  pixel-cnn-pp (commit {peer.commit}), its sampler: one pixel's step "
          f"{fmt_seconds(step_s)} s, predicted {predicted:.0f} s per batch; arvae cached is "
          f"{predicted / statistics.median(cached_s):.1f}x faster", flush=True)  # fmt: skip


def pixelcnn_peer_out(net: torch.nn.Module, canvas: torch.Tensor) -> torch.Tensor:
    """The peer's forward in sampling mode, as its main.py calls it."""
    if net.init_padding is not None and net.init_padding.shape[0] != canvas.shape[0]:
        net.init_padding = None
    return net(canvas, sample=True)


def fmt_seconds(seconds: list[float]) -> str:
    return f"{min(seconds):.3f} / {statistics.median(seconds):.3f} / {max(seconds):.3f}"


def print_table(rows: list[dict], gated_uncached: list[float]) -> None:
    print(
        "\n| network | method | rounds | s/batch min / median / max | x faster than "
        "uncached | x faster than arvae gated uncached | identical to reference |"
    )
    print("|---|---|---|---|---|---|---|")
    base = statistics.median(gated_uncached)
    for row in rows:
        med = statistics.median(row["seconds"])
        own = "-" if row["base"] is None else f"{statistics.median(row['base']) / med:.1f}"
        same = {None: "n/a", True: "yes", False: "NO"}.get(row["identical"], row["identical"])
        print(f"| {row['network']} | {row['method']} | {len(row['seconds'])} | "
              f"{fmt_seconds(row['seconds'])} | {own} | {base / med:.1f} | {same} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=20, help="gated / plain masked layers")
    parser.add_argument("--channels", type=int, default=32)
    parser.add_argument("--kernel", type=int, default=5, help="kernel after the first layer")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3, help="timed runs of cached samplers")
    parser.add_argument("--uncached-rounds", type=int, default=1, help="of uncached samplers")
    parser.add_argument("--peer-rounds", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--also-plain-local", action="store_true")
    parser.add_argument("--pixelcnnpp", action="store_true", help="PixelCNN++ at CIFAR size")
    parser.add_argument("--pp-rounds", type=int, default=1, help="of PixelCNN++ cached")
    parser.add_argument("--pixel-cnn-pp", type=Path, metavar="PATH",
                        help="pclucas14/pixel-cnn-pp checkout (with --pixelcnnpp)")  # fmt: skip
    parser.add_argument("--skip-gated", action="store_true", help="only --pixelcnnpp")
    parser.add_argument("--pytorch-generative", type=Path, metavar="PATH",
                        help="a checkout of EugenHotaj/pytorch-generative (the peer)")  # fmt: skip
    args = parser.parse_args()
    if min(args.rounds, args.uncached_rounds, args.peer_rounds) < 1:
        parser.error("rounds must be >= 1")
    torch.set_num_threads(args.threads)
    print("command: python " + shlex.join(sys.argv))
    cpu, _ = cpu_flags()
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"python {sys.version.split()[0]}  torch {torch.__version__}  CPU: {cpu}, "
          f"{len(os.sched_getaffinity(0))} cores available, torch threads "
          f"{torch.get_num_threads()}")  # fmt: skip
    print(f"load average at start (1/5/15 min): {load}  (other processes skew timings)")
    print(f"images 1x28x28 binary (Bernoulli), batch {args.batch}; seconds are per batch")

    started = time.perf_counter()
    if args.pixelcnnpp:
        bench_pixelcnnpp(args)
    if args.skip_gated:
        return
    rows = bench_arvae("gated", args)
    gated_uncached = rows[1]["seconds"]
    if args.also_plain_local:
        rows += bench_arvae("plain", args) + bench_arvae("local", args)
    if args.pytorch_generative is not None:
        rows += bench_peer(args.pytorch_generative.expanduser().resolve(), args)

    print_table(rows, gated_uncached)
    cached = statistics.median(rows[0]["seconds"])
    speedup = statistics.median(gated_uncached) / cached
    goal = "met" if speedup >= 50 else "NOT met"
    print(f"\ngated: cached is {speedup:.1f}x faster than uncached (the issue's goal at 20 layers "
          f"x 32 ch, >= 50x: {goal})")  # fmt: skip
    if args.pytorch_generative is not None:
        peer = statistics.median(rows[-1]["seconds"])
        print(f"arvae gated cached / pytorch-generative time = {cached / peer:.4f} "
              f"(the peer takes {peer / cached:.1f}x as long per batch)")  # fmt: skip
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"total wall time {time.perf_counter() - started:.0f} s; load average at end: {load}")


if __name__ == "__main__":
    main()
