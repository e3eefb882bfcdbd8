"""Ancestral sampling of an autoregressive image model, pixel by pixel in raster order."""

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from tqdm.auto import tqdm

from .sampling_cache import PixelCache, caching_enabled

ParamsFn = Callable[[torch.Tensor, slice], torch.Tensor]
SampleFn = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]
CacheFn = Callable[[torch.Tensor], PixelCache | None]
_progress: ContextVar[tuple[str, Callable[[], None]] | None] = ContextVar("progress", default=None)


@contextmanager
def sampling_progress(label: str, check: Callable[[], None] = lambda: None) -> Iterator[None]:
    """Within this block every :func:`sample_autoregressive` shows a progress bar over the
    canvas rows, named ``label``, and calls ``check()`` after each row (which raises to stop
    it, e.g. on SIGTERM): drawing figures pixel by pixel can take minutes on a CPU."""
    token = _progress.set((label, check))
    try:
        yield
    finally:
        _progress.reset(token)


@torch.no_grad()
def sample_autoregressive(
    params_fn: ParamsFn,
    sample_fn: SampleFn,
    shape: tuple[int, ...],
    device: torch.device | str = "cpu",
    noise: torch.Tensor | None = None,
    sequential_channels: bool = True,
    context_rows: int | None = None,
    at_position: bool = False,
    cache: CacheFn | None = None,
) -> torch.Tensor:
    """Fill an all-zero (B, C, H, W) canvas one position at a time, in raster order.

    ``params_fn(x, rows)`` returns distribution parameters for the canvas rows ``rows`` given
    those rows of the canvas (it crops any conditioning map to the same rows); correct only
    if it is causal, which the masks guarantee. To sample row i it is given rows
    ``i - context_rows .. i`` only (all rows above when None), which is exact when
    ``context_rows`` covers its receptive field upwards and saves most of the compute.
    ``sample_fn(params, noise)`` draws from the parameters of one position, with that
    position's slice of ``noise`` (shaped like the canvas; None = fresh noise). With
    ``sequential_channels`` the channels of a position are drawn one after another
    (R -> G -> B); without, all at once (latent maps whose channels are independent given
    the earlier positions). ``at_position``: ``sample_fn`` is called as
    ``sample_fn(params, noise, canvas, i, j)``, for draws constrained by what is already drawn
    (a deterministic view of the image to keep).

    ``cache(canvas)``: the network's :class:`~.sampling_cache.PixelCache` for this canvas
    (``PixelDecoder.sampling_cache``; None where the network has none), which gives the
    same parameters as ``params_fn`` at one position's cost; ignored inside
    :func:`~.sampling_cache.reference_sampling`.
    """
    x = torch.zeros(shape, device=device)
    cached = cache(x) if cache is not None and caching_enabled() else None
    _, channels, height, width = shape

    groups = [[c] for c in range(channels)] if sequential_channels else [list(range(channels))]
    label, check = _progress.get() or (None, lambda: None)
    rows_done = tqdm(
        range(height),
        desc=f"{label}: sampling {channels}x{height}x{width} x {shape[0]}",
        unit="row",
        disable=label is None,
        dynamic_ncols=True,
    )
    for i in rows_done:
        top = 0 if context_rows is None else max(0, i - context_rows)
        rows = slice(top, i + 1)
        for j in range(width):
            position = noise[:, :, i : i + 1, j : j + 1] if noise is not None else None
            for group in groups:
                params = (
                    cached.params(x, i, j)
                    if cached is not None
                    else params_fn(x[:, :, rows], rows)[:, :, -1:, j : j + 1]
                )
                draw = (
                    sample_fn(params, position, x, i, j)
                    if at_position
                    else sample_fn(params, position)
                )
                x[:, group, i, j] = draw[:, group, 0, 0].to(x.dtype)
        check()
    return x
