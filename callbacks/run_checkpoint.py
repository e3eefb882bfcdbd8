"""ModelCheckpoint whose last.ckpt is never behind: every validation, periodic saves and the
end of training."""

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint


class RunCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint (the CLI's ``checkpoint`` key) with three guarantees for
    ``last.ckpt``, the file ``--ckpt_path last`` resumes from:

    - it is written at every validation (at every epoch end when nothing validates), new
      best or not. Upstream copies it only beside a top-k save, so on a plateau a crash
      lost everything since the last improvement and a resume went back to the best step;
    - with ``every_n_train_steps``, it is written every n steps from the start. Upstream
      defers every save, ``last.ckpt`` included, until the monitored validation metric
      exists, so a run validating every 5 epochs would save nothing before its first
      validation and a crash would lose all of it;
    - it is written again when training stops between two saves (``max_steps`` or
      ``max_time`` reached mid-epoch): upstream does so only if it never saved one.

    A save that upstream already made at the same step is not repeated. ``save_last:
    link`` is refused: upstream then makes ``last.ckpt`` a link to the newest top-k file,
    which on a plateau holds older weights, and a save through that link would overwrite it.
    """

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.save_last == "link":
            raise ValueError(
                "checkpoint.save_last: link makes last.ckpt a link to the newest best-* file,"
                " older than the newest weights when validation stops improving, so"
                " --ckpt_path last would resume from it; use save_last: true (the default)."
            )
        super().setup(trainer, pl_module, stage)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx):
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        n = self._every_n_train_steps
        if n > 0 and trainer.global_step % n == 0:
            self._save_last(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_last(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._save_last(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save_last(trainer)

    def _save_last(self, trainer: L.Trainer) -> None:
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
