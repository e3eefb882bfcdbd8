"""Reading data files with errors that name the file, its problem and the fix."""

import zipfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np


def bad_file(where: object, problem: str, fix: str = "delete or replace it") -> ValueError:
    """A ValueError naming the file, its problem and what to do about it."""
    return ValueError(
        f"{where}: {problem}. The file is corrupt, incomplete or not the expected one: {fix}."
    )


def read_npz(
    path: Path, keys: Iterable[str], fix: str = "delete or replace it", optional: Iterable[str] = ()
) -> dict:
    """The arrays ``keys`` of an ``.npz`` file, read in full, and those of ``optional`` that
    it holds. A file that is not a zip archive (random bytes, a cut download: the archive's
    directory is at its end), a damaged member or a missing array of ``keys`` fails with
    :func:`bad_file`; pickled objects are never loaded."""
    keys = list(keys)
    if not zipfile.is_zipfile(path):
        raise bad_file(path, "not an .npz (zip) archive, or cut short", fix)
    try:
        with np.load(path, allow_pickle=False) as f:
            if missing := [k for k in keys if k not in f.files]:
                raise bad_file(path, f"no arrays {missing} (it has {f.files})", fix)
            return {k: f[k] for k in [*keys, *(k for k in optional if k in f.files)]}
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
        if isinstance(e, ValueError) and str(e).startswith(str(path)):
            raise  # ours, from above
        raise bad_file(path, f"a damaged archive member ({type(e).__name__})", fix) from e
