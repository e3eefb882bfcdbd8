"""arvae's PixelCNN++ against the widely used PyTorch port pclucas14/pixel-cnn-pp, on the CPU.

Two parts, each printed as a table:

a. Likelihood agreement. The peer's network (a fresh one, and the same after
   ``--train-steps`` Adam steps on real CIFAR-10 images with the peer's own loss, so that its
   outputs are not initial) gives mixture parameters for ``--check-images`` real images. Its
   output is converted to arvae's channel layout (:func:`peer_to_arvae`) and the images are
   scored twice: by the peer's ``discretized_mix_logistic_loss`` (one call per image: it
   returns the sum over the batch) and by arvae's ``DiscretizedLogisticMixture.log_prob``.
   Reported per image, in nats: max and mean |peer - arvae|, once as both libraries return
   the totals (float32 sums, whose spacing at |log p| ~ 1e4 nats is ~1e-3 nats) and once from
   their per-pixel values (the peer's loss vmapped over single pixels, arvae's log_prob on
   1x1 images) summed in float64; both against an independent float64 evaluation of the
   exact bin masses read straight from the peer's layout (:func:`reference_log_prob`).
   The goal is 1e-3 nats per image. Where the two differ, there are two causes, both in the
   peer, and a floor common to any float32 code:

   - the peer's approximation: when a sub-pixel's bin mass under one mixture component,
     computed as the float32 difference of two sigmoids (``cdf_delta``), is not above 1e-5,
     the peer scores the density at the bin centre times the bin width 2/255 instead; arvae
     computes every bin mass exactly. The table counts the (sub-pixel, component) terms and
     the pixels that hit the fallback (the peer's criterion re-evaluated in float32,
     :func:`peer_fallback_terms`) and gives the difference with those pixels left out and
     over them alone;
   - the peer's float32 subtraction itself: with broad components (a fresh or briefly
     trained network) both sigmoids are near 0.5 and their difference ~1e-3 keeps few
     digits, ~1e-5 nats per term, which over an image's pixels reach ~1e-2 nats; the peer's
     own loss run on float64 tensors agrees with the float64 reference off the fallback
     pixels, which locates this gap in its float32 arithmetic, not in its formula;
   - the float32 floor: a per-image total of ~1e4 nats has a float32 spacing of ~1e-3, and
     per-pixel values of ~20 nats ~2e-6 each; the exact formula evaluated in float32 is
     shown as that floor, which is where arvae's error sits.

   A third column, ``--sharpen`` (default 3), lowers every log-scale of the trained output by
   that much: a synthetic stand-in for a longer-trained model with narrow components, where
   the fallback is hit often.

b. Training speed side by side. The peer's ``PixelCNN`` + its loss (summed over the batch;
   Adam at its default lr 2e-4, as in its main.py) and arvae's ``PixelCNNpp``
   (``training_loss``, the batch mean, as ``training_step`` runs it; Adam from
   ``configure_optimizers``),
   both at ``--nr-resnet`` blocks x ``--nr-filters`` filters, 10 logistics, dropout
   ``--dropout``, on ``--batch`` real 32x32 RGB images. One training step = forward, loss,
   backward, Adam step (arvae's Lightning step also takes one global gradient norm; not
   here). After ``--warmup-steps`` untimed steps each, the two alternate in ``--rounds``
   interleaved rounds (order swapped every round) of ``--seconds / --rounds`` seconds each
   (at least one step; ``cpu_bench.interleaved``, as in the benchmark table); images/s is the
   median over the rounds. Each precision (fp32, and
   ``torch.autocast("cpu", dtype=torch.bfloat16)`` around forward and loss) is timed against
   the peer at the same precision. Under autocast the peer's loss runs on its bf16 output as
   its code has it (partly promoted to fp32 by its fp32 data); arvae's likelihood casts the
   parameters to fp32 first.

   The two networks have the same architecture and parameter count; they differ in details
   that cost little time: the peer drops whole channels (``Dropout2d``), arvae single units;
   the peer's 1x1 layers are ``Linear`` on permuted tensors, arvae's 1x1 convolutions; the
   peer's transposed convolutions are weight-normalized over their input channels
   (``weight_norm``'s default dim 0), arvae's over the output channels; arvae runs its
   data-dependent init once before timing (the peer's port has none).

Command (the full benchmark). At the default size (53.7M parameters in both) one training
step of batch 16 takes tens of seconds on 2 CPU cores (an estimate from a ~1 s forward pass
of one image), so a round of ``--seconds / --rounds`` is one step or more, the check's
``--train-steps`` cost about as much as the timing, and the whole run takes on the order of
half an hour there::

    python benchmarks/pixelcnnpp_peer.py --peer /tmp/pixel-cnn-pp \\
        --data /work/shared/data/cifar10_train_first4000_exact.npz
    # tiny smoke run
    python benchmarks/pixelcnnpp_peer.py --peer /tmp/pixel-cnn-pp --nr-resnet 1 \\
        --nr-filters 16 --batch 4 --seconds 3 --threads 1

with the peer checked out outside this repository, e.g.
``git clone https://github.com/pclucas14/pixel-cnn-pp /tmp/pixel-cnn-pp``. Without ``--data``
the CIFAR-10 sample shipped in ``datamodules/assets`` is used (400 training images).

No code of the peer is copied here: its ``model.py``, ``layers.py`` and ``utils.py`` are
imported at run time from ``--peer``, its checkout left untouched. It was written for an old
PyTorch and for CUDA, so :func:`load_peer` works around three things at run time:
``utils.py`` has one Python-2 statement (``print e``, in ``load_part_of_model``, which is never
called here) that is a SyntaxError on Python 3, so the file is read and compiled in memory with
that statement written as the call ``print(e)``; its loss builds a helper tensor with
``.cuda()``, so while it runs on CPU tensors ``torch.Tensor.cuda`` is made the identity
(:func:`peer_on_cpu`), then restored; the deprecation warnings of ``torch.nn.utils.weight_norm``
and ``F.tanh`` / ``F.sigmoid`` are silenced. Its ``Variable`` calls are no-ops on torch 2.x.
"""

