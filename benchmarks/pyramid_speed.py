"""Pyramid PixelCNN against a plain PixelCNN++ of the same width, on the CPU: seconds per
generated pixel and training images/s (Kolesnikov & Lampert 2017, §4.2: 0.004 s/pixel for the
Pyramid against 0.05 s/pixel for a cached PixelCNN++, on a TitanX, at 128x128).

Models (``--width`` filters everywhere, ``--batch`` images, random 8-bit RGB images: speed
does not depend on their content):

- Pyramid: ψ = half resolution down to 8x8 (32x32: 2 conditional levels; 64x64: 3), every
  level a PixelCNN++ without down/up-sampling, 3 blocks per pass, the embedding 15 blocks
  (down after 3, up after 9 and 12) as in §4.2, 10 logistics;
- PixelCNN++: the paper's network (3 resolutions, ``--nr-resnet`` 5 blocks per stage), 10
  logistics.

Sampling is arvae's uncached sampler, which for a pixel of row i runs the level's network on
the canvas rows it needs (PixelCNN++: rows 0..i; a Pyramid level: rows 0..i and its
embedding map's, rounded up to its coarsest stride) and draws the pixel (a Pyramid level
within the bounds that keep its view). That cost grows with i, so it is timed at 5 rows
from the first to the last and interpolated over the rows (``seconds_per_row_pixel``); a
level's embedding runs once per sample and is added to its time. Reported:
seconds per pixel of the finest image (the whole sample's time over H x W, as the paper
counts), per level and in all, and the ratio PixelCNN++ / Pyramid. Training: forward, loss,
backward and an Adam step, median images/s over ``--rounds`` interleaved rounds (order
alternated), each after ``--warmup`` untimed steps.

    python benchmarks/pyramid_speed.py --sizes 32 64
"""

import argparse
import functools
import time
from collections.abc import Callable

import numpy as np
import torch
from cpu_bench import interleaved

from lightning_modules import AuxiliaryPixelCNN, PixelCNNpp
from lightning_modules.backbone import EmbeddingNet, PixelCNNppNet
from lightning_modules.likelihoods import DiscretizedLogisticMixture
from lightning_modules.views import HalfResolution


def pyramid(size: int, width: int) -> AuxiliaryPixelCNN:
    levels = {32: 2, 64: 3, 128: 4}[size]
    net = functools.partial(PixelCNNppNet, nr_resnet=3, channels=width, dropout=0.0, resolutions=1)
    embed = functools.partial(
        EmbeddingNet, n_blocks=15, channels=width, down_after=[3], up_after=[9, 12], dropout=0.0
    )
    return AuxiliaryPixelCNN(
        views=[HalfResolution()] * levels, image_shape=(3, size, size), base=net,
        conditional=net, embedding=embed, likelihood=DiscretizedLogisticMixture(10),
    )  # fmt: skip


def pixelcnnpp(size: int, width: int, nr_resnet: int) -> PixelCNNpp:
    net = functools.partial(PixelCNNppNet, nr_resnet=nr_resnet, channels=width, dropout=0.0)
    return PixelCNNpp(pixelcnn=net, image_shape=(3, size, size))


def seconds_per_row_pixel(draw_at: Callable[[int], None], height: int, points: int = 5) -> float:
    """Mean seconds per pixel over the rows of an image whose pixel in row i costs
    ``draw_at(i)`` (one network pass on the canvas rows the sampler gives it, then one draw):
    timed at ``points`` rows from the first to the last (best of 2 each), interpolated
    linearly over the rows in between."""
    rows = sorted({round(k * (height - 1) / (points - 1)) for k in range(points)})
    seconds = []
    for row in rows:
        runs = []
        for _ in range(2):
            start = time.perf_counter()
            draw_at(row)
            runs.append(time.perf_counter() - start)
        seconds.append(min(runs))
    return float(np.interp(np.arange(height), rows, seconds).mean())


