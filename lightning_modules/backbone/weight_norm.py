"""Weight normalization with data-dependent initialization (Salimans & Kingma 2016).

VLAE (appendix A) weight-normalizes every layer and initializes it from data: one forward
pass over a batch sets each layer's gain and bias so that its outputs start with zero mean
and unit variance per channel. Without batch norm, this is what keeps the activations of a
deep ELU network at a sane scale from the first step.
"""

from collections.abc import Callable

import torch
from torch import nn
from torch.nn.utils import parametrize

from .masked_conv import HorizontalConv2d, MaskedConv2d, VerticalConv2d

LAYERS = (nn.Conv2d, nn.Linear)
MASKED = (MaskedConv2d, HorizontalConv2d, VerticalConv2d)


def weight_norm_(
    module: nn.Module, skip: tuple[nn.Module, ...] = (), layers: tuple[type, ...] = LAYERS
) -> nn.Module:
    """Weight-normalize every layer of the ``layers`` types in ``module`` in place (weight =
    g * v / ||v|| per output channel; masks of masked layers apply after, so masked taps stay
    zero), except the layers in ``skip`` and their children (e.g. a zero-initialized head,
    whose norm is zero). Call after initialization: g starts at ||v||, leaving the initial
    weights unchanged."""
    skipped = {id(m) for s in skip for m in s.modules()}
    for m in module.modules():
        if (
            isinstance(m, layers)
            and id(m) not in skipped
            and not parametrize.is_parametrized(m, "weight")
        ):
            nn.utils.parametrizations.weight_norm(m)
    return module


def weight_norm_masked_(module: nn.Module) -> nn.Module:
    """Weight norm on the masked layers only (PixelVAE appendix E.2: batch norm in ordinary
    layers, weight norm in masked ones)."""
    return weight_norm_(module, layers=MASKED)


def _channel_dims(m: nn.Module, out: torch.Tensor) -> list[int]:
    """Every dimension of ``out`` but the output-channel one."""
    channel = 1 if isinstance(m, nn.Conv2d) else out.dim() - 1
    return [d for d in range(out.dim()) if d != channel]


def channel_stats(out: torch.Tensor, dims: list[int], eps: float = 1e-6):
    """Per-channel mean and std of a layer's output over ``dims``; a channel that is constant
    on the batch (std < eps: a stream that sees only padding, e.g. the first row of a
    PixelCNN++ at a coarse resolution) keeps its scale, as dividing by ~0 would blow its
    gain up by 1e6 and overflow the first update."""
    mean = out.mean(dims, keepdim=True)
    std = out.std(dims, keepdim=True, correction=0)
    return mean, torch.where(std < eps, torch.ones_like(std), std)


@torch.no_grad()
def data_dependent_init_(module: nn.Module, run: Callable[[], object], eps: float = 1e-6) -> int:
    """Initialize every weight-normalized layer of ``module`` from data, in one pass.

    ``run()`` performs a forward pass on a batch. Each layer, on its first call, rescales its
    gain g and bias b so that its output becomes (out - mean) / std per channel and passes the
    normalized output on, so later layers are initialized on the statistics they will see.
    A layer called several times (tied weights) is initialized on its first call only.
    Returns the number of layers initialized.
    """
    done: set[int] = set()

    def hook(m: nn.Module, inputs, out: torch.Tensor) -> torch.Tensor | None:
        if id(m) in done:
            return None
        done.add(id(m))
        mean, std = channel_stats(out, _channel_dims(m, out), eps)
        g = m.parametrizations.weight.original0
        g.div_(std.reshape(g.shape))
        if m.bias is not None:
            m.bias.sub_(mean.flatten()).div_(std.flatten())
        return (out - mean) / std

    handles = [
        m.register_forward_hook(hook)
        for m in module.modules()
        if isinstance(m, LAYERS) and parametrize.is_parametrized(m, "weight")
    ]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return len(done)
