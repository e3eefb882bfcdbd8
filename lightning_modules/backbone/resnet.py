"""Pre-activation residual networks of PixelVAE appendix E.2 (encoders and decoders).

Each block is BN -> ELU -> 3x3 conv -> BN -> ELU -> 3x3 conv plus a shortcut. Downsampling
blocks use stride 2 in the second convolution; upsampling blocks use a subpixel convolution
(conv to 4x the channels, then pixel shuffle) in the first. Batch norm is used here, in the
ordinary layers; the masked layers of the PixelCNNs use weight norm instead (E.2). VLAE's
ResNet VAE uses the same blocks without batch norm (``batch_norm=False``), weight-normalized
everywhere instead (see ``weight_norm.py``).
"""

import math
from typing import Literal

import torch
from einops.layers.torch import Rearrange
from torch import nn

Resample = Literal["down", "up"] | None


class SubpixelConv2d(nn.Sequential):
    """k x k conv to 4x the channels, then a 2x pixel shuffle: a learned 2x upsampling."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, 4 * out_channels, kernel_size, padding=kernel_size // 2),
            nn.PixelShuffle(2),
        )


class ResBlock(nn.Module):
    """Pre-activation residual block with two 3x3 convolutions and optional 2x resampling."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        resample: Resample = None,
        batch_norm: bool = True,
    ) -> None:
        super().__init__()
        mid = in_channels if resample == "down" else out_channels
        if resample == "up":
            conv1: nn.Module = SubpixelConv2d(in_channels, mid, 3)
            shortcut: nn.Module = SubpixelConv2d(in_channels, out_channels, 1)
        else:
            conv1 = nn.Conv2d(in_channels, mid, 3, padding=1)
            stride = 2 if resample == "down" else 1
            same = in_channels == out_channels and resample is None
            shortcut = nn.Identity() if same else nn.Conv2d(in_channels, out_channels, 1, stride)
        norm = nn.BatchNorm2d if batch_norm else lambda _: nn.Identity()
        self.residual = nn.Sequential(
            norm(in_channels),
            nn.ELU(),
            conv1,
            norm(mid),
            nn.ELU(),
            nn.Conv2d(mid, out_channels, 3, stride=2 if resample == "down" else 1, padding=1),
        )
        self.shortcut = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut(x) + self.residual(x)


def resnet(
    widths: list[int], in_channels: int, resample: Resample, blocks: int, batch_norm: bool = True
) -> nn.Sequential:
    """Stages of residual blocks: the first stage keeps the resolution, every later stage
    starts with a block that resamples by 2 (``resample``), then ``blocks`` plain blocks.

    widths[s] is the channel count of stage s, so ``len(widths) - 1`` resamplings in all.
    """
    layers: list[nn.Module] = []
    channels = in_channels
    for stage, width in enumerate(widths):
        if stage > 0 or channels != width:
            layers.append(ResBlock(channels, width, resample if stage > 0 else None, batch_norm))
        layers += [ResBlock(width, width, batch_norm=batch_norm) for _ in range(blocks)]
        channels = width
    return nn.Sequential(*layers)


def to_vector(channels: int, size: int, out_features: int) -> nn.Sequential:
    """(B, channels, size, size) -> (B, out_features, 1, 1): the top, 1x1 latent level."""
    return nn.Sequential(
        nn.BatchNorm2d(channels),
        nn.ELU(),
        Rearrange("b c h w -> b (c h w)"),
        nn.Linear(channels * size * size, out_features),
        Rearrange("b d -> b d 1 1"),
    )


def from_vector(in_features: int, channels: int, size: int) -> nn.Sequential:
    """(B, in_features, 1, 1) -> (B, channels, size, size), the inverse of :func:`to_vector`."""
    return nn.Sequential(
        Rearrange("b d 1 1 -> b d"),
        nn.Linear(in_features, channels * size * size),
        Rearrange("b (c h w) -> b c h w", h=size, w=size),
    )


def n_halvings(size_from: int, size_to: int) -> int:
    """How many 2x resamplings lead from one power-of-two size to another."""
    ratio = max(size_from, size_to) / min(size_from, size_to)
    n = round(math.log2(ratio))
    if 2**n != ratio:
        raise ValueError(f"sizes {size_from} and {size_to} are not a power of two apart")
    return n
