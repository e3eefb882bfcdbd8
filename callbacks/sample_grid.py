"""Samples and reconstructions as PNG grids, on disk and in the logger."""

from pathlib import Path

import lightning as L
import numpy as np
import torch
from einops import rearrange
from PIL import Image

from .images import save_grid
from .run_dir import run_dir


class SampleGrid(L.Callback):
    """Every ``every_n_epochs`` validation epochs and after testing, draws ``n_samples``
    samples and, for models with ``reconstruct``, reconstructs the first
    ``n_reconstructions`` validation (or test) images; the grid alternates original and
    reconstruction columns (PixelVAE appendix C). Written once, by global rank zero, to
    ``<log_dir>/samples/`` and to loggers that take images (wandb, TensorBoard).

    Args:
        every_n_epochs: how often (validation epochs); 0 = only after testing.
        n_samples: samples per grid.
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
        self.every_n_epochs = every_n_epochs
        self.n_samples = n_samples
        self.n_reconstructions = n_reconstructions
        self.ncols = ncols
        self._originals: torch.Tensor | None = None

    def _keep_originals(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        if batch_idx == 0 and dataloader_idx == 0:
            self._originals = batch[0][: self.n_reconstructions]

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ):
        self._keep_originals(batch, batch_idx, dataloader_idx)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._keep_originals(batch, batch_idx, dataloader_idx)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch
        if trainer.sanity_checking or self.every_n_epochs <= 0:
            return
        if (epoch + 1) % self.every_n_epochs == 0:
            self.write(trainer, pl_module, f"epoch{epoch:04d}")

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.write(trainer, pl_module, "test")

    @torch.no_grad()
    def write(self, trainer: L.Trainer, pl_module: L.LightningModule, tag: str) -> list[Path]:
        out = run_dir(trainer) / "samples"
        if not trainer.is_global_zero:
            return []
        paths = [
            save_grid(pl_module.sample(self.n_samples), out / f"samples_{tag}.png", self.ncols)
        ]
        if (
            self.n_reconstructions
            and hasattr(pl_module, "reconstruct")
            and self._originals is not None
        ):
            x = self._originals.to(pl_module.device)
            pairs = rearrange([x, pl_module.reconstruct(x)], "two n c h w -> (n two) c h w")
            paths.append(
                save_grid(pairs, out / f"reconstructions_{tag}.png", 2 * (self.ncols // 2))
            )
        for logger in trainer.loggers:
            for path in paths:
                _log_image(logger, path, trainer.global_step)
        return paths


def _log_image(logger, path: Path, step: int) -> None:
    """Send a PNG to loggers that take images; CSV loggers keep only the file on disk."""
    key = f"images/{path.stem.rsplit('_', 1)[0]}"
    if hasattr(logger, "log_image"):  # WandbLogger
        logger.log_image(key=key, images=[str(path)], step=step)
    elif hasattr(getattr(logger, "experiment", None), "add_image"):  # TensorBoardLogger
        image = np.asarray(Image.open(path))
        fmt = "HW" if image.ndim == 2 else "HWC"
        logger.experiment.add_image(key, image, step, dataformats=fmt)
