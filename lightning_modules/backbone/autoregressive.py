"""Ancestral sampling of an autoregressive image model, pixel by pixel in raster order."""

from collections.abc import Callable

import torch


@torch.no_grad()
def sample_autoregressive(
    params_fn: Callable[[torch.Tensor], torch.Tensor],
    sample_fn: Callable[[torch.Tensor], torch.Tensor],
    shape: tuple[int, ...],
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Fill an all-zero (B, C, H, W) canvas one position, then one channel, at a time.

    ``params_fn(x)`` returns distribution parameters for every position given the canvas;
    ``sample_fn(params)`` draws a full canvas from them, of which only the current position
    is kept. Correct only if params_fn is causal, which the masks guarantee.
    """
    x = torch.zeros(shape, device=device)
    _, channels, height, width = shape
    for i in range(height):
        for j in range(width):
            for c in range(channels):
                x[:, c, i, j] = sample_fn(params_fn(x))[:, c, i, j].to(x.dtype)
    return x
