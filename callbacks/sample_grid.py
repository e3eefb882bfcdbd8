"""Samples and reconstructions as PNG grids, on disk and in the logger."""

from pathlib import Path

import lightning as L
import numpy as np
import torch
from einops import rearrange
from PIL import Image

from .image_callback import ImageCallback
from .images import save_grid
from .run_dir import run_dir


class SampleGrid(ImageCallback):
    """Every ``every_n_epochs`` validation epochs and after testing, draws ``n_samples``
    samples and, for models with ``reconstruct``, reconstructs the first
    ``n_reconstructions`` validation (or test) images; the grid alternates original and
    reconstruction columns (PixelVAE appendix C). Written once, by global rank zero, to
    ``<log_dir>/samples/`` and to loggers that take images (wandb, TensorBoard).

    Args:
        every_n_epochs: how often (validation epochs); 0 = only after testing.
        n_samples: samples per grid (0 = none).
        n_reconstructions: originals reconstructed per grid (0 = none).
        ncols: images per grid row.
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        n_samples: int = 64,
        n_reconstructions: int = 8,
        ncols: int = 8,
    ) -> None:
        super().__init__(every_n_epochs, n_reconstructions)
        self.n_samples = n_samples
        self.ncols = ncols

    @torch.no_grad()
    def write(self, trainer: L.Trainer, pl_module: L.LightningModule, tag: str) -> list[Path]:
        out = run_dir(trainer) / "samples"
        if not trainer.is_global_zero:
            return []
        paths = []
        if self.n_samples:
            samples = pl_module.to_unit_range(pl_module.sample(self.n_samples))
            paths.append(save_grid(samples, out / f"samples_{tag}.png", self.ncols))
        if (
            self.n_reconstructions
            and hasattr(pl_module, "reconstruct")
            and self.originals is not None
        ):
            x = self.originals.to(pl_module.device)
            pairs = rearrange([x, pl_module.reconstruct(x)], "two n c h w -> (n two) c h w")
            pairs = pl_module.to_unit_range(pairs)
            paths.append(
                save_grid(pairs, out / f"reconstructions_{tag}.png", 2 * (self.ncols // 2))
            )
        log_images(trainer, paths)
        return paths


def log_images(trainer: L.Trainer, paths: list[Path]) -> None:
    """Send PNGs to every logger of the trainer that takes images."""
    for logger in trainer.loggers:
        for path in paths:
            _log_image(logger, path, trainer.global_step)


def _log_image(logger, path: Path, step: int) -> None:
    """Send a PNG to loggers that take images; CSV loggers keep only the file on disk."""
    key = f"images/{path.stem.rsplit('_', 1)[0]}"
    if hasattr(logger, "log_image"):  # WandbLogger
        logger.log_image(key=key, images=[str(path)], step=step)
    elif hasattr(getattr(logger, "experiment", None), "add_image"):  # TensorBoardLogger
        image = np.asarray(Image.open(path))
        fmt = "HW" if image.ndim == 2 else "HWC"
        logger.experiment.add_image(key, image, step, dataformats=fmt)
