"""Which run a `fit` continues: `--ckpt_path last` and SLURM requeues resume the same run.

A run lives in ``<save_dir>/<name>/<version>/`` of its first logger (CSV or TensorBoard):
``checkpoints/`` (``last.ckpt``, ``best-*.ckpt``), Lightning's ``hpc_ckpt_<n>.ckpt`` (saved
on SLURM's pre-emption signal), logs and ``run_record.json``. Left alone, a restarted
command would open a new ``version_<n+1>`` whose ``checkpoints/`` holds no ``last.ckpt``, and
Lightning would train from scratch with a warning. So before the trainer is built:

- under SLURM the version is ``slurm-<job id>`` (a requeued job keeps its id) and
  ``default_root_dir`` is the run directory, where Lightning writes and finds its HPC
  checkpoints;
- ``--ckpt_path last`` becomes the newest checkpoint of that run (of the newest run that has
  one when no version is fixed), ``last*.ckpt`` and HPC checkpoints alike, and the loggers
  continue that run's version: the same directory, metrics file and wandb run (its id is
  read from the run's ``run_record.json``). With no checkpoint yet it starts the run afresh,
  so a job script can always pass ``--ckpt_path last``.
"""

import json
import os
import re
from pathlib import Path
from typing import Any

from jsonargparse import Namespace
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities.rank_zero import rank_zero_info

VERSIONED_LOGGERS = ("CSVLogger", "TensorBoardLogger")


def slurm_job_id() -> str | None:
    """The SLURM job's id (``<array job>_<task>`` for an array task), which a requeued job
    keeps; None outside a batch job (an interactive shell does not count, as for Lightning)."""
    if not SLURMEnvironment.detect():
        return None
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array_job is not None:
        return f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


def loggers(trainer: Namespace) -> list[Namespace]:
    """The trainer config's logger entries (class_path + init_args), first first."""
    value = trainer.get("logger")
    entries = value if isinstance(value, list) else [value]
    return [e for e in entries if isinstance(e, Namespace) and "class_path" in e]


def short_name(entry: Namespace) -> str:
    return entry.class_path.rsplit(".", 1)[-1]


def run_root(entry: Namespace) -> Path:
    """``<save_dir>/<name>`` of a CSV / TensorBoard logger entry (Lightning's defaults)."""
    args = entry.get("init_args") or Namespace()
    default_name = "lightning_logs"
    name = args.get("name", default_name)
    return Path(args.get("save_dir") or ".") / (default_name if name is None else name)


def version_dir_name(version: Any) -> str:
    return version if isinstance(version, str) else f"version_{version}"


def checkpoints(run: Path) -> list[Path]:
    """The run's resumable checkpoints (last and HPC ones; never best-*), newest first."""
    found = [*run.glob("checkpoints/last*.ckpt"), *run.glob("hpc_ckpt_*.ckpt")]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def newest_run(root: Path) -> Path | None:
    """The run under ``root`` whose newest resumable checkpoint is the newest."""
    runs = [(checkpoints(run), run) for run in root.glob("*") if run.is_dir()]
    runs = [(found[0].stat().st_mtime, run) for found, run in runs if found]
    return max(runs)[1] if runs else None


def directory_version(run: Path) -> int | str:
    """The logger version that reopens ``run``: ``version_3`` -> 3, any other name as is."""
    match = re.fullmatch(r"version_(\d+)", run.name)
    return int(match.group(1)) if match else run.name


def wandb_id(run: Path) -> str | None:
    """The wandb run id recorded by `callbacks.RunRecord` for this run, if any."""
    path = run / "run_record.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text()).get("wandb_id")


def continue_run(config: Namespace) -> None:
    """Fix the run directory, logger versions and checkpoint of a ``fit`` config in place
    (see the module docstring). Every DDP rank calls it and resolves the same paths."""
    entries = loggers(config.trainer)
    first = entries[0] if entries and short_name(entries[0]) in VERSIONED_LOGGERS else None
    if first is None:
        return  # no versioned run directory to continue: Lightning's own behaviour
    args = first.init_args
    job = slurm_job_id()
    if args.get("version") is None and job is not None:
        args.version = f"slurm-{job}"
    run = None if args.get("version") is None else run_root(first) / version_dir_name(args.version)
    if run is not None and job is not None and config.trainer.get("default_root_dir") is None:
        config.trainer.default_root_dir = str(run)

    if config.get("ckpt_path") != "last":
        return
    if run is None:
        run = newest_run(run_root(first))
    found = checkpoints(run) if run is not None else []
    if not found:
        where = run or run_root(first)
        rank_zero_info(f"--ckpt_path last: no checkpoint in {where} yet; starting the run.")
        config.ckpt_path = None
        return
    config.ckpt_path = str(found[0])
    args.version = directory_version(run)
    rank_zero_info(f"--ckpt_path last: resuming {run} from {found[0]}")
    for entry in entries[1:]:
        if short_name(entry) == "WandbLogger" and (run_id := wandb_id(run)):
            entry.init_args.id = run_id
            entry.init_args.resume = "allow"
