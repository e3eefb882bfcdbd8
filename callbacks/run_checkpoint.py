"""ModelCheckpoint whose last.ckpt is never behind: periodic saves and the end of training."""

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint


class RunCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint (the CLI's ``checkpoint`` key) with two guarantees for
    ``last.ckpt``, the file ``--ckpt_path last`` resumes from:

    - with ``every_n_train_steps``, it is written every n steps from the start. Upstream
      defers every save, ``last.ckpt`` included, until the monitored validation metric
      exists, so a run validating every 5 epochs would save nothing before its first
      validation and a crash would lose all of it;
    - it is written again when training stops between two saves (``max_steps`` or
      ``max_time`` reached mid-epoch): upstream does so only if it never saved one.
    """

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx):
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        n = self._every_n_train_steps
        if n > 0 and trainer.global_step % n == 0:
            self._save_last(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save_last(trainer)

    def _save_last(self, trainer: L.Trainer) -> None:
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