@torch.no_grad()
def pyramid_seconds_per_pixel(model: AuxiliaryPixelCNN, batch: int) -> dict:
    """Seconds per pixel of each level (its own pixels, with its sampler's crop of canvas and
    map and its view-keeping draw), and the whole sample's time (every level, the
    embeddings once each) over the finest image's pixels."""
    out, total = {}, 0.0
    x = torch.randint(0, 256, (batch, *model.image_shape)).float()
    levels = model.views_of(x)
    for level in reversed(range(len(model.level_names))):
        name, lik = model.level_names[level], model.likelihoods[level]
        channels, h, w = model.level_shapes[level]
        start = time.perf_counter()
        cond = None if level + 1 == len(levels) else model.embed(name, levels[level + 1], level)
        embed_seconds = time.perf_counter() - start

        def draw_at(row, level=level, lik=lik, cond=cond):
            crop = model.sampler_crop(level, row + 1, cond)
            canvas = levels[level][:, :, :crop].clone()
            params = model.factor_params(level, canvas, None if cond is None else cond[:, :, :crop])
            pixel = params[:, :, row : row + 1, :1]
            if cond is None:
                lik.sample(pixel)
            else:
                bounds = model.views[level].pixel_bounds(levels[level + 1], canvas, row, 0)
                lik.sample(pixel, bounds=bounds)

        seconds = seconds_per_row_pixel(draw_at, h)
        out[name] = seconds
        total += seconds * h * w + embed_seconds
    out["all"] = total / (model.image_shape[1] * model.image_shape[2])
    return out


@torch.no_grad()
def pixelcnnpp_seconds_per_pixel(model: PixelCNNpp, batch: int) -> float:
    """PixelCNN++'s sampler gives its network rows 0..i to draw a pixel of row i."""
    _, h, w = model.image_shape
    x = torch.randint(0, 256, (batch, *model.image_shape)).float()

    def draw_at(row):
        model.likelihood.sample(model.params(x[:, :, : row + 1])[:, :, row:, :1])

    return seconds_per_row_pixel(draw_at, h)


def train_rate(models: dict, batch: int, warmup: int, rounds: int, seconds: float) -> dict:
    """Median training images/s of each model over interleaved rounds."""
    x = torch.randint(0, 256, (batch, *next(iter(models.values())).image_shape)).float()
    optims = {k: torch.optim.Adam(m.parameters(), lr=1e-3) for k, m in models.items()}

    def step(name):
        model, opt = models[name], optims[name]
        loss = model.loss(model.checked(model.elbo_terms(x)))
        opt.zero_grad()
        loss.backward()
        opt.step()

    for model in models.values():
        model.train()
    steps = {name: functools.partial(step, name) for name in models}
    timed = interleaved(steps, seconds, rounds, warmup)
    return {name: t["steps_per_s"] * batch for name, t in timed.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--width", type=int, default=100, help="filters (paper: 100)")
    parser.add_argument("--nr-resnet", type=int, default=5, help="PixelCNN++ blocks per stage")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=40.0, help="training time per model")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(
        f"threads {args.threads}, width {args.width}, batch {args.batch}, torch {torch.__version__}"
    )
    for size in args.sizes:
        models = {
            "pyramid": pyramid(size, args.width),
            "pixelcnnpp": pixelcnnpp(size, args.width, args.nr_resnet),
        }
        x = torch.randint(0, 256, (args.batch, 3, size, size)).float()
        for model in models.values():
            model.initialize_from(x)
            model.eval()
        params = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}
        per_level = pyramid_seconds_per_pixel(models["pyramid"], args.batch)
        plain = pixelcnnpp_seconds_per_pixel(models["pixelcnnpp"], args.batch)
        rates = train_rate(models, args.batch, args.warmup, args.rounds, args.seconds)
        print(
            f"\n{size}x{size}, batch {args.batch} (s/pixel: one batch's sampling time over H x W)"
        )
        print("| model | parameters | s/pixel (batch) | s/pixel per image | train img/s |")
        print("|---|---|---|---|---|")
        for name, seconds in (("pyramid", per_level["all"]), ("pixelcnnpp", plain)):
            print(f"| {name} | {params[name] / 1e6:.2f}M | {seconds:.4f} | "
                  f"{seconds / args.batch:.5f} | {rates[name]:.2f} |")  # fmt: skip
        levels = ", ".join(f"{k} {v:.4f}" for k, v in per_level.items() if k != "all")
        print(f"pyramid s/pixel of each level's own pixels: {levels}")
        speed = rates["pyramid"] / rates["pixelcnnpp"]
        print(f"sampling: PixelCNN++ / Pyramid = {plain / per_level['all']:.1f}x; "
              f"training: Pyramid / PixelCNN++ = {speed:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
