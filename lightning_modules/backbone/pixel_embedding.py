"""The pixel embedding input layer of PixelVAE appendix E.2 (8-bit images)."""

import torch
from einops import rearrange
from torch import nn


class PixelEmbedding(nn.Module):
    """Each channel's value 0..n-1 -> a learned ``dim``-vector, output (B, dim * C, H, W).

    Output channel ``e * C + c`` belongs to input channel (colour) c, which is the colour
    group masked convolutions assign to it (``k % n_colors``): the embedding keeps R, G and B
    apart for the channel masks of the first PixelCNN layer.
    """

    def __init__(self, n_values: int = 256, dim: int = 48) -> None:
        super().__init__()
        self.n_values = n_values
        self.embed = nn.Embedding(n_values, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rearrange(self.embed(x.long()), "b c h w e -> b (e c) h w")
