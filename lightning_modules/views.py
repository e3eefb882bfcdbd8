"""Deterministic views X̂ = ψ(X) of an image, the auxiliary variables of Kolesnikov & Lampert
(ICML 2017, §3): a view is itself an image of levels 0..n-1 that a PixelCNN can model, so

    log p(X) = log p(ψ(X)) + log p(X | ψ(X))

with no latent to integrate out. Every view computes in integer arithmetic (int64), so ψ is
exact and repeatable on every device and dtype; its output is levels in the image's floating
dtype (float32 for integer images), as the datamodules give images.
"""

import torch
import torch.nn.functional as F

from .likelihoods import Bounds


class View:
    """ψ: images (B, C, H, W) of ``in_levels`` levels -> views (B, C', H', W') of
    :attr:`out_levels` levels. ``name(shape)`` names the view's level in metric keys."""

    out_levels: int

    def shape(self, image_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        raise NotImplementedError

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def name(self, image_shape: tuple[int, int, int]) -> str:
        raise NotImplementedError

    def pixel_bounds(self, view: torch.Tensor, canvas: torch.Tensor, i: int, j: int) -> Bounds:
        """For drawing pixel (i, j) of an image whose view must be ``view``, with ``canvas``
        holding the pixels before it: ``bounds(c, drawn) -> (low, high)``, the levels colour c
        may take given the pixel's earlier colours ``drawn`` so that the image can still be
        completed to one with this view (each range non-empty when the earlier pixels came
        from theirs). Drawing every pixel within them keeps ψ(X) = view exactly."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in vars(self).items())})"


class Grayscale(View):
    """The Grayscale PixelCNN's view (§3.1): a ``bits``-bit grayscale image of an 8-bit RGB one.

    The paper names neither the RGB weights nor the rounding. Here: the ITU-R BT.601 luma
    weights (0.299, 0.587, 0.114), integers per mille so that the sum is exact, and the
    grey value 0..255 cut into 2**bits equal bins (floor): level = (299 R + 587 G + 114 B)
    // (1000 * 2**(8 - bits)). With bits = 4, levels 0..15, each 16 grey values wide.
    """

    WEIGHTS = (299, 587, 114)  # BT.601 luma, per mille: they sum to 1000

    def __init__(self, bits: int = 4) -> None:
        if not 1 <= bits <= 8:
            raise ValueError(f"Grayscale bits must be 1..8, got {bits}")
        self.bits = bits
        self.out_levels = 2**bits

    def shape(self, image_shape):
        channels, height, width = image_shape
        if channels != 3:
            raise ValueError(f"Grayscale views RGB images (C = 3), got C = {channels}")
        return 1, height, width

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        r, g, b = x.round().long().unbind(1)
        luma = self.WEIGHTS[0] * r + self.WEIGHTS[1] * g + self.WEIGHTS[2] * b
        return as_levels(luma // (1000 * 2 ** (8 - self.bits)), x)[:, None]

    def name(self, image_shape) -> str:
        return f"gray{self.bits}"

    def pixel_bounds(self, view, canvas, i, j) -> Bounds:
        """sum_c w_c x_c must stay in [D g, D g + D - 1] (D = 1000 * 2**(8 - bits), g the grey
        level): colour c is bounded by what the drawn colours use and the later ones can
        still add (0 .. 255 w_c' each)."""
        width = 1000 * 2 ** (8 - self.bits)
        low_sum = view[:, 0, i : i + 1, j : j + 1].round().long() * width
        high_sum = low_sum + width - 1

        def bounds(c: int, drawn: list[torch.Tensor]):
            weights = self.WEIGHTS[: len(drawn)]
            used = sum((w * d.round().long() for w, d in zip(weights, drawn, strict=True)), 0)
            later = 255 * sum(self.WEIGHTS[c + 1 :])
            w = self.WEIGHTS[c]
            low = -((used + later - low_sum) // w)  # ceil((low_sum - used - later) / w)
            high = (high_sum - used) // w
            return low.clamp(0, 255), high.clamp(0, 255)

        return bounds


class HalfResolution(View):
    """The Pyramid PixelCNN's view (§3.2): the image at half resolution, each pixel the mean of
    its 2x2 block of the finer image (per channel), rounded half up; at an odd size the last
    row / column of blocks has fewer pixels and averages those (ceil(H/2) x ceil(W/2)). The
    paper does not say how it down-samples; box averaging keeps every level an image of the
    same levels (8-bit stays 8-bit) and is exact in integers: (2 S + n) // (2 n) for a block
    of n pixels summing to S."""

    def __init__(self, levels: int = 256) -> None:
        self.out_levels = levels

    def shape(self, image_shape):
        channels, height, width = image_shape
        if min(height, width) < 2:
            raise ValueError(f"cannot halve a {height}x{width} image further")
        return channels, (height + 1) // 2, (width + 1) // 2

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        pad = (0, width % 2, 0, height % 2)
        levels = x.round().long()
        total = block_sum(F.pad(levels, pad))
        n = block_sum(F.pad(torch.ones_like(levels[:1, :1]), pad))  # pixels per block: 4 inside
        return as_levels((2 * total + n) // (2 * n), x)

    def name(self, image_shape) -> str:
        _, height, width = self.shape(image_shape)
        return f"{height}x{width}"

    def pixel_bounds(self, view, canvas, i, j) -> Bounds:
        """Per colour, the block's n pixels must sum to S in [ceil(n v - n / 2),
        floor(n v + (n - 1) / 2)] (v the coarse level): pixel (i, j) is bounded by the block's
        pixels drawn before it and what its r later ones can still add (0 .. 255 r)."""
        height, width = canvas.shape[-2:]
        top, left = i - i % 2, j - j % 2
        block = [
            (a, b) for a in (top, top + 1) for b in (left, left + 1) if a < height and b < width
        ]
        earlier = block[: block.index((i, j))]
        n, later = len(block), len(block) - len(earlier) - 1
        target = view[:, :, i // 2, j // 2].round().long()[..., None, None]  # (B, C, 1, 1)
        low_sum = -((n - 2 * n * target) // 2)  # ceil((2 n v - n) / 2)
        high_sum = (2 * n * target + n - 1) // 2
        used = sum((canvas[:, :, a, b].round().long()[..., None, None] for a, b in earlier), 0)
        low = (low_sum - used - 255 * later).clamp(0, 255)
        high = (high_sum - used).clamp(0, 255)
        return lambda c, drawn: (low[:, c], high[:, c])


class Quantize(View):
    """AGAVE's coarser colours (§4.2, Fig. 5): each 8-bit value v of every channel cut into
    ``levels`` equal bins, v // (256 / levels); ``levels`` divides 256 (256: the image)."""

    def __init__(self, levels: int = 32) -> None:
        if levels < 2 or 256 % levels:
            raise ValueError(f"Quantize levels must divide 256 (2, 4, ..., 256), got {levels}")
        self.out_levels = levels

    def shape(self, image_shape):
        return tuple(image_shape)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return as_levels(x.round().long() // (256 // self.out_levels), x)

    def name(self, image_shape) -> str:
        return f"levels{self.out_levels}"


def as_levels(levels: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Integer levels in the floating dtype of the image they came from (float32 for ints)."""
    return levels.to(like.dtype if like.is_floating_point() else torch.float32)


def block_sum(x: torch.Tensor) -> torch.Tensor:
    """Sums of the 2x2 blocks of an even-sized (B, C, H, W) integer tensor."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).sum((3, 5))