import argparse
import contextlib
import itertools
import math
import os
import re
import subprocess
import sys
import time
import types
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch
from cpu_bench import cpu_flags, interleaved
from einops import rearrange
from torch import nn

from datamodules.cifar10 import load_sample
from lightning_modules import PixelCNNpp
from lightning_modules.backbone import PixelCNNppNet
from lightning_modules.likelihoods import DiscretizedLogisticMixture

PEER_MODULES = ("utils", "layers", "model")
PEER_FALLBACK_BELOW = 1e-5  # the peer's cdf_delta threshold of its density approximation
GOAL_NATS = 1e-3  # per image
LEVELS = 256
READING = """\
Reading. 'Totals' are the per-image float32 sums the two libraries return: their rounding
alone is about the float32 spacing above. The other rows sum per-pixel float32 values in
float64. 'f64 exact' evaluates the exact bin masses in float64 from the peer's raw output.
- Two float32 effects in the peer: (1) below a component's float32 cdf_delta of 1e-5 it
  scores density x bin width instead of the mass (the fallback rows); (2) above it, it
  subtracts two float32 sigmoids near 0.5 (broad components, e.g. a fresh network), which
  loses digits: ~1e-5 nats per term, and these do not average out over an image (its
  pixels repeat values, and a fresh network gives nearly the same parameters everywhere):
  up to ~1e-2 nats per image. The peer's own loss run in float64 agrees with the exact
  reference off the fallback pixels: its formula is right, and the gaps are its float32
  subtraction and its fallback.
- arvae computes every mass exactly (no subtraction, no fallback); its remaining error is
  the float32 floor, the same as the exact formula evaluated in float32 (per-pixel log p of
  ~20 nats has a float32 spacing of ~2e-6, x 1024 pixels per image)."""


