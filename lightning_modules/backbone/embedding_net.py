"""The embedding network f_w(X̂) of Kolesnikov & Lampert (ICML 2017, §3.3): "almost identical
to PixelCNN++ ... only one flow of residual blocks and [the convolutions'] outputs not
shifted, because there is no need to impose sequential dependency structure": every pixel
of X may see all of X̂. Its output is the spatial map that a conditional PixelCNN++ adds into
every gated block (``PixelCNNppNet``'s ``cond_map``).

Layout: a 3x3 convolution, then ``n_blocks`` gated ResNet blocks (concat_elu, dropout,
3x3 convolutions), down-sampling (a stride-2 3x3 convolution, ceil-halving odd sizes) after
the blocks numbered in ``down_after`` and up-sampling (2x nearest neighbour, then a 3x3
convolution) after those in ``up_after``, counted from 1. The Pyramid PixelCNN's embedding
(§4.2: 15 blocks, down after block 3, up after 9 and 12) thus turns a half-resolution X̂ into
a map at X's resolution; the Grayscale PixelCNN's keeps X̂'s. Weight-normalized throughout,
with PixelCNN++'s data-dependent init (:meth:`EmbeddingNet.init_from_data`).
"""

import torch
import torch.nn.functional as F
from torch import nn

from .pixelcnnpp import GatedResnet
from .weight_norm import data_dependent_init_, weight_norm_


class EmbeddingNet(nn.Module):
    """f_w: (B, in_channels, h, w) in [-1, 1] -> (B, channels, h * 2^(ups - downs), ...)."""

    model_given = 1  # in_channels: a model's ``embedding`` option holds the rest

    def __init__(
        self,
        in_channels: int,
        n_blocks: int = 15,
        channels: int = 100,
        down_after: list[int] = (3,),
        up_after: list[int] = (9, 12),
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        for name, after in (("down_after", down_after), ("up_after", up_after)):
            if any(not 1 <= b <= n_blocks for b in after):
                raise ValueError(f"{name} {list(after)}: block numbers run from 1 to {n_blocks}")
        if set(down_after) & set(up_after):
            raise ValueError(
                f"blocks {sorted(set(down_after) & set(up_after))} cannot be followed by both a"
                " down- and an up-sampling"
            )
        self.in_channels, self.channels = in_channels, channels
        self.down_after, self.up_after = tuple(down_after), tuple(up_after)
        self.scale = 2.0 ** (len(self.up_after) - len(self.down_after))
        self.first = nn.Conv2d(in_channels + 1, channels, 3, padding=1)  # + a constant-1 channel
        args = (channels, (3, 3), None, 0, dropout, 0, 0)
        self.blocks = nn.ModuleList([GatedResnet(*args) for _ in range(n_blocks)])
        self.resample = nn.ModuleDict()
        for b in self.down_after:
            self.resample[str(b)] = nn.Conv2d(channels, channels, 3, stride=2, padding=1)
        for b in self.up_after:
            self.resample[str(b)] = nn.Conv2d(channels, channels, 3, padding=1)
        weight_norm_(self)

    def forward(self, x_hat: torch.Tensor) -> torch.Tensor:
        h = torch.cat([x_hat, torch.ones_like(x_hat[:, :1])], dim=1)
        h = self.first(h)
        for number, block in enumerate(self.blocks, start=1):
            h = block(h, (), None, None)
            if number in self.up_after:
                h = F.interpolate(h, scale_factor=2, mode="nearest")
            if str(number) in self.resample:
                h = self.resample[str(number)](h)
        return h

    def init_from_data(self, x_hat: torch.Tensor) -> int:
        """Data-dependent init of every layer from one batch; returns the layers initialized."""
        return data_dependent_init_(self, lambda: self(x_hat))
