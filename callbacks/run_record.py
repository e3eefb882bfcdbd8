"""What produced a run: package versions, git commit and command line, beside its checkpoint."""

import json
import platform
import subprocess
import sys
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import lightning as L

from .run_dir import run_dir

PACKAGES = ("arvae", "torch", "lightning", "torchmetrics", "numpy", "einops", "jsonargparse")
REPO = Path(__file__).resolve().parents[1]


def git_commit(repo: Path = REPO) -> dict[str, Any] | None:
    """HEAD of the checkout the code runs from and whether it has uncommitted changes; None
    when it is not a git checkout (an installed wheel) or git is missing."""

    def git(*args: str) -> str:
        cmd = ["git", "-C", str(repo), *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=True).stdout

    try:
        return {
            "commit": git("rev-parse", "HEAD").strip(),
            "dirty": bool(git("status", "--porcelain").strip()),
        }
    except (OSError, subprocess.SubprocessError):
        return None


def run_record() -> dict[str, Any]:
    """Versions, commit, command line, host and time of this process."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    return {
        "python": platform.python_version(),
        "packages": versions,
        "git": git_commit(),
        "argv": sys.argv,
        "host": platform.node(),
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


class RunRecord(L.Callback):
    """At the start of ``fit`` global rank zero writes ``<log_dir>/run_record.json`` (next to
    the ``config.yaml`` that LightningCLI saves, and to ``checkpoints/``); every checkpoint
    carries the same record under ``"arvae_run"``, so a checkpoint says what made it."""

    def __init__(self, filename: str = "run_record.json") -> None:
        self.filename = filename
        self.record: dict[str, Any] | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        log_dir = run_dir(trainer)
        self.record = run_record()
        if trainer.is_global_zero:
            log_dir.mkdir(parents=True, exist_ok=True)
            (log_dir / self.filename).write_text(json.dumps(self.record, indent=2) + "\n")

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        checkpoint["arvae_run"] = self.record or run_record()
