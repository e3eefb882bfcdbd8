"""The small-receptive-field PixelCNN of VLAE (Chen et al. 2017, appendix A).

6 masked 3x3 convolutions of 12 filters in residual blocks, with 1x1 residual blocks
between them for capacity; the masked layers after the first may share one weight
("tied", as the paper does on static MNIST). Each pixel then depends on a small window of
the pixels before it (6 rows up), so the latent code has to carry the global structure.

The decoder's feature map is concatenated with the image (appendix A); a masked
convolution over the concatenation whose mask is lifted for the feature-map channels (they
are functions of z, not of the pixels) is the sum of a mask-A conv of the image and a conv
of the map. The map enters through a 1x1 conv, which keeps windowed sampling exact.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .masked_conv import MaskedConv2d
from .pixel_decoder import PixelDecoder
from .sampling_cache import Canvas, CausalConvAt, InputFn, PixelCache, Pointwise, at


class Residual1x1(nn.Module):
    """x + 1x1 conv(ELU(1x1 conv(ELU(x)))): per-pixel capacity without widening the window."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.ELU(), nn.Conv2d(channels, channels, 1), nn.ELU(), nn.Conv2d(channels, channels, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class LocalCache(PixelCache):
    """LocalPixelCNN one position at a time: each masked layer reads its window of the
    stored ELU of the layer below; the 1x1 blocks and the head are per position."""

    def __init__(self, net: "LocalPixelCNN", input_fn: InputFn, x, cond_vec, cond_map) -> None:
        pad = net.first.kernel_size[0] // 2
        super().__init__(input_fn, x, net.in_channels, pad)
        self.first = CausalConvAt(net.first)
        self.bias = 0.0 if net.cond is None else net.cond(cond_map)
        self.masked = [CausalConvAt(conv) for conv in net.masked]
        channels = net.first.out_channels
        self.elus = [Canvas(x, channels, self.height, self.width, pad) for _ in net.masked]
        self.blocks = [
            (Pointwise(block.body[1]), Pointwise(block.body[3])) for block in net.blocks_1x1
        ]
        self.out = Pointwise(net.head[1])

    def at(self, i: int, j: int) -> torch.Tensor:
        h = self.first(self.inputs, i, j) + at(self.bias, i, j)
        for k, (conv, elu) in enumerate(zip(self.masked, self.elus, strict=True)):
            elu.set(i, j, F.elu(h))
            h = h + conv(elu, i, j)
            if k < len(self.blocks):
                inner, outer = self.blocks[k]
                h = h + outer(F.elu(inner(F.elu(h))))
        return self.out(F.elu(h))


class LocalPixelCNN(PixelDecoder):
    """PixelCNN with a window of ``n_layers * (kernel // 2)`` rows, for one colour group.

    Args:
        in_channels / out_channels / n_colors / cond_vec_dim / cond_map_channels: the model's
            (see PixelDecoder); n_colors must be 1 (the 1x1 blocks mix all channels of a
            pixel) and the conditioning a map (VLAE: 4 channels; 0 = unconditional).
        channels: filters of every layer (VLAE: 12).
        n_layers: masked k x k layers, the first mask A (VLAE: 6).
        n_1x1_blocks: 1x1 residual blocks, placed after masked layers 2, 3, ... (VLAE: 4;
            the paper's "between every other masked layer" does not pin their places).
        kernel: size of the masked filters (VLAE: 3).
        tie_weights: masked layers 2..n_layers share one weight (VLAE on static MNIST).
    """

    cache_type = LocalCache

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        n_colors: int = 1,
        cond_vec_dim: int = 0,
        cond_map_channels: int = 4,
        channels: int = 12,
        n_layers: int = 6,
        n_1x1_blocks: int = 4,
        kernel: int = 3,
        tie_weights: bool = True,
    ) -> None:
        super().__init__(in_channels, out_channels, n_colors, cond_vec_dim, cond_map_channels)
        if n_colors != 1 or cond_vec_dim:
            raise ValueError(
                f"LocalPixelCNN models one colour group and takes a conditioning map, got"
                f" n_colors={n_colors}, cond_vec_dim={cond_vec_dim}: use GatedPixelCNN for"
                " colour-ordered likelihoods or a conditioning vector"
            )
        if n_layers < 1 or not 0 <= n_1x1_blocks <= max(n_layers - 1, 0):
            raise ValueError(
                f"need n_layers >= 1 and 0 <= n_1x1_blocks <= n_layers - 1, got {n_layers},"
                f" {n_1x1_blocks}"
            )
        self.first = MaskedConv2d(in_channels, channels, kernel, "A")
        self.cond = nn.Conv2d(cond_map_channels, channels, 1) if cond_map_channels else None
        n_b = n_layers - 1
        if tie_weights and n_b > 0:
            shared = MaskedConv2d(channels, channels, kernel, "B")
            self.masked = nn.ModuleList([shared] * n_b)
        else:
            self.masked = nn.ModuleList(
                [MaskedConv2d(channels, channels, kernel, "B") for _ in range(n_b)]
            )
        self.blocks_1x1 = nn.ModuleList([Residual1x1(channels) for _ in range(n_1x1_blocks)])
        self.head = nn.Sequential(nn.ELU(), nn.Conv2d(channels, out_channels, 1))
        self.receptive_rows = n_layers * (kernel // 2)

    def forward(
        self,
        x: torch.Tensor,
        cond_vec: torch.Tensor | None = None,
        cond_map: torch.Tensor | None = None,
    ) -> torch.Tensor:
        self.check_conditioning(cond_vec, cond_map)
        h = self.first(x)
        if self.cond is not None:
            h = h + self.cond(cond_map)
        for i, conv in enumerate(self.masked):
            h = h + conv(nn.functional.elu(h))
            if i < len(self.blocks_1x1):
                h = self.blocks_1x1[i](h)
        return self.head(h)
