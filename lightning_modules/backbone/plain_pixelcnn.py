"""The original PixelCNN (van den Oord et al. 2016a): masked convolutions with ReLU.

Unlike the gated version it has a blind spot (pixels up and to the right are never seen);
PixelVAE's Table 1 compares both ("PixelVAE" vs "Gated PixelVAE").
"""

from collections import OrderedDict

import torch
from torch import nn

from .gated_pixelcnn import Conditioner
from .init import he_init_
from .masked_conv import MaskedConv2d
from .pixel_decoder import PixelDecoder
from .sampling_cache import (
    Canvas,
    CausalConvAt,
    InputFn,
    PixelCache,
    Pointwise,
    at,
)


class PlainCache(PixelCache):
    """PlainPixelCNN one position at a time: each masked layer reads its window of the
    stored ReLU of the layer below."""

    def __init__(self, net: "PlainPixelCNN", input_fn: InputFn, x, cond_vec, cond_map) -> None:
        pads = [conv.kernel_size[0] // 2 for conv in net.convs]
        super().__init__(input_fn, x, net.in_channels, pads[0])
        self.convs = [CausalConvAt(conv) for conv in net.convs]
        self.biases = [cond.bias(cond_vec, cond_map) for cond in net.conds]
        channels = net.convs[0].out_channels
        self.relus = [Canvas(x, channels, self.height, self.width, pad) for pad in pads[1:]]
        self.hidden, self.out = Pointwise(net.head.hidden), Pointwise(net.head.out)

    def at(self, i: int, j: int) -> torch.Tensor:
        h = self.convs[0](self.inputs, i, j) + at(self.biases[0], i, j)
        for conv, bias, relu in zip(self.convs[1:], self.biases[1:], self.relus, strict=True):
            relu.set(i, j, torch.relu(h))
            h = h + torch.relu(conv(relu, i, j) + at(bias, i, j))
        return self.out(torch.relu(self.hidden(torch.relu(h))))


class PlainPixelCNN(PixelDecoder):
    """k_first x k_first mask-A conv, ``n_layers - 1`` residual k x k mask-B ReLU convs, then
    two 1x1 ReLU layers to ``out_channels`` (He-initialized). Options as GatedPixelCNN's."""

    cache_type = PlainCache

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        n_colors: int = 1,
        cond_vec_dim: int = 0,
        cond_map_channels: int = 0,
        n_layers: int = 3,
        channels: int = 32,
        first_kernel: int = 7,
        kernel: int = 5,
    ) -> None:
        super().__init__(in_channels, out_channels, n_colors, cond_vec_dim, cond_map_channels)
        if n_layers < 1:
            raise ValueError(f"a PixelCNN needs at least one masked layer, got n_layers={n_layers}")
        self.convs = nn.ModuleList(
            [MaskedConv2d(in_channels, channels, first_kernel, "A", n_colors)]
            + [MaskedConv2d(channels, channels, kernel, "B", n_colors) for _ in range(n_layers - 1)]
        )
        self.conds = nn.ModuleList(
            [Conditioner(channels, cond_vec_dim, cond_map_channels) for _ in range(n_layers)]
        )
        self.receptive_rows = first_kernel // 2 + (n_layers - 1) * (kernel // 2)
        self.head = nn.Sequential(
            OrderedDict(
                relu1=nn.ReLU(),
                hidden=MaskedConv2d(channels, channels, 1, "B", n_colors),
                relu2=nn.ReLU(),
                out=MaskedConv2d(channels, out_channels, 1, "B", n_colors),
            )
        )
        he_init_(self)

    def forward(
        self,
        x: torch.Tensor,
        cond_vec: torch.Tensor | None = None,
        cond_map: torch.Tensor | None = None,
    ) -> torch.Tensor:
        self.check_conditioning(cond_vec, cond_map)
        h = self.conds[0](self.convs[0](x), cond_vec, cond_map)
        for conv, cond in zip(self.convs[1:], self.conds[1:], strict=True):
            h = h + torch.relu(cond(conv(torch.relu(h)), cond_vec, cond_map))
        return self.head(h)
