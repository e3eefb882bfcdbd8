"""ModelCheckpoint whose last.ckpt always holds the weights training ended with."""

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint


class RunCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint (the CLI's ``checkpoint`` key), plus one more ``last.ckpt``
    when training stops between two saves (``max_steps`` or ``max_time`` reached mid-epoch,
    a ``--trainer.limit_train_batches`` run): upstream saves one at the end only if it never
    saved one, so the steps since the last save would be lost."""

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
