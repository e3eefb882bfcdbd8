"""Callbacks that interrupt a CLI run the way a cluster does, at a chosen training step.

Added to an `arvae fit` subprocess with ``--trainer.callbacks+=tests.fault_injection.<Name>``
(the repository root is on its PYTHONPATH).
"""

import os
import signal
import time

import lightning as L


class KillAtStep(L.Callback):
    """SIGKILL this process when training reaches ``step``: no handler, no cleanup, exactly
    what an out-of-memory killer or a lost node does."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class SignalAtStep(L.Callback):
    """Send ``signal`` (SIGUSR1: SLURM's warning before the time limit) to this process
    at the end of training step ``step``, once."""

    def __init__(self, step: int, signal: str = "SIGUSR1") -> None:
        self.step = step
        self.signal = signal

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), getattr(signal, self.signal))


class NaNBatchOnRank(L.Callback):
    """Put a NaN into the batch of global rank ``rank`` at training steps ``steps``: that
    rank's loss and gradients go non-finite, and DDP's all-reduce carries the NaN to every
    rank. After every step the ranks compare a checksum of their weights and fail if they
    differ (a rank that stepped while another skipped would have drifted)."""

    def __init__(self, rank: int, steps: list[int]) -> None:
        self.rank = rank
        self.steps = steps

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_rank == self.rank and trainer.global_step in self.steps:
            batch[0][0, 0, 0, 0] = float("nan")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        checksum = sum(p.detach().double().sum() for p in pl_module.parameters())
        sums = trainer.strategy.all_gather(checksum.float()).reshape(-1)
        if not bool((sums == sums[0]).all()):
            raise RuntimeError(f"DDP replicas drifted apart: weight checksums {sums.tolist()}")


class SigtermAtTestBatch(L.Callback):
    """SIGTERM this process (a cluster's stop) as test batch ``batch`` starts, once."""

    def __init__(self, batch: int = 0) -> None:
        self.batch = batch

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if batch_idx == self.batch:
            os.kill(os.getpid(), signal.SIGTERM)


class SlowUntilRequeued(L.Callback):
    """Sleep ``seconds`` after every training step of a job's first launch (until SLURM has
    requeued it: ``SLURM_RESTART_COUNT`` > 0), so that a real cluster's time-limit signal
    arrives mid-training; the requeued launch runs at full speed."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if int(os.environ.get("SLURM_RESTART_COUNT", "0")) == 0:
            time.sleep(self.seconds)
