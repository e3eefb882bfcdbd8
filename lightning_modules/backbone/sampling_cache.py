"""Cached autoregressive sampling (Ramachandran et al. 2017, "Fast generation for
convolutional autoregressive models"): a new pixel costs one position of work per layer
instead of a forward pass over the canvas.

A network's cache keeps, for the whole canvas, the input map of every layer that looks at
neighbouring positions. Asked for the parameters of position (i, j), it computes every
layer's output at (i, j) only, from those maps: everything such an output reads lies before
(i, j) in raster order (causality), so it is final and stored already. Work that depends on
whole earlier rows (the gated network's vertical stack) runs once per row. The stored values
are what the full forward pass computes there, so cached and uncached sampling draw the
same images from the same noise (tested per network); the uncached path stays as the
reference (:func:`reference_sampling`).
"""

from collections.abc import Callable
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import nn

from .masked_conv import HorizontalConv2d, MaskedConv2d

InputFn = Callable[[torch.Tensor], torch.Tensor]
_reference: ContextVar[bool] = ContextVar("reference_sampling", default=False)


@contextmanager
def reference_sampling():
    """Within this block samplers ignore the caches and run the whole network per position
    (the reference that the caches are tested and timed against)."""
    token = _reference.set(True)
    try:
        yield
    finally:
        _reference.reset(token)


def caching_enabled() -> bool:
    return not _reference.get()


def effective_weight(conv: nn.Conv2d) -> torch.Tensor:
    """The weight a (possibly masked, possibly weight-normalized) convolution applies."""
    mask = getattr(conv, "mask", None)
    return conv.weight if mask is None else conv.weight * mask


def matmul(add: torch.Tensor | None, v: torch.Tensor, weight_t: torch.Tensor) -> torch.Tensor:
    """add + v @ weight_t in one call (the per-position hot path: every op costs ~5 us)."""
    return torch.mm(v, weight_t) if add is None else torch.addmm(add, v, weight_t)


