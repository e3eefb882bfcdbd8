"""PixelCNN++ (Salimans et al., "PixelCNN++: Improving the PixelCNN with Discretized Logistic
Mixture Likelihood and Other Modifications", ICLR 2017), the network only.

Two streams, no masks: ``u`` sees only the rows strictly above a pixel (down-shifted
convolutions), ``ul`` sees those rows and the pixels to its left (down-right-shifted
convolutions). Gated ResNet blocks over three resolutions, an up pass whose every
intermediate output feeds the matching block of the down pass (U-Net-like skips). The output
at pixel (i, j) depends on all channels of the pixels before (i, j) in raster order, never on
(i, j) itself: ordering the colours within a pixel is the likelihood's job.

Conditioning: ``cond_vec`` (B, D) through a linear map into every gate (the paper's ``h``);
``cond_map`` (B, Cc, h, w) at the image's resolution or lower, resized to each stream's
resolution and added into every gate through a 1x1 convolution.
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn.utils import parametrize

from .masked_conv import shift_down
from .pixel_decoder import PixelDecoder
from .sampling_cache import InputFn, PixelCache, matmul, taps_last
from .weight_norm import channel_stats, data_dependent_init_, weight_norm_

Size = tuple[int, int]


def shift_right(x: torch.Tensor) -> torch.Tensor:
    """Move every column one right (zeros enter on the left)."""
    return F.pad(x, (1, 0, 0, 0))[:, :, :, :-1]


def concat_elu(x: torch.Tensor) -> torch.Tensor:
    """elu over [x, -x]: keeps both signs' information (doubles the channels)."""
    return F.elu(torch.cat([x, -x], dim=1))


Pad = tuple[int, int, int, int]  # left, right, top, bottom, as F.pad takes them


class _PaddedConcatElu(torch.autograd.Function):
    """:func:`padded_concat_elu` in one output buffer; backward from the saved output
    (elu'(v) = 1 where elu(v) > 0, elu(v) + 1 elsewhere), the output being what the next
    convolution saves anyway."""

    @staticmethod
    def forward(ctx, pad: Pad, *parts: torch.Tensor) -> torch.Tensor:
        left, right, top, bottom = pad
        b, _, h, w = parts[0].shape
        c = sum(p.shape[1] for p in parts)
        dtype = parts[0].dtype
        for p in parts[1:]:
            dtype = torch.promote_types(dtype, p.dtype)
        out = torch.empty(
            (b, 2 * c, top + h + bottom, left + w + right),
            dtype=dtype,
            device=parts[0].device,
            memory_format=torch.channels_last,
        )
        out[:, :, :top].zero_()
        out[:, :, top + h :].zero_()
        out[:, :, :, :left].zero_()
        out[:, :, :, left + w :].zero_()
        inner = out[:, :, top : top + h, left : left + w]
        strided, start = _strided_elu_is_fast(out), 0
        for p in parts:
            k, p = p.shape[1], p.to(dtype)
            positive, negative = inner[:, start : start + k], inner[:, c + start : c + start + k]
            if strided:
                torch.ops.aten.elu.out(p, 1.0, 1, 1, out=positive)
                torch.neg(p, out=negative)
                F.elu(negative, inplace=True)
            else:
                positive.copy_(F.elu(p))
                negative.copy_(F.elu(-p))
            start += k
        ctx.save_for_backward(out)
        ctx.pad, ctx.sizes = pad, [p.shape[1] for p in parts]
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        (out,) = ctx.saved_tensors
        left, _, top, _ = ctx.pad
        h, w = out.shape[2] - top - ctx.pad[3], out.shape[3] - left - ctx.pad[1]
        inner = (slice(None), slice(None), slice(top, top + h), slice(left, left + w))
        grad, out = grad[inner], out[inner]
        strided = _strided_elu_is_fast(out)

        def elu_grad(channels: slice) -> torch.Tensor:
            g, y = grad[:, channels], out[:, channels]
            if not strided:
                g, y = (t.contiguous(memory_format=torch.channels_last) for t in (g, y))
            return torch.ops.aten.elu_backward(g, 1.0, 1, 1, True, y)

        c, start, grads = sum(ctx.sizes), 0, []
        for k in ctx.sizes:
            d = elu_grad(slice(start, start + k))
            grads.append(d.sub_(elu_grad(slice(c + start, c + start + k))))
            start += k
        return None, *grads


