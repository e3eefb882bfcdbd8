"""Checkpoints that are never half-written, and a clear error for one that is damaged.

Lightning's own writer stages a checkpoint in the system temp directory and then moves it
into place; when that directory is on another file system (node-local /tmp, runs on a
shared one: the usual cluster set-up) the move is a copy, so a job killed during it leaves a
truncated file in place of the previous checkpoint. Here the bytes go to a hidden file next
to the target, are flushed to disk, and replace the target in one ``os.replace``: a reader
sees the old checkpoint or the new one, never a part. A crash leaves at most the hidden
``.<name>.<pid>.partial`` file, which no checkpoint search matches.
"""

import os
import zipfile
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be read (truncated, damaged or not a checkpoint)."""


def is_local(path: _PATH) -> bool:
    return isinstance(get_filesystem(path), LocalFileSystem)


def save_atomically(checkpoint: dict[str, Any], path: _PATH) -> None:
    """torch.save to a hidden sibling, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        with open(partial, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def check_readable(path: _PATH) -> None:
    """Raise :class:`CheckpointError` unless the local file ``path`` is a whole torch.save
    archive: every member present and matching its CRC (a truncated copy fails, and so does
    one with a damaged byte, which torch.load might read without noticing). Remote and
    missing paths are left to Lightning's own errors. A file already verified in this
    process, unchanged since, is not read again (the CLI checks a --ckpt_path before
    LightningCLI reads it, and the trainer's checkpoint IO when it loads it)."""
    if not (is_local(path) and Path(path).is_file()):
        return
    stat = os.stat(path)
    verify_archive(str(Path(path).resolve()), stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=16)
def verify_archive(path: str, mtime_ns: int, size: int) -> None:
    """The CRC check of :func:`check_readable`, cached by the file's identity (a damaged
    file raises, and raising is not cached)."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
        if bad is not None:
            raise zipfile.BadZipFile(f"member {bad} fails its CRC check")
    except (zipfile.BadZipFile, EOFError, ValueError) as e:
        raise damaged_checkpoint_error(path, e) from e


def damaged_checkpoint_error(path: _PATH, error: Exception) -> CheckpointError:
    """The error for an unreadable checkpoint: which file, the likely cause, and the others
    beside it to resume from instead."""
    folder = Path(path).parent
    others = sorted(
        (p for p in folder.glob("*.ckpt") if p != Path(path)),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    listing = "\n".join(f"  {p}" for p in others) or "  (none)"
    return CheckpointError(
        f"Cannot read the checkpoint {path} ({error}). It is truncated or damaged: usually a"
        " copy that did not finish, or a job killed while another program wrote it"
        " (checkpoints written by arvae are replaced atomically, so the one before it is"
        f" whole). Pass another with --ckpt_path; newest first in {folder}:\n{listing}"
    )


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO that replaces local checkpoints atomically and names a damaged one
    in a clear error when loading (remote paths use Lightning's writer)."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or not is_local(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        save_atomically(checkpoint, path)

    def load_checkpoint(self, path: _PATH, *args: Any, **kwargs: Any) -> dict[str, Any]:
        check_readable(path)
        return super().load_checkpoint(path, *args, **kwargs)
