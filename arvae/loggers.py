"""A CSV logger that continues the metrics file of a resumed run instead of deleting it, and
whose runs started at the same moment never share a version directory."""

import atexit
import csv
import os

from lightning.pytorch.loggers import CSVLogger as LightningCSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities.rank_zero import rank_zero_only


class AppendingWriter(ExperimentWriter):
    """Lightning's writer deletes an existing ``metrics.csv`` when it opens a run directory;
    this one keeps its rows and columns and appends after them (rows logged after the
    resumed checkpoint by the interrupted attempt stay too: their steps repeat)."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                self.metrics_keys = next(csv.reader(file), [])


class CSVLogger(LightningCSVLogger):
    """Lightning's CSVLogger (``<save_dir>/<name>/<version>/metrics.csv``, ``hparams.yaml``),
    except that reopening a version, as ``--ckpt_path last`` and SLURM requeues do, appends
    to its ``metrics.csv``, and that the rows logged so far are written whenever a checkpoint
    is (a killed run's log then reaches its last checkpoint, where its resume starts), and that
    a new version is claimed by creating its directory (see :meth:`_get_next_version`)."""

    def _get_next_version(self) -> int:
        """The next free ``version_<n>``, claimed by creating its directory. Lightning only
        lists the existing ones, so runs that start together (``arvae sweep --parallel``, an
        array job) pick the same number and write into one directory; ``mkdir`` is atomic,
        so here the second one moves on to the next number. Only global rank 0 claims: the
        other DDP ranks use rank 0's directory (Lightning broadcasts it). A directory still
        empty when the process exits (the run failed before writing anything) is removed."""
        version = super()._get_next_version()
        if rank_zero_only.rank != 0 or "file" not in self._fs.protocol:
            return version  # (an object store has no directories to claim)
        root = os.path.join(self._root_dir, self.name)
        new = missing_dirs(root)
        self._fs.makedirs(root, exist_ok=True)
        while True:
            claimed = os.path.join(root, f"version_{version}")
            try:
                self._fs.makedirs(claimed, exist_ok=False)
            except FileExistsError:
                version += 1
                continue
            atexit.register(remove_if_empty, [claimed, *new])  # a run that failed to start
            return version

    def after_save_checkpoint(self, checkpoint_callback) -> None:
        super().after_save_checkpoint(checkpoint_callback)
        self.save()

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = AppendingWriter(log_dir=self.log_dir)
        return self._experiment


def missing_dirs(path: str) -> list[str]:
    """``path`` and those of its parents that do not exist yet, deepest first."""
    missing = []
    while path and not os.path.exists(path):
        missing.append(path)
        path = os.path.dirname(path)
    return missing


def remove_if_empty(paths: list[str]) -> None:
    """Remove each directory of ``paths`` (deepest first) that exists and holds nothing."""
    for path in paths:
        try:
            os.rmdir(path)  # fails unless empty
        except OSError:
            return