def _strided_elu_is_fast(t: torch.Tensor) -> bool:
    """Whether elu and its backward run as fast on a channel slice of ``t`` as on a
    contiguous tensor: not for bfloat16 / float16 on a CPU (measured ~2.5x slower in
    torch 2.13), where they run on contiguous copies instead."""
    return t.device.type != "cpu" or t.dtype in (torch.float32, torch.float64)


def padded_concat_elu(parts: tuple[torch.Tensor, ...], pad: Pad) -> torch.Tensor:
    """``F.pad(concat_elu(torch.cat(parts, 1)), pad)``, written straight into one zero-bordered
    channels-last buffer: a gated block's convolutions then run unpadded on it. On a CPU this
    spares the negated copy, the concatenations, and both the padded convolution's extra
    output row / column and the copy that cropping them costs in the backward pass. Under
    torch.compile, the composition (which the compiler fuses itself)."""
    if torch.compiler.is_compiling():
        return F.pad(concat_elu(torch.cat(parts, dim=1)), pad)
    return _PaddedConcatElu.apply(pad, *parts)


def shift_padding(kernel: Size, right: bool | None) -> Pad:
    """The zeros around an input that make a (kh, kw) convolution's output (i, j) see rows
    i - kh + 1..i and columns centred on j (down-shifted), j - kw + 1..j (down-right-shifted,
    ``right``) or, for ``right`` None, an ordinary centred window (odd kernel)."""
    kh, kw = kernel
    if right is None:
        return kw // 2, kw // 2, kh // 2, kh // 2
    left = kw - 1 if right else (kw - 1) // 2
    return left, kw - 1 - left, kh - 1, 0


def half(size: Size) -> Size:
    """Size after a stride-2 shifted convolution: ceil(h / 2), ceil(w / 2)."""
    return (size[0] + 1) // 2, (size[1] + 1) // 2


