"""Masked convolutions: the causal building block of every PixelCNN.

Pixels are ordered in raster order (row by row, left to right) and, within a pixel, by
colour group (R -> G -> B for RGB). Mask "A" hides the current pixel's own group and later
groups (first layer: never see what you predict); mask "B" also shows the own group
(later layers: the own feature depends only on earlier inputs already).

Channels are assigned to colour groups by ``channel % n_groups``, so splitting a feature
map into halves (as the gated activation does) keeps every channel in its group as long
as the half size is a multiple of ``n_groups``.
"""

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

MaskType = Literal["A", "B"]


def causal_mask(
    out_channels: int,
    in_channels: int,
    kernel_size: tuple[int, int],
    center: tuple[int, int],
    mask_type: MaskType,
    n_groups: int = 1,
) -> torch.Tensor:
    """0/1 mask (out, in, kh, kw): taps after ``center`` in raster order are zero, and at
    ``center`` itself output group g sees input groups < g (A) or <= g (B)."""
    kh, kw = kernel_size
    ci, cj = center
    mask = torch.ones(out_channels, in_channels, kh, kw)
    mask[:, :, ci, cj + 1 :] = 0
    mask[:, :, ci + 1 :, :] = 0
    out_group = torch.arange(out_channels)[:, None] % n_groups
    in_group = torch.arange(in_channels)[None, :] % n_groups
    visible = in_group < out_group if mask_type == "A" else in_group <= out_group
    mask[:, :, ci, cj] = visible.float()
    return mask


class MaskedConv2d(nn.Conv2d):
    """Square k x k masked convolution with 'same' padding (the original PixelCNN layer)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        mask_type: MaskType,
        n_groups: int = 1,
    ) -> None:
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        super().__init__(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        c = kernel_size // 2
        mask = causal_mask(
            out_channels, in_channels, (kernel_size, kernel_size), (c, c), mask_type, n_groups
        )
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.mask, self.bias, padding=self.padding)


class HorizontalConv2d(nn.Conv2d):
    """1 x (k//2 + 1) convolution over the current row, left of and at the current pixel.

    Only the rightmost tap (the current pixel) is masked, by colour group; no compute is
    spent on the always-zero right half of a square mask.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        mask_type: MaskType,
        n_groups: int = 1,
    ) -> None:
        width = kernel_size // 2 + 1
        super().__init__(in_channels, out_channels, (1, width))
        mask = causal_mask(
            out_channels, in_channels, (1, width), (0, width - 1), mask_type, n_groups
        )
        self.register_buffer("mask", mask, persistent=False)
        self.left_pad = width - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (self.left_pad, 0, 0, 0))
        return F.conv2d(x, self.weight * self.mask, self.bias)


class VerticalConv2d(nn.Conv2d):
    """(k//2 + 1) x k convolution over the current row and the rows above it.

    Its output at row i sees input rows <= i, so it must reach the horizontal stack only
    through :func:`shift_down` (then row i sees rows < i): that is what removes the blind spot
    without ever leaking the current row.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int) -> None:
        super().__init__(in_channels, out_channels, (kernel_size // 2 + 1, kernel_size))
        self.pad = (kernel_size // 2, kernel_size // 2, kernel_size // 2, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, self.pad))


def shift_down(x: torch.Tensor) -> torch.Tensor:
    """Move every row one down (zeros enter at the top): row i then holds row i - 1."""
    return F.pad(x, (0, 0, 1, 0))[:, :, :-1, :]
