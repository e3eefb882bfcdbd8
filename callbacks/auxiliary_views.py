"""The figures of the auxiliary-variable PixelCNNs (Kolesnikov & Lampert 2017): samples given
a real image's view (Fig. 3: colourizations of grayscale images) and samples at every level
of the model (Figs. 2 and 6: the grey view and its colouring; 8x8 up to 128x128)."""

from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F

from .image_callback import ImageCallback
from .images import save_grid
from .run_dir import run_dir
from .sample_grid import log_images

Sampling = Literal["model", "ordinary", "variance_reduced", "map"]


@contextmanager
def sampling_mode(pl_module, sampling: Sampling, log_scale_shift: float | None):
    """Within this block every mixture likelihood of the model samples by ``sampling``
    (``"model"``: as configured; Kolesnikov & Lampert Fig. 4: ``variance_reduced`` with
    ``log_scale_shift``, Fig. 5: ``map``); categorical levels sample as they are."""
    mixtures = {id(lik): lik for lik in pl_module.likelihoods if hasattr(lik, "sampling")}
    saved = {k: (lik.sampling, lik.log_scale_shift) for k, lik in mixtures.items()}
    try:
        for lik in mixtures.values():
            if sampling != "model":
                lik.sampling = sampling
            if log_scale_shift is not None:
                lik.log_scale_shift = log_scale_shift
        yield
    finally:
        for k, lik in mixtures.items():
            lik.sampling, lik.log_scale_shift = saved[k]


def for_display(pl_module, level: int, images: torch.Tensor, size: tuple[int, int]):
    """Images of a model level as RGB in [0, 1] at ``size``: levels scaled by their number,
    grey repeated over three channels, coarser levels enlarged by nearest neighbour."""
    lik = pl_module.likelihoods[level]
    top = getattr(lik, "n_values", None) or getattr(lik, "n_levels", 256)
    images = images.float() / (top - 1)
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    return F.interpolate(images, size=size, mode="nearest")


class Colourizations(ImageCallback):
    """Each row of ``colourizations_<tag>.png``: a validation (or test) image, its view X_1
    (the 4-bit grey image; for a pyramid, the half-resolution one) and ``n_colourings``
    images drawn from p(X | X_1), which keep that view exactly (Fig. 3). For models with
    ``colourize`` (AuxiliaryPixelCNN). Written by global rank zero to ``<log_dir>/samples/``
    and image loggers.

    Args:
        every_n_epochs: how often (validation epochs); 0 = only after testing.
        n_originals: images (rows) per figure.
        n_colourings: draws per image.
        seed: seed of the drawing noise, so the figures of two runs are comparable.
        sampling, log_scale_shift: how the mixtures draw (see :func:`sampling_mode`).
    """

    def __init__(
        self,
        every_n_epochs: int = 0,
        n_originals: int = 4,
        n_colourings: int = 3,
        seed: int = 0,
        sampling: Sampling = "model",
        log_scale_shift: float | None = None,
    ) -> None:
        super().__init__(every_n_epochs, n_originals)
        self.n_colourings = n_colourings
        self.seed = seed
        self.sampling, self.log_scale_shift = sampling, log_scale_shift

    @torch.no_grad()
    def write(self, trainer: L.Trainer, pl_module: L.LightningModule, tag: str) -> list[Path]:
        out = run_dir(trainer) / "samples"  # a collective under DDP: before rank zero's branch
        if not hasattr(pl_module, "colourize") or not trainer.is_global_zero:
            return []
        if self.originals is None or not self.n_colourings:
            return []
        x = self.originals.to(pl_module.device)
        view = pl_module.views_of(x)[1]
        torch.manual_seed(self.seed)
        with sampling_mode(pl_module, self.sampling, self.log_scale_shift):
            drawn = pl_module.colourize(view, self.n_colourings)
        size = tuple(x.shape[-2:])
        columns = [for_display(pl_module, 0, x, size), for_display(pl_module, 1, view, size)]
        columns += list(for_display(pl_module, 0, drawn, size).unflatten(0, (len(x), -1)).unbind(1))
        rows = torch.stack(columns, 1).flatten(0, 1)
        paths = [save_grid(rows, out / f"colourizations_{tag}.png", self.n_colourings + 2)]
        log_images(trainer, paths)
        return paths


class MultiScaleSamples(ImageCallback):
    """Each row of ``multiscale_<tag>.png``: one sample of the whole model at every level,
    coarsest first (Fig. 6: 8x8 ... 128x128; Fig. 2: the grey view, then its colouring),
    levels enlarged to the image's size. For models with ``sample_levels``
    (AuxiliaryPixelCNN).

    Args:
        every_n_epochs: how often (validation epochs); 0 = only after testing.
        n_samples: samples (rows) per figure.
        seed: seed of the sampling noise.
        sampling, log_scale_shift: how the mixtures draw (see :func:`sampling_mode`).
    """

    def __init__(
        self,
        every_n_epochs: int = 0,
        n_samples: int = 4,
        seed: int = 0,
        sampling: Sampling = "model",
        log_scale_shift: float | None = None,
    ) -> None:
        super().__init__(every_n_epochs, 0)
        self.n_samples = n_samples
        self.seed = seed
        self.sampling, self.log_scale_shift = sampling, log_scale_shift

    @torch.no_grad()
    def write(self, trainer: L.Trainer, pl_module: L.LightningModule, tag: str) -> list[Path]:
        out = run_dir(trainer) / "samples"  # a collective under DDP: before rank zero's branch
        if not hasattr(pl_module, "sample_levels") or not trainer.is_global_zero:
            return []
        if not self.n_samples:
            return []
        noise = pl_module.sample_noise(self.n_samples, torch.Generator().manual_seed(self.seed))
        with sampling_mode(pl_module, self.sampling, self.log_scale_shift):
            levels = pl_module.sample_levels(self.n_samples, noise)
        size = tuple(levels[0].shape[-2:])
        columns = [for_display(pl_module, k, v, size) for k, v in enumerate(levels)][::-1]
        rows = torch.stack(columns, 1).flatten(0, 1)
        suffix = "" if self.sampling == "model" else f"_{self.sampling}"
        path = out / f"multiscale{suffix}_{tag}.png"
        paths = [save_grid(rows, path, len(columns))]
        log_images(trainer, paths)
        return paths
