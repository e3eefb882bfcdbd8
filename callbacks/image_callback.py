"""The schedule shared by the callbacks that draw images from the model."""

import lightning as L
import torch

from lightning_modules.backbone.autoregressive import sampling_progress


class ImageCallback(L.Callback):
    """Calls ``write(trainer, pl_module, tag)`` every ``every_n_epochs`` validation epochs
    (tag ``epochNNNN``; never during the sanity check; 0 = never) and after testing (tag
    ``test``), and keeps the first ``n_reconstructions`` images of the first validation /
    test batch as ``self.originals`` for reconstructions.

    ``write`` draws from copies of the random number generators: figures (drawn on global
    rank zero only) leave the training's random streams as they were, so rank zero's does
    not drift from the other ranks' and a run's results do not depend on which figures it
    draws, or how often. Pixel-by-pixel sampling inside ``write`` shows a progress bar and
    stops within a row of a SIGTERM.
    """

    def __init__(self, every_n_epochs: int, n_reconstructions: int) -> None:
        self.every_n_epochs = every_n_epochs
        self.n_reconstructions = n_reconstructions
        self.originals: torch.Tensor | None = None

    def write(self, trainer: L.Trainer, pl_module: L.LightningModule, tag: str) -> list:
        raise NotImplementedError

    def _keep_originals(self, batch, batch_idx: int, dataloader_idx: int) -> None:
        if batch_idx == 0 and dataloader_idx == 0:
            self.originals = batch[0][: self.n_reconstructions]

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
            self._write(trainer, pl_module, f"epoch{epoch:04d}")

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write(trainer, pl_module, "test")

    def _write(self, trainer: L.Trainer, pl_module: L.LightningModule, tag: str) -> None:
        device = pl_module.device
        forked = torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])
        with forked, sampling_progress(f"{type(self).__name__} {tag}", pl_module.stop_if_signalled):
            self.write(trainer, pl_module, tag)