def _pool_kernel(have: Size, want: Size) -> Size:
    """2 along each dimension whose length ``have`` still ceil-halves to ``want`` or more."""
    k = [2 if d > w and (d + 1) // 2 >= w else 1 for d, w in zip(have, want, strict=True)]
    return k[0], k[1]


def resize_map(cond_map: torch.Tensor, size: Size) -> torch.Tensor:
    """``cond_map`` at a stream's exact ``size``.

    A stream cell (i, j) stands for the cells (2i..2i+1, 2j..2j+1) of the next finer
    resolution (where the transposed convolutions put it; odd sizes are ceil-halved). So a
    finer map is 2x2-average-pooled with ceil_mode (a partial last window averages the cells
    it has), which reproduces the streams' ceil sizes, and a coarser map is repeated 2x2
    (nearest neighbour) and cropped at the bottom / right, once per halving: a single
    F.interpolate to the exact size would misalign odd sizes (9 -> 5 -> 3: the quarter-res
    column 1 stands for columns 4..7, not 3..5). Any position may see the map (it carries no
    pixel information), so no resize can break causality; a size off this chain is cropped.
    """
    while (pool := _pool_kernel(tuple(cond_map.shape[-2:]), size)) != (1, 1):
        cond_map = F.avg_pool2d(cond_map, pool, ceil_mode=True)
    for dim, s in ((-2, size[0]), (-1, size[1])):
        while cond_map.shape[dim] < s:
            cond_map = cond_map.repeat_interleave(2, dim)
    return cond_map[:, :, : size[0], : size[1]]


def sampling_rows(net: nn.Module, rows: int, height: int, cond: torch.Tensor | None = None) -> int:
    """How many canvas rows a network runs on when sampling gives the exact outputs of its
    first ``rows`` rows: ``rows`` up to a multiple of its coarsest stream's stride (the canvas
    padded with zeros below, which the causal streams never see), so that every coarser cell
    and every pooled cell of a conditioning map covers the rows it does on the whole image;
    at most ``height``, and ``height`` for a map ``cond`` of another height than the image's.
    About half the canvas per pixel on average instead of all of it."""
    if cond is not None and cond.shape[2] != height:
        return height
    block = 2 ** (getattr(net, "resolutions", 1) - 1)
    return min(height, -(-rows // block) * block)


def sampling_canvas(net: nn.Module, x_rows: torch.Tensor, height: int, cond=None):
    """The canvas rows ``x_rows`` (the rows drawn so far) padded with zero rows to
    :func:`sampling_rows`, and the conditioning map cropped to as many rows when it has the
    image's height (None, or a map of another height, as it is): what ``net`` runs on to
    give the exact parameters of those rows."""
    crop = sampling_rows(net, x_rows.shape[2], height, cond)
    canvas = F.pad(x_rows, (0, 0, 0, crop - x_rows.shape[2]))
    if cond is None or cond.shape[2] != height:  # a map of another height stays whole
        return canvas, cond
    return canvas, cond[:, :, :crop]


class ShiftedConv2d(nn.Conv2d):
    """Convolution padded so that output (i, j) sees input rows i - kh + 1..i and columns
    centred on j (down-shifted) or j - kw + 1..j (down-right-shifted). Stride 2 halves the
    size (ceil) and keeps the alignment the transposed version below undoes."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: Size,
        stride: int = 1,
        right: bool = False,
    ) -> None:
        self.pad = left, _, top, _ = shift_padding(kernel, right)
        # stride 1: the convolution pads every side and the rows / columns past the image are
        # dropped (no padded copy of x); stride 2 pads top / left only, to keep the alignment
        self.crop = stride == 1
        padding = (top, left) if self.crop else 0
        super().__init__(in_channels, out_channels, kernel, stride, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.crop:
            return super().forward(x)[:, :, : x.shape[-2], : x.shape[-1]]
        return super().forward(F.pad(x, self.pad))


class ShiftedConvTranspose2d(nn.ConvTranspose2d):
    """Stride-2 up-sampling: input cell (i, j) writes output rows 2i..2i+1 only (never above:
    it saw rows < 2i), columns centred on 2j (down-shifted, kernel (2, 3)) or 2j..2j+1
    (down-right-shifted, kernel (2, 2): it saw pixels before (2i, 2j)). The full output is
    cropped at the bottom / right to the skip's exact size, so odd sizes work."""

    def __init__(self, channels: int, right: bool) -> None:
        super().__init__(channels, channels, (2, 2) if right else (2, 3), stride=2)
        self.col0 = 0 if right else 1  # the centred kernel's extra left column

    def forward(self, x: torch.Tensor, size: Size) -> torch.Tensor:  # type: ignore[override]
        return super().forward(x)[:, :, : size[0], self.col0 : self.col0 + size[1]]


class Dropout(nn.Dropout):
    """nn.Dropout (each element zeroed with probability p, the rest scaled by 1 / (1 - p)),
    with a cheaper mask on a CPU: 16 random bits per element, four per 64-bit draw, kept where
    they are at or above p's threshold. p is thus rounded to a multiple of 2^-16 (the scale
    follows the rounded p, so the expectation is kept). The Bernoulli sampler of nn.Dropout
    took a tenth of a PixelCNN++ training step there, and one float draw per element still
    ~4%. Elsewhere (CUDA's fused dropout kernel; under torch.compile), F.dropout."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if x.device.type != "cpu" or torch.compiler.is_compiling():
            return F.dropout(x, self.p, True)
        dropped = round(self.p * 2**16)
        if dropped == 2**16:
            return torch.zeros_like(x)
        n = x.numel()
        words = x.new_empty((n + 3) // 4, dtype=torch.int64).random_(-(2**63), 2**63 - 1)
        layout = torch.empty_like(x, dtype=torch.int16, device="meta").stride()  # x's, if dense
        draws = words.view(torch.int16)[:n].as_strided(x.shape, layout)
        keep = draws >= dropped - 2**15
        return x * keep.to(x.dtype).mul_(2**16 / (2**16 - dropped))


class GatedResnet(nn.Module):
    """x + a * sigmoid(b), [a, b] = conv(dropout(concat_elu(conv(concat_elu(x)) + nin(aux))))
    + the conditioning. ``aux_channels``: the auxiliary input's channels (0: none).
    ``right``: down-right-shifted convolutions, else down-shifted ones; ``right`` None:
    ordinary centred ones (odd ``kernel``), for networks that need no causality."""

    def __init__(
        self,
        channels: int,
        kernel: Size,
        right: bool | None,
        aux_channels: int,
        dropout: float,
        cond_vec_dim: int,
        cond_map_channels: int,
    ) -> None:
        super().__init__()
        # the block pads its convolutions' inputs itself (padded_concat_elu): both run unpadded
        self.pad = shift_padding(kernel, right)
        self.conv1 = nn.Conv2d(2 * channels, channels, kernel)
        self.aux = nn.Conv2d(2 * aux_channels, channels, 1) if aux_channels else None
        self.dropout = Dropout(dropout)
        self.conv2 = nn.Conv2d(2 * channels, 2 * channels, kernel)
        # only built when used: a parameter without a gradient is an error under DDP. With a
        # bias: data_dependent_init_ passes on (out - mean) / std but can only subtract the mean
        # from a bias, so a bias-free layer would leave later layers initialized off-statistics
        self.vec = nn.Linear(cond_vec_dim, 2 * channels) if cond_vec_dim else None
        self.map = nn.Conv2d(cond_map_channels, 2 * channels, 1) if cond_map_channels else None

    def forward(
        self,
        x: torch.Tensor,
        aux: tuple[torch.Tensor, ...],
        cond_vec: torch.Tensor | None,
        cond_map: torch.Tensor | None,
    ) -> torch.Tensor:
        """``aux``: the auxiliary input's parts (empty: none), concatenated over channels."""
        h = self.conv1(padded_concat_elu((x,), self.pad))
        if self.aux is not None:
            h = h + self.aux(padded_concat_elu(aux, (0, 0, 0, 0)))
        h = self.conv2(self.dropout(padded_concat_elu((h,), self.pad)))
        if self.vec is not None:
            h = h + self.vec(cond_vec)[:, :, None, None]
        if self.map is not None:
            h = h + self.map(cond_map)
        return gated_residual(x, h)


def gated_residual(x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """x + a * sigmoid(b), [a, b] = h: a GatedResnet's output from its pre-gate h."""
    a, b = h.chunk(2, dim=1)
    return torch.addcmul(x, a, torch.sigmoid(b))


@torch.no_grad()
def _init_transposed(m: ShiftedConvTranspose2d, inputs: object, out: torch.Tensor) -> torch.Tensor:
    """data_dependent_init_'s rule for a transposed convolution (which it does not hook): its
    gain has shape (1, out, 1, 1) (weight norm over dim 1, the output channels)."""
    mean, std = channel_stats(out, [0, 2, 3])
    m.parametrizations.weight.original0.div_(std)
    m.bias.sub_(mean.flatten()).div_(std.flatten())
    return (out - mean) / std


# ------------------------------------------------------------------ cached sampling
class Rows:
    """The last two rows of a (B, C, h, w) stream map, all that PixelCNN++'s two-row
    kernels read, with ``left`` / ``right`` zero columns; rows above the map read zeros.
    Slot 1 holds the current row, slot 0 the one above: moving on to the next row copies
    the current one up (rows are visited in order; a position right of the last one set
    still holds the row above's value, which no causal kernel reads)."""

    def __init__(self, like: torch.Tensor, channels: int, width: int, left: int, right: int):
        self.left, self.width, self.row = left, width, -1
        self.data = like.new_zeros(like.shape[0], channels, 2, left + width + right)

    def at_row(self, i: int) -> torch.Tensor:
        """The two rows, moved on to row i (the current row or the next one)."""
        if i != self.row:
            if i != self.row + 1:
                raise RuntimeError(f"rows are visited in order: row {i} after {self.row}")
            self.data[:, :, 0] = self.data[:, :, 1]
            self.row = i
        return self.data

    def set(self, i: int, j: int, value: torch.Tensor) -> None:
        self.at_row(i)[:, :, 1, self.left + j] = value

    def get(self, i: int, j: int) -> torch.Tensor:
        return self.at_row(i)[:, :, 1, self.left + j]

    def set_row(self, i: int, value: torch.Tensor) -> None:
        """Row i := value (B, C, 1, w)."""
        self.at_row(i)[:, :, 1, self.left : self.left + self.width] = value[:, :, 0]

    def two(self, i: int) -> torch.Tensor:
        """Rows i - 1 and i with their padding columns: (B, C, 2, left + w + right)."""
        return self.at_row(i)

    def window(self, i: int, j: int, left: int, right: int) -> torch.Tensor:
        """Rows i - 1, i and columns j - left .. j + right, flattened as a weight's
        (C, rows, columns)."""
        a = self.left + j
        window = self.at_row(i)[:, :, :, a - left : a + right + 1]
        return window.reshape(window.shape[0], -1)


class CachedResnet:
    """A GatedResnet of one stream row by row (``row``: the ``u`` stream, which sees only
    the rows above) or position by position (``at``: the ``ul`` stream), on stored rows of
    its two convolutions' inputs. Evaluation mode: no dropout."""

    def __init__(self, block: GatedResnet, like, width: int, cond_vec, cond_map) -> None:
        pad_right = 0 if block.conv1.kernel_size[1] == 2 else 1  # down-right: no column right
        self.w1, self.b1 = block.conv1.weight, block.conv1.bias
        self.w2, self.b2 = block.conv2.weight, block.conv2.bias
        self.aux = None if block.aux is None else (block.aux.weight, block.aux.bias)
        self.vec = 0.0 if block.vec is None else block.vec(cond_vec)
        self.map = None if block.map is None else (block.map.weight, block.map.bias, cond_map)
        channels = block.conv1.in_channels
        self.inputs = Rows(like, channels, width, 1, pad_right)  # concat_elu(x)
        self.hidden = Rows(like, channels, width, 1, pad_right)  # concat_elu(conv1 + aux)

    def row(self, i: int, x: torch.Tensor, aux: torch.Tensor | None) -> torch.Tensor:
        """Row i of the block's output, (B, C, 1, w), from row i of its inputs."""
        self.inputs.set_row(i, concat_elu(x))
        h = F.conv2d(self.inputs.two(i), self.w1, self.b1)
        if aux is not None:
            h = h + F.conv2d(concat_elu(aux), *self.aux)
        self.hidden.set_row(i, concat_elu(h))
        h = F.conv2d(self.hidden.two(i), self.w2, self.b2)
        h = h + (self.vec if isinstance(self.vec, float) else self.vec[:, :, None, None])
        if self.map is not None:
            weight, bias, cond_map = self.map
            h = h + F.conv2d(cond_map[:, :, i : i + 1], weight, bias)
        return gated_residual(x, h)

    def at(self, i: int, j: int, x: torch.Tensor, aux: torch.Tensor | None) -> torch.Tensor:
        """The block's output at (i, j), (B, C), from its inputs there."""
        self.inputs.set(i, j, concat_elu(x))
        h = F.linear(self.inputs.window(i, j, 1, 0), self.w1.flatten(1), self.b1)
        if aux is not None:
            h = h + F.linear(concat_elu(aux), self.aux[0].flatten(1), self.aux[1])
        self.hidden.set(i, j, concat_elu(h))
        h = F.linear(self.hidden.window(i, j, 1, 0), self.w2.flatten(1), self.b2)
        h = h + self.vec
        if self.map is not None:
            weight, bias, cond_map = self.map
            h = h + F.linear(cond_map[:, :, i, j], weight.flatten(1), bias)
        return gated_residual(x, h)


class PixelCNNppCache(PixelCache):
    """PixelCNNppNet one pixel at a time. Resolution s computes its cell (i / 2^s, j / 2^s)
    at the pixel (i, j) whose coordinates are multiples of 2^s, the first pixel that the
    cell feeds (everything it reads is drawn by then):

    - at the start of row i, the ``u`` stream (rows above only) of every resolution whose
      row starts there, up pass finest first, then the down pass coarsest first;
    - at pixel (i, j), the ``ul`` stream the same way at those resolutions' cells, then the
      output.

    Each stream keeps two rows per layer input (its kernels span two rows), and a stream
    value that a later layer reads at the same position only (skips, the other stream) is
    kept for the current row or cell."""

    def __init__(self, net: "PixelCNNppNet", input_fn: InputFn, x, cond_vec, cond_map) -> None:
        def with_ones(v: torch.Tensor) -> torch.Tensor:
            return torch.cat([input_fn(v), torch.ones_like(v[:, :1])], dim=1)

        super().__init__(with_ones, x, net.in_channels + 1, 1)
        self.levels = r = net.resolutions
        sizes = [(self.height, self.width)]
        while len(sizes) < r:
            sizes.append(half(sizes[-1]))
        nf = net.out.in_channels
        maps = [None if cond_map is None else resize_map(cond_map, s) for s in sizes]

        def blocks(stage, s):
            return [CachedResnet(b, x, sizes[s][1], cond_vec, maps[s]) for b in stage]

        self.up_u = [blocks(net.up_u[s], s) for s in range(r)]
        self.up_ul = [blocks(net.up_ul[s], s) for s in range(r)]
        self.down_u = [blocks(net.down_u[r - 1 - s], s) for s in range(r)]  # per resolution
        self.down_ul = [blocks(net.down_ul[r - 1 - s], s) for s in range(r)]
        self.u_init = (net.u_init.weight, net.u_init.bias)
        self.ul_above = (net.ul_init_above.weight, net.ul_init_above.bias)
        self.ul_left = (net.ul_init_left.bias, taps_last(net.ul_init_left.weight))
        self.down_u_conv = [(c.weight, c.bias) for c in net.down_u_conv]
        self.down_ul_conv = [(c.weight.flatten(1), c.bias) for c in net.down_ul_conv]
        # per resolution s, the transposed convolutions from s + 1 to s
        self.up_u_conv = [(c.weight, c.bias) for c in reversed(net.up_u_conv)]
        self.up_ul_conv = [(c.weight, c.bias) for c in reversed(net.up_ul_conv)]
        self.out = (net.out.weight.flatten(1), net.out.bias)
        # the last up-pass values of each resolution, read by the stride-2 convolutions
        self.u_last = [Rows(x, nf, sizes[s][1], 1, 1) for s in range(r - 1)]
        self.ul_last = [Rows(x, nf, sizes[s][1], 1, 0) for s in range(r - 1)]
        # the down pass's ul of each coarser resolution, read by the transposed convolutions
        self.ul_down = [None] + [Rows(x, nf, sizes[s][1], 0, 0) for s in range(1, r)]
        self.u_up_rows: list = [None] * r  # per resolution: its current row of each u value
        self.u_down_rows: list = [None] * r
        self.ul_row0 = None  # shift_down(ul_init_above(x)) on the current row
        self.zeros = x.new_zeros(self.batch, nf, 1, self.width)

    def start_row(self, i: int) -> None:
        levels = [s for s in range(self.levels) if i % 2**s == 0]
        for s in levels:  # up pass, finest first
            r = i >> s
            if s == 0:  # shift_down of the first convolutions: row 0 sees nothing
                u = self.zeros if i == 0 else F.conv2d(self.inputs.rows(i - 1, 1), *self.u_init)
                self.ul_row0 = (
                    self.zeros if i == 0 else F.conv2d(self.inputs.rows(i - 1, 0), *self.ul_above)
                )
            else:
                u = F.conv2d(self.u_last[s - 1].two(2 * r), *self.down_u_conv[s - 1], stride=(1, 2))
            values = [u]
            for block in self.up_u[s]:
                u = block.row(r, u, None)
                values.append(u)
            if s < self.levels - 1:
                self.u_last[s].set_row(r, u)
            self.u_up_rows[s] = values
        for s in reversed(levels):  # down pass, coarsest first
            r = i >> s
            u, skips = self._down_start(s, self.u_up_rows[s])
            if s < self.levels - 1:
                weight, bias = self.up_u_conv[s]
                coarse = F.conv_transpose2d(self.u_down_rows[s + 1][-1], weight, bias, stride=2)
                u = coarse[:, :, r % 2, 1 : 1 + self.u_up_rows[s][0].shape[3]][:, :, None]
            values = []
            for block, skip in zip(self.down_u[s], skips, strict=True):
                u = block.row(r, u, skip)
                values.append(u)
            self.u_down_rows[s] = values

    def _down_start(self, s: int, up: list) -> tuple:
        """The down pass's first input at resolution s (the up pass's last value at the
        coarsest one, else None: the transposed convolution's) and the skips it consumes,
        in the order the network's down pass pops them."""
        if s == self.levels - 1:
            return up[-1], up[-2::-1]
        return None, up[::-1]

    def at(self, i: int, j: int) -> torch.Tensor:
        levels = [s for s in range(self.levels) if i % 2**s == 0 and j % 2**s == 0]
        up_values = {}
        for s in levels:  # up pass, finest first
            r, c = i >> s, j >> s
            if s == 0:
                ul = self.ul_row0[:, :, 0, j]
                if j > 0:  # shift_right of the (2, 1) convolution: column 0 sees nothing
                    bias, weight_t = self.ul_left
                    ul = ul + matmul(bias, self.inputs.window(i, j - 1, 1, 0, 0), weight_t)
            else:
                ul = F.linear(
                    self.ul_last[s - 1].window(2 * r, 2 * c, 1, 0), *self.down_ul_conv[s - 1]
                )
            values = [ul]
            for block, u in zip(self.up_ul[s], self.u_up_rows[s][1:], strict=True):
                ul = block.at(r, c, ul, u[:, :, 0, c])
                values.append(ul)
            if s < self.levels - 1:
                self.ul_last[s].set(r, c, ul)
            up_values[s] = values
        for s in reversed(levels):  # down pass, coarsest first
            r, c = i >> s, j >> s
            ul, skips = self._down_start(s, up_values[s])
            if s < self.levels - 1:
                weight, bias = self.up_ul_conv[s]
                coarse = self.ul_down[s + 1].get(r // 2, c // 2)
                ul = F.linear(coarse, weight[:, :, r % 2, c % 2].t(), bias)
            for block, u, skip in zip(self.down_ul[s], self.u_down_rows[s], skips, strict=True):
                ul = block.at(r, c, ul, torch.cat([u[:, :, 0, c], skip], dim=1))
            if s > 0:
                self.ul_down[s].set(r, c, ul)
        return F.linear(F.elu(ul), *self.out)


class PixelCNNppNet(PixelDecoder):
    """PixelCNN++ over ``in_channels`` inputs (scaled to [-1, 1]), ``out_channels`` outputs per
    pixel, ``channels`` wide (the paper's ``nr_filters``: 160). Up pass: ``nr_resnet`` blocks
    at each of ``resolutions`` resolutions (3 in the paper; stride-2 convolutions between;
    1: none, the light networks of Kolesnikov & Lampert's Pyramid PixelCNN); down pass:
    ``nr_resnet``, then ``nr_resnet + 1`` blocks per finer resolution, each consuming one
    skip, as in the paper's code. Every layer is weight-normalized; call
    :meth:`init_from_data` once before training.

    Receptive field (checked by gradients in the tests): on an odd row 2i + 1 the coarser
    resolutions bring nothing of the row itself and, of row 2i, only the pixels to the left
    (a coarse cell feeds rows 2i, 2i + 1 but was computed before row 2i + 1). So there the
    current row reaches 4 * nr_resnet + 2 pixels left and the row above as many right, as in
    the paper's network: at nr_resnet=5 on 32x32, 9 pixels each; a smaller network on a
    larger image misses more, further up. No row bound either: ``receptive_rows`` is None,
    sampling runs the whole canvas.
    """

    cache_type = PixelCNNppCache

    receptive_rows = None
    needs_data_init = True

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        n_colors: int = 1,
        cond_vec_dim: int = 0,
        cond_map_channels: int = 0,
        nr_resnet: int = 5,
        channels: int = 160,
        dropout: float = 0.5,
        resolutions: int = 3,
    ) -> None:
        super().__init__(in_channels, out_channels, n_colors, cond_vec_dim, cond_map_channels)
        if resolutions < 1:
            raise ValueError(
                f"resolutions must be >= 1 (1: no down/up-sampling), got {resolutions}"
            )
        self.resolutions = r = resolutions
        if n_colors != 1:
            raise ValueError(
                "PixelCNN++ gives one parameter set per pixel and sees no channel of it, so it"
                " cannot order the colours of a pixel (n_colors > 1): use a likelihood that"
                " couples them itself (sequential_channels False: DiscretizedLogisticMixture)"
            )
        nf = channels
        cin = in_channels + 1  # + a constant-1 channel: zero padding then marks the border

        def stage(n: int, right: bool, aux: int) -> nn.ModuleList:
            kernel = (2, 2) if right else (2, 3)
            args = (nf, kernel, right, aux, dropout, cond_vec_dim, cond_map_channels)
            return nn.ModuleList([GatedResnet(*args) for _ in range(n)])

        self.u_init = ShiftedConv2d(cin, nf, (2, 3))
        self.ul_init_above = ShiftedConv2d(cin, nf, (1, 3))
        self.ul_init_left = ShiftedConv2d(cin, nf, (2, 1), right=True)
        self.up_u = nn.ModuleList([stage(nr_resnet, False, 0) for _ in range(r)])
        self.up_ul = nn.ModuleList([stage(nr_resnet, True, nf) for _ in range(r)])
        self.down_u_conv = nn.ModuleList([ShiftedConv2d(nf, nf, (2, 3), 2) for _ in range(r - 1)])
        self.down_ul_conv = nn.ModuleList(
            [ShiftedConv2d(nf, nf, (2, 2), 2, right=True) for _ in range(r - 1)]
        )
        # down pass, coarsest first: u gets a skip from u, ul gets [u, skip from ul]
        counts = (nr_resnet,) + (nr_resnet + 1,) * (r - 1)
        self.down_u = nn.ModuleList([stage(n, False, nf) for n in counts])
        self.down_ul = nn.ModuleList([stage(n, True, 2 * nf) for n in counts])
        self.up_u_conv = nn.ModuleList([ShiftedConvTranspose2d(nf, False) for _ in range(r - 1)])
        self.up_ul_conv = nn.ModuleList([ShiftedConvTranspose2d(nf, True) for _ in range(r - 1)])
        self.out = nn.Conv2d(nf, out_channels, 1)

        weight_norm_(self)  # Conv2d (the shifted ones included) and Linear: gain per dim 0
        for m in self.modules():
            # a transposed weight is (in, out, kh, kw): the output channels are dim 1
            if isinstance(m, nn.ConvTranspose2d) and not parametrize.is_parametrized(m):
                nn.utils.parametrizations.weight_norm(m, dim=1)

    def forward(
        self,
        x: torch.Tensor,
        cond_vec: torch.Tensor | None = None,
        cond_map: torch.Tensor | None = None,
    ) -> torch.Tensor:
        self.check_conditioning(cond_vec, cond_map)
        sizes = [tuple(x.shape[-2:])]
        while len(sizes) < self.resolutions:
            sizes.append(half(sizes[-1]))
        maps = [None if cond_map is None else resize_map(cond_map, s) for s in sizes]
        # channels-last (NHWC) all the way: on CPU the convolutions run ~10% faster in it
        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        x = x.contiguous(memory_format=torch.channels_last)

        # u(i, j) sees rows < i; ul(i, j) sees rows < i and row i left of j
        us = [shift_down(self.u_init(x))]
        uls = [shift_down(self.ul_init_above(x)) + shift_right(self.ul_init_left(x))]
        for s in range(self.resolutions):
            if s:
                us.append(self.down_u_conv[s - 1](us[-1]))
                uls.append(self.down_ul_conv[s - 1](uls[-1]))
            for block_u, block_ul in zip(self.up_u[s], self.up_ul[s], strict=True):
                us.append(block_u(us[-1], (), cond_vec, maps[s]))
                uls.append(block_ul(uls[-1], (us[-1],), cond_vec, maps[s]))

        u, ul = us.pop(), uls.pop()
        for k, s in enumerate(reversed(range(self.resolutions))):
            if k:
                u = self.up_u_conv[k - 1](u, sizes[s])
                ul = self.up_ul_conv[k - 1](ul, sizes[s])
            for block_u, block_ul in zip(self.down_u[k], self.down_ul[k], strict=True):
                u = block_u(u, (us.pop(),), cond_vec, maps[s])
                ul = block_ul(ul, (u, uls.pop()), cond_vec, maps[s])
        assert not us and not uls, "every skip is consumed"
        return self.out(F.elu(ul)).contiguous()

    def init_from_data(
        self,
        x: torch.Tensor,
        cond_vec: torch.Tensor | None = None,
        cond_map: torch.Tensor | None = None,
    ) -> int:
        """Data-dependent init of every layer from one forward pass on a batch (see
        weight_norm.data_dependent_init_); the batch should vary (the cond_vec map is
        normalized over the batch alone). Returns the number of layers initialized."""
        handles = [
            m.register_forward_hook(_init_transposed)
            for m in self.modules()
            if isinstance(m, ShiftedConvTranspose2d)
        ]
        try:
            n = data_dependent_init_(self, lambda: self(x, cond_vec, cond_map))
        finally:
            for h in handles:
                h.remove()
        return n + len(handles)