class Pointwise:
    """A 1x1 convolution as a matrix on (B, C) vectors: one position's channels."""

    def __init__(self, conv: nn.Conv2d) -> None:
        self.weight_t = effective_weight(conv).flatten(1).t().contiguous()
        self.bias = conv.bias

    def __call__(self, v: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
        """The convolution of v, plus ``add`` (B, C_out) when given."""
        if add is None:
            return matmul(self.bias, v, self.weight_t)
        return matmul(add if self.bias is None else add + self.bias, v, self.weight_t)


class Canvas:
    """A (B, C, H, W) map kept with ``pad`` zero rows above and zero columns on either
    side: the 'same' padding of the causal k x k convolutions (k = 2 pad + 1) that read it,
    so a window at the border reads zeros as the full convolution does. Stored channels
    last, (B, H, W, C): a window within one row is then a (B, taps x C) view, no copy."""

    def __init__(self, like: torch.Tensor, channels: int, height: int, width: int, pad: int):
        self.pad, self.width = pad, width
        self.data = like.new_zeros(like.shape[0], height + pad, width + 2 * pad, channels)

    def set(self, i: int, j: int, value: torch.Tensor) -> None:
        """Position (i, j) := value (B, C)."""
        self.data[:, i + self.pad, j + self.pad] = value

    def set_row(self, i: int, value: torch.Tensor) -> None:
        """Row i := value (B, C, W)."""
        self.data[:, i + self.pad, self.pad : self.pad + self.width] = value.transpose(1, 2)

    def rows(self, i: int, above: int) -> torch.Tensor:
        """Rows i - above .. i with the side padding, as a (B, C, above + 1, W + 2 pad)
        channels-last view (what F.conv2d takes)."""
        return self.data[:, i + self.pad - above : i + self.pad + 1].permute(0, 3, 1, 2)

    def window(self, i: int, j: int, above: int, left: int, right: int) -> torch.Tensor:
        """Rows i - above .. i, columns j - left .. j + right, flattened to (B, taps x C) in
        the order of :func:`taps_last`."""
        p = self.pad
        window = self.data[:, i + p - above : i + p + 1, j + p - left : j + p + right + 1]
        return window.reshape(window.shape[0], -1)


def taps_last(weight: torch.Tensor) -> torch.Tensor:
    """A convolution weight (out, C, rows, columns) as the (rows x columns x C, out) matrix
    that multiplies a :meth:`Canvas.window`."""
    return weight.permute(0, 2, 3, 1).flatten(1).t().contiguous()


class CausalConvAt:
    """A causal convolution (masked k x k, or a horizontal 1 x w one) evaluated at one
    position: only its taps up to the centre row (the rows below are masked to zero), as one
    matrix product with a window of the canvas it reads."""

    def __init__(self, conv: nn.Conv2d) -> None:
        kh, kw = conv.kernel_size
        weight = effective_weight(conv)
        if isinstance(conv, HorizontalConv2d):  # the row itself, left of and at the centre
            self.above, self.left, self.right = 0, kw - 1, 0
        elif isinstance(conv, MaskedConv2d):  # square, 'same' padding
            self.above, self.left, self.right = kh // 2, kw // 2, kw // 2
            weight = weight[:, :, : kh // 2 + 1]
        else:
            raise TypeError(f"not a causal convolution: {type(conv).__name__}")
        self.weight_t = taps_last(weight)
        self.bias = conv.bias

    def __call__(self, canvas: Canvas, i: int, j: int, add: torch.Tensor | None = None):
        """The convolution's output at (i, j), (B, C_out); ``add``, when given, is added
        instead of the bias (fold the bias into it)."""
        window = canvas.window(i, j, self.above, self.left, self.right)
        return matmul(self.bias if add is None else add, window, self.weight_t)


def at(bias: torch.Tensor | float, i: int, j: int) -> torch.Tensor | float:
    """A conditioning bias at position (i, j), (B, C), whatever its broadcast shape."""
    if not isinstance(bias, torch.Tensor):
        return bias
    return bias[:, :, min(i, bias.shape[2] - 1), min(j, bias.shape[3] - 1)]


def row_of(bias: torch.Tensor | float, i: int) -> torch.Tensor | float:
    """A conditioning bias on row i, broadcastable to (B, C, 1, W)."""
    if not isinstance(bias, torch.Tensor):
        return bias
    i = min(i, bias.shape[2] - 1)
    return bias[:, :, i : i + 1]


class PixelCache:
    """The state of one cached sampling run over a (B, C, H, W) canvas.

    ``params(x, i, j)`` gives the network's output at (i, j) for the canvas x as the
    sampler has filled it so far (raster order; within a pixel, its channels in turn).
    ``input_fn`` is the model's per-pixel transform from data to network input (the
    likelihood's ``network_input``, an embedding); the cache applies it to the positions
    drawn, so the network input stays in step with the canvas. Subclasses implement
    ``start_row(i)`` (work shared by a whole row, once rows < i are final) and ``at(i, j)``
    (every layer at (i, j), from ``self.inputs``, a :class:`Canvas` of ``input_pad``).
    """

    def __init__(
        self, input_fn: InputFn, x: torch.Tensor, in_channels: int, input_pad: int
    ) -> None:
        self.input_fn = input_fn
        self.batch, _, self.height, self.width = x.shape
        self.inputs = Canvas(x, in_channels, self.height, self.width, input_pad)
        self.position: tuple[int, int] | None = None

    def sync(self, x: torch.Tensor, i: int, j: int) -> None:
        self.inputs.set(i, j, self.input_fn(x[:, :, i : i + 1, j : j + 1])[:, :, 0, 0])

    @torch.no_grad()
    def params(self, x: torch.Tensor, i: int, j: int) -> torch.Tensor:
        """(B, out_channels, 1, 1): the network's output at (i, j) given the canvas x."""
        if self.position != (i, j):
            if self.position is not None:
                self.sync(x, *self.position)  # its last channels were drawn after the call
            if self.position is None or self.position[0] != i:
                self.start_row(i)
            self.position = (i, j)
        self.sync(x, i, j)
        return self.at(i, j)[:, :, None, None]

    def start_row(self, i: int) -> None:
        """Work that row i shares, run when rows < i are final (none by default)."""

    def at(self, i: int, j: int) -> torch.Tensor:
        raise NotImplementedError