# --------------------------------------------------------------------------- the peer
def load_peer(path: Path) -> types.SimpleNamespace:
    """Import the peer's modules from its checkout; returns ``PixelCNN`` and the loss.

    The three modules import each other by their bare names (``from utils import *``), so
    they are put in ``sys.modules`` under those names while they load, and the previous
    entries (if any) are restored afterwards. ``utils.py`` is compiled from its text with
    its one Python-2 ``print x`` statement rewritten as a call (see the module docstring)."""
    path = path.resolve()
    for name in PEER_MODULES:
        if not (path / f"{name}.py").is_file():
            raise SystemExit(f"--peer {path}: no {name}.py (a pixel-cnn-pp checkout?)")
    saved = {name: sys.modules.pop(name) for name in PEER_MODULES if name in sys.modules}
    sys.path.insert(0, str(path))
    try:
        utils_file = path / "utils.py"
        source = re.sub(
            r"^(\s*)print (\w+)\s*$", r"\1print(\2)", utils_file.read_text(), flags=re.M
        )
        utils = types.ModuleType("utils")
        utils.__file__ = str(utils_file)
        sys.modules["utils"] = utils
        exec(compile(source, str(utils_file), "exec"), utils.__dict__)
        import model as peer_model  # the peer's model.py, found on sys.path
    finally:
        sys.path.remove(str(path))
        for name in PEER_MODULES:
            sys.modules.pop(name, None)
        sys.modules.update(saved)
    try:
        commit = subprocess.run(
            ["git", "-C", str(path), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return types.SimpleNamespace(
        PixelCNN=peer_model.PixelCNN,
        loss=utils.discretized_mix_logistic_loss,
        sample=utils.sample_from_discretized_mix_logistic,
        path=path,
        commit=commit,
    )


@contextlib.contextmanager
def peer_on_cpu():
    """While the peer's loss runs on CPU tensors: its ``torch.zeros(...).cuda()`` helper
    stays on the CPU (``torch.Tensor.cuda`` is the identity), and its deprecated calls are
    quiet. The original attribute is restored on exit."""
    had_own = "cuda" in torch.Tensor.__dict__
    original = torch.Tensor.__dict__.get("cuda")
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        if had_own:
            torch.Tensor.cuda = original
        else:
            del torch.Tensor.cuda


def build_peer(peer, args) -> nn.Module:
    """The peer's PixelCNN at the benchmark's size; its Dropout2d rate set to ``--dropout``
    (the peer hard-codes 0.5)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.nn.utils.weight_norm is deprecated
        model = peer.PixelCNN(
            nr_resnet=args.nr_resnet,
            nr_filters=args.nr_filters,
            nr_logistic_mix=args.nr_mix,
            input_channels=3,
        )
    for m in model.modules():
        if isinstance(m, nn.Dropout2d):
            m.p = args.dropout
    return model


def peer_forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The peer's forward; it caches its constant-1 padding channel at the first batch's
    size, so the cache is dropped when the batch size changes."""
    pad = model.init_padding
    if pad is not None and pad.shape[0] != x.shape[0]:
        model.init_padding = None
    return model(x)


def peer_input(levels: torch.Tensor) -> torch.Tensor:
    """Levels 0..255 -> the peer's data scale, ToTensor then (x - 0.5) * 2, in [-1, 1]."""
    return (levels.float() / 255.0 - 0.5) * 2.0


# --------------------------------------------------------------------------- layouts
def peer_to_arvae(peer_out: torch.Tensor, n_mix: int) -> torch.Tensor:
    """The peer's mixture parameters (B, 10n, H, W) in arvae's ``DiscretizedLogisticMixture``
    layout (same shape). Only the order of the channels changes; both squash the coefficients
    with tanh and clamp the log-scales below at -7 inside the likelihood, so the raw values
    carry over as they are.

    Peer (``discretized_mix_logistic_loss``, channels after its NCHW -> NHWC permute): the n
    logits ``k``, then the other 9n channels viewed as (colour c, 3n) and, within a colour,
    [means, log-scales, coefficients] of n each: channel ``n + 3n c + g n + k``, g = 0 mean,
    1 log-scale, 2 coefficient. Its coefficient "colour" slot c is which coefficient: slot 0
    couples G to R (alpha), slot 1 B to R (beta), slot 2 B to G (gamma).

    arvae: logits ``k``, then grouped by parameter, not by colour: means ``n + c n + k``,
    log-scales ``4n + c n + k``, coefficients ``7n + j n + k`` (j = alpha, beta, gamma),
    i.e. channel ``n + 3n g + c n + k``. So the conversion swaps the colour and parameter
    axes of the 9n channels; the logits stay in front."""
    n = n_mix
    if peer_out.shape[1] != 10 * n:
        raise ValueError(f"expected {10 * n} channels (RGB, n_mix={n}), got {peer_out.shape[1]}")
    rest = rearrange(peer_out[:, n:], "b (c g k) h w -> b (g c k) h w", c=3, g=3, k=n)
    return torch.cat([peer_out[:, :n], rest], dim=1)


# --------------------------------------------------------------------------- scoring
def peer_log_prob_images(peer, levels: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """log p(x) per image (float32, as the peer sums it): its loss on one image at a time."""
    x = peer_input(levels)
    with peer_on_cpu():
        return torch.stack([-peer.loss(x[i : i + 1], out[i : i + 1]) for i in range(len(x))])


def peer_log_prob_pixels(peer, levels: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """log p per pixel (B, H, W), float32: the peer's loss (a sum over everything it gets)
    vmapped over single pixels, each a 1x1 image (the loss is local to a pixel)."""
    b, _, h, w = levels.shape
    x = rearrange(peer_input(levels), "b c h w -> (b h w) 1 c 1 1")
    p = rearrange(out, "b c h w -> (b h w) 1 c 1 1")
    with peer_on_cpu():
        nll = torch.func.vmap(peer.loss)(x, p)
    return -nll.view(b, h, w)


def arvae_log_prob_pixels(
    lik: DiscretizedLogisticMixture, params: torch.Tensor, levels: torch.Tensor
) -> torch.Tensor:
    """log p per pixel (B, H, W), float32: arvae's log_prob on every pixel as a 1x1 image."""
    b, _, h, w = levels.shape
    flat = lik.log_prob(
        rearrange(params, "b c h w -> (b h w) c 1 1"),
        rearrange(levels, "b c h w -> (b h w) c 1 1"),
    )
    return flat.view(b, h, w)


def log_diff_exp(big: torch.Tensor, small: torch.Tensor) -> torch.Tensor:
    """log(exp(big) - exp(small)) for big > small."""
    return big + torch.log(-torch.expm1(small - big))


def reference_log_prob(
    peer_out: torch.Tensor, levels: torch.Tensor, n_mix: int, dtype=torch.float64
) -> torch.Tensor:
    """log p per pixel (B, H, W) in ``dtype`` (float64: the reference; float32: the floor any
    float32 evaluation of the exact masses meets), straight from the peer's layout (so it
    checks :func:`peer_to_arvae` too): exact bin masses. An interior bin's mass is the difference of
    the two logistic CDFs, taken in the tail it lies in (lower CDFs below the mean, upper
    ones above) and in log space, so nothing cancels or underflows; level 0 takes the whole
    lower tail, level 255 the upper one. Log-scales clamped at -7, coefficients tanh'd."""
    n = n_mix
    out = peer_out.to(dtype)
    groups = rearrange(out[:, n:], "b (c g k) h w -> g b c k h w", c=3, g=3, k=n)
    mu, log_s, coef = groups[0], groups[1].clamp(min=-7.0), torch.tanh(groups[2])
    y = (levels.to(dtype) * (2.0 / (LEVELS - 1)) - 1.0)[:, :, None]  # (B, 3, 1, H, W)
    mean = torch.stack(
        [
            mu[:, 0],
            mu[:, 1] + coef[:, 0] * y[:, 0],
            mu[:, 2] + coef[:, 1] * y[:, 0] + coef[:, 2] * y[:, 1],
        ],
        dim=1,
    )
    half_bin = 1.0 / (LEVELS - 1)
    inv_s = torch.exp(-log_s)
    upper = (y + half_bin - mean) * inv_s
    lower = (y - half_bin - mean) * inv_s
    logsig = torch.nn.functional.logsigmoid
    below = log_diff_exp(logsig(upper), logsig(lower))  # sigmoid(upper) - sigmoid(lower)
    above = log_diff_exp(logsig(-lower), logsig(-upper))  # the same mass via the upper tail
    interior = torch.where(lower < 0, below, above)
    level = levels.long()[:, :, None]
    log_bin = torch.where(
        level == 0, logsig(upper), torch.where(level == LEVELS - 1, logsig(-lower), interior)
    )
    log_mix = torch.log_softmax(out[:, :n], dim=1) + log_bin.sum(1)
    return torch.logsumexp(log_mix, dim=1)


def peer_fallback_terms(
    lik: DiscretizedLogisticMixture, params: torch.Tensor, levels: torch.Tensor
) -> torch.Tensor:
    """(B, 3, n, H, W) bool: the (sub-pixel, component) terms the peer scores with its
    density approximation, by its criterion as it evaluates it, in float32: an interior level
    whose sigmoid((y - m + h) / s) - sigmoid((y - m - h) / s) is not above 1e-5."""
    _, means, log_scales, coeffs = lik.split(params)
    y = lik.network_input(levels.float())[:, :, None]
    mean = torch.stack(
        [
            means[:, 0],
            means[:, 1] + coeffs[:, 0] * y[:, 0],
            means[:, 2] + coeffs[:, 1] * y[:, 0] + coeffs[:, 2] * y[:, 1],
        ],
        dim=1,
    )
    centred = y - mean
    inv_s = torch.exp(-log_scales)
    half_bin = 1.0 / (LEVELS - 1)
    delta = torch.sigmoid(inv_s * (centred + half_bin)) - torch.sigmoid(
        inv_s * (centred - half_bin)
    )
    interior = ((levels > 0) & (levels < LEVELS - 1))[:, :, None]
    return interior & ~(delta > PEER_FALLBACK_BELOW)


def compare(peer, lik, peer_out: torch.Tensor, levels: torch.Tensor, n_mix: int) -> dict:
    """Every figure of part a for one set of peer outputs."""
    params = peer_to_arvae(peer_out, n_mix)
    arvae_img = lik.log_prob(params, levels)
    peer_img = peer_log_prob_images(peer, levels, peer_out)
    arvae_pix = arvae_log_prob_pixels(lik, params, levels).double()
    peer_pix = peer_log_prob_pixels(peer, levels, peer_out).double()
    peer_pix64 = peer_log_prob_pixels(peer, levels.double(), peer_out.double())
    ref_pix = reference_log_prob(peer_out, levels, n_mix)
    ref32_pix = reference_log_prob(peer_out, levels, n_mix, torch.float32).double()
    fallback = peer_fallback_terms(lik, params, levels)
    fb_pix = fallback.any(dim=2).any(dim=1)  # (B, H, W)
    keep = (~fb_pix).double()

    def per_image(d: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return (d if mask is None else d * mask).sum((1, 2)).abs()

    d_pix = peer_pix - arvae_pix
    logp = ref_pix.sum((1, 2))
    return {
        "logp": float(logp.mean()),
        "bpd": float(-logp.mean() / (3 * levels.shape[2] * levels.shape[3] * math.log(2))),
        "ulp": float(np.spacing(np.float32(abs(float(logp.mean()))))),
        "img": (peer_img.double() - arvae_img.double()).abs(),
        "pix": per_image(d_pix),
        "pix_signed": d_pix.sum((1, 2)),
        "fb_terms": int(fallback.sum()),
        "terms": fallback.numel(),
        "fb_pixels": int(fb_pix.sum()),
        "pixels": fb_pix.numel(),
        "fb_images": int(fb_pix.flatten(1).any(1).sum()),
        "images": len(levels),
        "pix_excl": per_image(d_pix, keep),
        "pix_at_fb": per_image(d_pix, 1.0 - keep),
        "pixel_max_excl": float((d_pix.abs() * keep).max()),
        "pixel_max_at_fb": float((d_pix.abs() * (1.0 - keep)).max()),
        "arvae_ref": per_image(arvae_pix - ref_pix),
        "ref32_ref": per_image(ref32_pix - ref_pix),
        "peer_ref": per_image(peer_pix - ref_pix),
        "peer_ref_excl": per_image(peer_pix - ref_pix, keep),
        "peer64_ref": per_image(peer_pix64 - ref_pix),
        "peer64_ref_excl": per_image(peer_pix64 - ref_pix, keep),
        "peer_self": (peer_pix.sum((1, 2)) - peer_img.double()).abs(),
    }


def train_peer(peer, model, optimizer, batches, steps: int) -> list[float]:
    """``steps`` Adam steps of the peer on its own loss; returns the bits/dim per step."""
    model.train()
    bpd = []
    for step in range(steps):
        levels = batches[step % len(batches)]
        x = peer_input(levels)
        with peer_on_cpu():
            loss = peer.loss(x, peer_forward(model, x))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bpd.append(loss.item() / (levels.numel() * math.log(2)))
    return bpd


def check_part(args, peer, images: torch.Tensor) -> None:
    lik = DiscretizedLogisticMixture(args.nr_mix)
    n_check = min(args.check_images, len(images))
    check, rest = images[:n_check], images[n_check:]
    if len(rest) < args.batch:
        rest = images
    batches = [rest[i : i + args.batch] for i in range(0, len(rest) - args.batch + 1, args.batch)]

    torch.manual_seed(args.seed)
    model = build_peer(peer, args)
    cases = {}

    def outputs() -> torch.Tensor:
        model.eval()
        with torch.no_grad():
            return peer_forward(model, peer_input(check))

    started = time.perf_counter()
    cases["fresh"] = outputs()
    optimizer = torch.optim.Adam(model.parameters(), lr=args.train_lr)
    bpd = train_peer(peer, model, optimizer, batches, args.train_steps)
    cases[f"trained {args.train_steps}"] = trained = outputs()
    if args.sharpen:
        sharp = trained.clone()
        n = args.nr_mix
        view = sharp[:, n:].view(len(sharp), 3, 3, n, *sharp.shape[2:])  # (b, c, g, k, h, w)
        view[:, :, 1] -= args.sharpen  # g = 1: the log-scales
        cases[f"trained, log s -{args.sharpen:g}"] = sharp
    results = {name: compare(peer, lik, out, check, args.nr_mix) for name, out in cases.items()}
    elapsed = time.perf_counter() - started

    print(f"\n== a. likelihood agreement: {n_check} CIFAR-10 images, log p(x) per image in nats")
    print(
        f"peer trained {args.train_steps} Adam steps (lr {args.train_lr:g}, batch {args.batch},"
        f" dropout {args.dropout:g}) on other images: "
        + (f"{bpd[0]:.3f} -> {bpd[-1]:.3f} bits/dim" if bpd else "no steps")
        + f"; outputs in eval mode; {elapsed:.1f} s"
    )
    if args.sharpen:
        print(
            f"'log s -{args.sharpen:g}': the trained output with every log-scale lowered by"
            f" {args.sharpen:g} (synthetic: narrow components, as after long training)"
        )

    def mx(key):
        return lambda r: f"{float(r[key].max()):.2e}"

    def mean(key):
        return lambda r: f"{float(r[key].mean()):.2e}"

    def goal(key):
        return lambda r: "met" if float(r[key].max()) <= GOAL_NATS else "NOT met"

    rows: list[tuple[str, Callable[[dict], str]]] = [
        ("mean log p(x) (float64 reference)", lambda r: f"{r['logp']:.2f}"),
        ("  = bits/dim", lambda r: f"{r['bpd']:.4f}"),
        ("float32 spacing at that |log p|", lambda r: f"{r['ulp']:.1e}"),
        ("|peer - arvae|, totals as returned: max", mx("img")),
        ("  mean", mean("img")),
        ("|peer - arvae|, per-pixel values summed in f64: max", mx("pix")),
        ("  mean", mean("pix")),
        ("  mean of the signed peer - arvae", mean("pix_signed")),
        ("peer fallback terms (sub-pixel x component)", lambda r: f"{r['fb_terms']}/{r['terms']}"),
        ("pixels with a fallback term", lambda r: f"{r['fb_pixels']}/{r['pixels']}"),
        ("images with a fallback pixel", lambda r: f"{r['fb_images']}/{r['images']}"),
        ("|peer - arvae| without fallback pixels: max", mx("pix_excl")),
        ("  mean", mean("pix_excl")),
        ("|peer - arvae| over fallback pixels only: max", mx("pix_at_fb")),
        ("  mean", mean("pix_at_fb")),
        ("max |peer - arvae| of one pixel, no fallback", lambda r: f"{r['pixel_max_excl']:.2e}"),
        ("max |peer - arvae| of one fallback pixel", lambda r: f"{r['pixel_max_at_fb']:.2e}"),
        ("|peer per-pixel sum - peer total|: max", mx("peer_self")),
        ("|arvae - f64 exact|: max", mx("arvae_ref")),
        ("|exact formula in float32 - f64 exact|: max", mx("ref32_ref")),
        ("|peer - f64 exact|: max", mx("peer_ref")),
        ("|peer - f64 exact| without fallback pixels: max", mx("peer_ref_excl")),
        ("|peer's loss run in float64 - f64 exact|: max", mx("peer64_ref")),
        ("  without fallback pixels: max", mx("peer64_ref_excl")),
        (f"goal {GOAL_NATS:g}/image: peer ~ arvae, totals", goal("img")),
        ("  peer ~ arvae, f64 sums, no fallback pixels", goal("pix_excl")),
        ("  arvae ~ f64 exact", goal("arvae_ref")),
        ("  exact formula in float32 ~ f64 exact", goal("ref32_ref")),
    ]
    table(
        ["per image, nats", *results],
        [[name] + [f(r) for r in results.values()] for name, f in rows],
    )
    print(READING)


# --------------------------------------------------------------------------- speed
def speed_part(args, peer, images: torch.Tensor) -> None:
    n_batches = max(1, len(images) // args.batch)
    batches = [images[i * args.batch : (i + 1) * args.batch] for i in range(n_batches)]
    if len(batches[0]) < args.batch:
        raise SystemExit(f"--batch {args.batch}: only {len(images)} images")

    torch.manual_seed(args.seed)
    peer_model = build_peer(peer, args).train()
    peer_opt = torch.optim.Adam(peer_model.parameters(), lr=2e-4)  # the peer's default lr
    torch.manual_seed(args.seed)
    arvae = PixelCNNpp(
        pixelcnn=partial(
            PixelCNNppNet, nr_resnet=args.nr_resnet, channels=args.nr_filters, dropout=args.dropout
        ),
        likelihood=DiscretizedLogisticMixture(args.nr_mix),
        image_shape=(3, 32, 32),
        lr=2e-4,  # the peer's default, so the last bits/dim columns compare
    )
    arvae.initialize_from(batches[0])  # what training does once; the peer has none
    arvae.train()
    arvae_opt = arvae.configure_optimizers()

    def count(m: nn.Module) -> int:
        return sum(p.numel() for p in m.parameters())

    feeds = {name: itertools.cycle(batches) for name in ("peer", "arvae")}  # each its own
    last = {}

    def peer_step(bf16: bool) -> None:
        levels = next(feeds["peer"])
        x = peer_input(levels)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16), peer_on_cpu():
            loss = peer.loss(x, peer_forward(peer_model, x))
        peer_opt.zero_grad(set_to_none=True)
        loss.backward()
        peer_opt.step()
        last["peer"] = loss.item() / (levels.numel() * math.log(2))

    def arvae_step(bf16: bool) -> None:
        levels = next(feeds["arvae"])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, _ = arvae.training_loss(levels)
        arvae_opt.zero_grad(set_to_none=True)
        loss.backward()
        arvae_opt.step()
        last["arvae"] = loss.item() / (levels[0].numel() * math.log(2))

    print(
        f"\n== b. training speed: {args.nr_resnet} blocks x {args.nr_filters} filters,"
        f" {args.nr_mix} logistics, dropout {args.dropout:g}, batch {args.batch}, 32x32 RGB"
    )
    print(
        f"parameters: peer {count(peer_model):,}, arvae {count(arvae.net):,};"
        f" {args.warmup_steps} warm-up steps each, then {args.rounds} interleaved rounds of"
        f" {args.seconds / args.rounds:.1f} s per implementation and precision"
    )
    rows = []
    for precision in args.precisions:
        bf16 = precision == "bf16"
        steps = {"peer": partial(peer_step, bf16), "arvae": partial(arvae_step, bf16)}
        timed = interleaved(steps, args.seconds, args.rounds, args.warmup_steps, "cpu")
        images = {n: [r * args.batch for r in t["rates"]] for n, t in timed.items()}
        med = {n: t["steps_per_s"] * args.batch for n, t in timed.items()}
        for name in steps:
            rows.append(
                [
                    precision,
                    name,
                    f"{med[name]:.2f}",
                    f"{min(images[name]):.2f}-{max(images[name]):.2f}",
                    str(timed[name]["steps"]),
                    f"{args.batch / med[name]:.2f}",
                    f"{last[name]:.3f}",
                    f"{med['arvae'] / med['peer']:.2f}" if name == "arvae" else "",
                ]
            )
    table(
        [
            "precision",
            "impl",
            "images/s (median)",
            "min-max",
            "steps",
            "s/step",
            "last bits/dim",
            "arvae/peer",
        ],
        rows,
    )


# --------------------------------------------------------------------------- plumbing
def table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    print(line.format(*header))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print(line.format(*row))


def load_images(path: Path | None) -> tuple[torch.Tensor, str]:
    """(N, 3, 32, 32) float32 levels 0..255 from an npz's ``train`` array (uint8 NHWC), or
    from the shipped sample."""
    if path is None:
        array, where = load_sample()["train"], "shipped CIFAR-10 sample (datamodules/assets)"
    else:
        with np.load(path) as f:
            if "train" not in f.files:
                raise SystemExit(f"--data {path}: no array 'train' (has {f.files})")
            array, where = f["train"], str(path)
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[1:] != (32, 32, 3):
        raise SystemExit(f"{where}: need uint8 (N, 32, 32, 3), got {array.dtype} {array.shape}")
    images = torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2).float()
    return images.contiguous(), f"{where}: {len(images)} training images"


def machine() -> str:
    name = None
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        name = next(
            (
                v.strip()
                for k, _, v in (ln.partition(":") for ln in out.splitlines())
                if k.strip() == "Model name"
            ),
            None,
        )
    except (OSError, subprocess.CalledProcessError):
        pass
    cpu, flags = cpu_flags()
    bf16 = (
        "native bf16 (avx512_bf16/amx)"
        if flags & {"avx512_bf16", "amx_bf16"}
        else ("no native bf16 (emulated)")
    )
    cores = len(os.sched_getaffinity(0))
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    return f"CPU: {name or cpu}, {cores} cores available, {bf16}; load average {load}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--peer", type=Path, required=True, help="pixel-cnn-pp checkout")
    p.add_argument("--data", type=Path, help="npz with 'train' uint8 (N, 32, 32, 3)")
    p.add_argument("--nr-resnet", type=int, default=5)
    p.add_argument("--nr-filters", type=int, default=160)
    p.add_argument("--nr-mix", type=int, default=10)
    p.add_argument("--dropout", type=float, default=0.5)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seconds", type=float, default=60.0, help="timed s per impl and precision")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup-steps", type=int, default=2)
    p.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--check-images", type=int, default=32)
    p.add_argument("--train-steps", type=int, default=20)
    p.add_argument("--train-lr", type=float, default=1e-3)
    p.add_argument("--sharpen", type=float, default=3.0, help="0: no synthetic column")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep-denormals", action="store_true", help="default: flush to zero")
    only = p.add_mutually_exclusive_group()
    only.add_argument("--check-only", action="store_true")
    only.add_argument("--speed-only", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(not args.keep_denormals)
    peer = load_peer(args.peer)
    images, where = load_images(args.data)
    print(f"python {sys.version.split()[0]}  torch {torch.__version__}")
    print(machine())
    print(f"torch threads: {torch.get_num_threads()}, flush denormals: {not args.keep_denormals}")
    print(f"peer: {peer.path} (commit {peer.commit}), imported at run time")
    print(f"data: {where}")
    if not args.speed_only:
        check_part(args, peer, images)
    if not args.check_only:
        speed_part(args, peer, images)


if __name__ == "__main__":
    main()
