"""Gated PixelCNN (van den Oord et al. 2016b): vertical + horizontal stacks, no blind spot.

Conditioning, both ways PixelVAE uses it (Gulrajani et al. 2017, Table 1):
- ``cond_vec`` (B, D): a latent vector mapped linearly into every gate ("without upsampling");
- ``cond_map`` (B, Cc, H, W): the VAE decoder's upsampled feature map, added into every gate
  through 1x1 convolutions (it may see every position: it carries no pixel information).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .init import he_init_
from .masked_conv import HorizontalConv2d, MaskedConv2d, VerticalConv2d, shift_down
from .pixel_decoder import PixelDecoder
from .sampling_cache import (
    Canvas,
    CausalConvAt,
    InputFn,
    PixelCache,
    Pointwise,
    at,
    effective_weight,
    row_of,
)


def gate(x: torch.Tensor) -> torch.Tensor:
    """tanh(a) * sigmoid(b) over the two channel halves of x."""
    a, b = x.chunk(2, dim=1)
    return torch.tanh(a) * torch.sigmoid(b)


class Conditioner(nn.Module):
    """Maps the optional global vector / spatial map to a bias for a 2C-channel gate."""

    def __init__(self, out_channels: int, cond_vec_dim: int, cond_map_channels: int) -> None:
        super().__init__()
        self.vec = nn.Linear(cond_vec_dim, out_channels, bias=False) if cond_vec_dim else None
        self.map = (
            nn.Conv2d(cond_map_channels, out_channels, 1, bias=False) if cond_map_channels else None
        )

    def terms(self, cond_vec: torch.Tensor | None, cond_map: torch.Tensor | None):
        """What the conditioning adds, term by term, each broadcastable to (B, C, H, W)."""
        if self.vec is not None:
            yield self.vec(cond_vec)[:, :, None, None]
        if self.map is not None:
            yield self.map(cond_map)

    def forward(
        self, pre: torch.Tensor, cond_vec: torch.Tensor | None, cond_map: torch.Tensor | None
    ) -> torch.Tensor:
        for term in self.terms(cond_vec, cond_map):
            pre = pre + term
        return pre

    def bias(
        self, cond_vec: torch.Tensor | None, cond_map: torch.Tensor | None
    ) -> torch.Tensor | float:
        """The whole conditioning as one map (0.0 when there is none): what a cached sampler
        adds at each position."""
        return sum(self.terms(cond_vec, cond_map), 0.0)


class GatedBlock(nn.Module):
    """One gated layer: vertical stack, horizontal stack fed by the shifted vertical one,
    gated activations, 1x1 + residual on the horizontal stack (not on the first layer)."""

    def __init__(
        self,
        in_channels: int,
        channels: int,
        kernel_size: int,
        first: bool,
        n_colors: int = 1,
        cond_vec_dim: int = 0,
        cond_map_channels: int = 0,
        last: bool = False,
    ) -> None:
        super().__init__()
        self.residual = not first
        mask = "A" if first else "B"
        self.v_conv = VerticalConv2d(in_channels, 2 * channels, kernel_size)
        self.h_conv = HorizontalConv2d(in_channels, 2 * channels, kernel_size, mask, n_colors)
        self.v_to_h = nn.Conv2d(2 * channels, 2 * channels, 1)
        self.h_out = MaskedConv2d(channels, channels, 1, "B", n_colors)
        # the last block's vertical output feeds nothing: no parameters for it (DDP needs
        # every parameter to get a gradient)
        self.v_cond = None if last else Conditioner(2 * channels, cond_vec_dim, cond_map_channels)
        self.h_cond = Conditioner(2 * channels, cond_vec_dim, cond_map_channels)

    def forward(
        self,
        v: torch.Tensor,
        h: torch.Tensor,
        cond_vec: torch.Tensor | None = None,
        cond_map: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        v_pre = self.v_conv(v)
        h_pre = self.h_conv(h) + self.v_to_h(shift_down(v_pre))
        v_new = v_pre if self.v_cond is None else gate(self.v_cond(v_pre, cond_vec, cond_map))
        h_new = self.h_out(gate(self.h_cond(h_pre, cond_vec, cond_map)))
        return v_new, h + h_new if self.residual else h_new


class GatedHead(nn.Module):
    """Two conditioned gated 1x1 layers, then a 1x1 projection to distribution parameters."""

    def __init__(
        self,
        channels: int,
        out_channels: int,
        n_colors: int = 1,
        cond_vec_dim: int = 0,
        cond_map_channels: int = 0,
    ) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            [MaskedConv2d(channels, 2 * channels, 1, "B", n_colors) for _ in range(2)]
        )
        self.conds = nn.ModuleList(
            [Conditioner(2 * channels, cond_vec_dim, cond_map_channels) for _ in range(2)]
        )
        self.out = MaskedConv2d(channels, out_channels, 1, "B", n_colors)

    def forward(
        self, h: torch.Tensor, cond_vec: torch.Tensor | None, cond_map: torch.Tensor | None
    ) -> torch.Tensor:
        for conv, cond in zip(self.convs, self.conds, strict=True):
            h = gate(cond(conv(h), cond_vec, cond_map))
        return self.out(h)


@dataclass
class _CachedBlock:
    """One GatedBlock's parts and maps in a :class:`GatedCache`."""

    block: GatedBlock
    v_in: Canvas  # the vertical stack's input (the image, or the block below's v)
    h_in: Canvas  # the horizontal stack's input
    v_out: Canvas | None  # the next block's inputs (None after the last block)
    h_out: Canvas | None
    v_weight: torch.Tensor
    h_conv: CausalConvAt
    h_1x1: Pointwise
    v_bias: torch.Tensor | float  # the conditioning of each gate
    h_bias: torch.Tensor | float
    h_row: torch.Tensor | None = None  # (B, W, 2C): all but the horizontal conv, this row


