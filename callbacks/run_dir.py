"""Where a run writes its files."""

from pathlib import Path

import lightning as L


def run_dir(trainer: L.Trainer) -> Path:
    """The run's log directory. Under DDP `trainer.log_dir` is a broadcast, so every rank
    must call this, before any rank-zero-only branch."""
    return Path(trainer.log_dir or trainer.default_root_dir)
