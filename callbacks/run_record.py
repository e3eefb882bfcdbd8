"""What produced a run: package versions, git commit and command line, beside its checkpoint;
under DDP also a check that every rank runs the same configuration."""

import hashlib
import json
import platform
import subprocess
import sys
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger

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


def config_hash(pl_module: L.LightningModule, datamodule: Any) -> int:
    """A 60-bit hash of the model's and the datamodule's hyper-parameters (an object that is
    not plain data counts by its type, so no memory address makes ranks differ)."""
    hparams = {"model": dict(pl_module.hparams), "data": dict(getattr(datamodule, "hparams", {}))}
    text = json.dumps(hparams, sort_keys=True, default=lambda v: type(v).__qualname__)
    return int(hashlib.sha256(text.encode()).hexdigest()[:15], 16)


def check_same_config(trainer: L.Trainer, pl_module: L.LightningModule) -> None:
    """Raise on every rank if the ranks' resolved configurations differ. LightningCLI under
    DDP relaunches the same command line for the other ranks; this proves that every rank
    (e.g. of a sweep run) got the same parameters, at the cost of one tiny all-gather."""
    mine = torch.tensor(config_hash(pl_module, trainer.datamodule), device=pl_module.device)
    hashes = trainer.strategy.all_gather(mine).reshape(-1).tolist()
    odd = [rank for rank, h in enumerate(hashes) if h != hashes[0]]
    if odd:
        raise RuntimeError(
            f"DDP ranks {odd} resolved other model or data hyper-parameters than rank 0: "
            "every rank must get the same command line and config files"
        )


class RunRecord(L.Callback):
    """At the start of ``fit`` global rank zero writes ``<log_dir>/run_record.json`` (next to
    the ``config.yaml`` that LightningCLI saves, and to ``checkpoints/``); every checkpoint
    carries the same record under ``"arvae_run"``, so a checkpoint says what made it. A
    resumed run keeps the earlier attempts' start times, commands and commits, and the wandb
    run id that the next resume continues. Under DDP the ranks first check that they
    resolved the same configuration."""

    def __init__(self, filename: str = "run_record.json") -> None:
        self.filename = filename
        self.record: dict[str, Any] | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.world_size > 1:
            check_same_config(trainer, pl_module)
        log_dir = run_dir(trainer)
        self.record = {**run_record(), "world_size": trainer.world_size}
        if not trainer.is_global_zero:
            return
        wandb = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if wandb:  # a resumed run continues this wandb run (arvae.resume)
            self.record["wandb_id"] = wandb[0].version
        path = log_dir / self.filename
        if path.is_file():  # a resumed run: keep what every earlier attempt recorded
            earlier = json.loads(path.read_text())
            self.record["earlier_attempts"] = [
                *earlier.pop("earlier_attempts", []),
                {k: earlier.get(k) for k in ("started_at", "argv", "host", "git")},
            ]
        log_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.record, indent=2) + "\n")

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        checkpoint["arvae_run"] = self.record or run_record()