class GatedCache(PixelCache):
    """GatedPixelCNN one position at a time: at the start of row i every block's vertical
    stack computes row i - 1 (what reaches row i through ``shift_down``), then each pixel
    runs the horizontal stacks and the head at that pixel only."""

    def __init__(self, net: "GatedPixelCNN", input_fn: InputFn, x, cond_vec, cond_map) -> None:
        pads = [block.v_conv.kernel_size[1] // 2 for block in net.blocks]
        super().__init__(input_fn, x, net.in_channels, pads[0])
        v_in = h_in = self.inputs
        self.blocks = []
        for k, block in enumerate(net.blocks):
            size = (block.h_out.out_channels, self.height, self.width)
            v_out, h_out = (
                (None, None)
                if k == len(net.blocks) - 1
                else (Canvas(x, *size, pads[k + 1]), Canvas(x, *size, pads[k + 1]))
            )
            self.blocks.append(
                _CachedBlock(
                    block,
                    v_in,
                    h_in,
                    v_out,
                    h_out,
                    effective_weight(block.v_conv),
                    CausalConvAt(block.h_conv),
                    Pointwise(block.h_out),
                    0.0 if block.v_cond is None else block.v_cond.bias(cond_vec, cond_map),
                    block.h_cond.bias(cond_vec, cond_map),
                )
            )
            v_in, h_in = v_out, h_out
        self.head = [
            (Pointwise(conv), cond.bias(cond_vec, cond_map))
            for conv, cond in zip(net.head.convs, net.head.conds, strict=True)
        ]
        self.out = Pointwise(net.head.out)

    def start_row(self, i: int) -> None:
        for b in self.blocks:
            if i == 0:  # shift_down brings zeros into the first row
                v_pre = b.v_in.data.new_zeros(self.batch, b.v_weight.shape[0], 1, self.width)
            else:
                v_pre = F.conv2d(b.v_in.rows(i - 1, b.v_in.pad), b.v_weight, b.block.v_conv.bias)
                if b.v_out is not None:
                    b.v_out.set_row(i - 1, gate(v_pre + row_of(b.v_bias, i - 1))[:, :, 0])
            share = b.block.v_to_h(v_pre) + row_of(b.h_bias, i)
            if b.block.h_conv.bias is not None:
                share = share + b.block.h_conv.bias[:, None, None]
            b.h_row = share[:, :, 0].transpose(1, 2).contiguous()

    def at(self, i: int, j: int) -> torch.Tensor:
        h = None
        for b in self.blocks:
            gated = gate(b.h_conv(b.h_in, i, j, add=b.h_row[:, j]))
            h = b.h_1x1(gated, add=h) if b.block.residual else b.h_1x1(gated)
            if b.h_out is not None:
                b.h_out.set(i, j, h)
        for conv, bias in self.head:
            h = gate(conv(h) + at(bias, i, j))
        return self.out(h)


class GatedPixelCNN(PixelDecoder):
    """First layer k_first x k_first with mask A, then ``n_layers - 1`` k x k blocks with
    mask B, then the gated 1x1 head (PixelVAE appendix E.1 layout; He-initialized).

    ``out_channels`` is n_colors x parameters per colour, with channel c belonging to colour
    ``c % n_colors`` (see masked_conv); the likelihood reads them in that order.
    """

    cache_type = GatedCache

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
        if channels % n_colors:
            raise ValueError(
                f"GatedPixelCNN: channels ({channels}) must be a multiple of n_colors"
                f" ({n_colors}, the colours the likelihood orders): the gate splits features in"
                " halves, which must keep every channel in its colour group; set the network's"
                " channels (pixelcnn: init_args: channels) to such a multiple"
            )
        cond = dict(
            n_colors=n_colors, cond_vec_dim=cond_vec_dim, cond_map_channels=cond_map_channels
        )
        self.blocks = nn.ModuleList(
            [GatedBlock(in_channels, channels, first_kernel, True, last=n_layers == 1, **cond)]
            + [
                GatedBlock(channels, channels, kernel, False, last=i == n_layers - 1, **cond)
                for i in range(1, n_layers)
            ]
        )
        self.head = GatedHead(channels, out_channels, **cond)
        # rows above a position that its output can depend on: every vertical convolution
        # reaches k // 2 rows up, and the vertical stack enters the horizontal one a row lower
        self.receptive_rows = 1 + first_kernel // 2 + (n_layers - 1) * (kernel // 2)
        he_init_(self)

    def forward(
        self,
        x: torch.Tensor,
        cond_vec: torch.Tensor | None = None,
        cond_map: torch.Tensor | None = None,
    ) -> torch.Tensor:
        self.check_conditioning(cond_vec, cond_map)
        v, h = x, x
        for block in self.blocks:
            v, h = block(v, h, cond_vec, cond_map)
        return self.head(h, cond_vec, cond_map)
