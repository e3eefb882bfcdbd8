"""The small convolutional encoder and decoder of PixelVAE appendix E.1 (28x28 images)."""

import torch
import torch.nn.functional as F
from einops.layers.torch import Rearrange
from torch import nn


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1)


def _up(cin: int, cout: int) -> nn.ConvTranspose2d:
    """3x3 stride-2 transposed convolution that exactly doubles height and width."""
    return nn.ConvTranspose2d(cin, cout, 3, stride=2, padding=1, output_padding=1)


class PadTo8(nn.Module):
    """Zero-pad 7x7 feature maps to 8x8 (bottom/right), as appendix E.1 does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, (0, 1, 0, 1))


class CropTo7(nn.Module):
    """Crop 8x8 feature maps to 7x7 (top-left), the decoder's mirror of PadTo8."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, :7, :7]


def _relu_after_each(*layers: nn.Module) -> list[nn.Module]:
    return [m for layer in layers for m in (layer, nn.ReLU())]


class MNISTEncoder(nn.Sequential):
    """x (B, C, 28, 28) -> 2 x latent_dim numbers (mean and log-std of q(z|x))."""

    def __init__(self, latent_dim: int, in_channels: int = 1) -> None:
        super().__init__(
            *_relu_after_each(
                _conv(in_channels, 32), _conv(32, 32, 2), _conv(32, 32), _conv(32, 64, 2)
            ),
            PadTo8(),
            *_relu_after_each(
                _conv(64, 64), _conv(64, 64, 2), _conv(64, 64), _conv(64, 64), _conv(64, 64)
            ),
            nn.Flatten(),
            nn.Linear(4 * 4 * 64, 2 * latent_dim),
        )


class MNISTDecoder(nn.Sequential):
    """z (B, latent_dim) -> feature map (B, 32, 28, 28) for the PixelCNN layers to condition on."""

    out_channels = 32

    def __init__(self, latent_dim: int) -> None:
        super().__init__(
            nn.Linear(latent_dim, 4 * 4 * 64),
            Rearrange("b (c h w) -> b c h w", c=64, h=4, w=4),
            nn.ReLU(),
            *_relu_after_each(_conv(64, 64), _conv(64, 64), _up(64, 64), _conv(64, 64)),
            CropTo7(),
            *_relu_after_each(_up(64, 32), _conv(32, 32), _up(32, 32), _conv(32, 32)),
        )
