"""Fetch a data file from a list of mirrors, verified, written atomically.

A file only appears at its final path once it is complete and verified, so an interrupted
or corrupt download never leaves something that a later run would trust.
"""

import hashlib
import os
import tempfile
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

Checksum = tuple[str, str]
"""(hashlib algorithm, hex digest), e.g. ("md5", "f68b3c2d...")."""

Source = tuple[str, Checksum | None]
"""A mirror: (url, checksum or None when no published hash is known)."""


def fetch_url(url: str, dest: Path, timeout: float = 60.0) -> None:
    """Write the body of `url` to `dest`; raise if the server sends less than it announced."""
    with urllib.request.urlopen(url, timeout=timeout) as response, open(dest, "wb") as f:
        expected = response.headers.get("Content-Length")
        while chunk := response.read(1 << 20):
            f.write(chunk)
    if expected is not None and dest.stat().st_size != int(expected):
        raise OSError(f"truncated: got {dest.stat().st_size} of {expected} bytes")


def file_digest(path: Path, algorithm: str) -> str:
    """Hex digest of a file, read in chunks."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def download(
    sources: Sequence[Source], dest: Path, validate: Callable[[Path], object] | None = None
) -> None:
    """Fetch `dest` from the first source that works: checksum (when known) and `validate`
    (a content check that raises, for files with no published hash) must pass before the
    temporary file is renamed to `dest`. Raises RuntimeError listing every mirror's failure,
    after removing the folders it created for `dest` (nothing in them).
    """
    created = [p for p in (dest.parent, *dest.parent.parents) if not p.exists()]
    dest.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for url, checksum in sources:
        fd, name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
        os.close(fd)
        tmp = Path(name)
        try:
            fetch_url(url, tmp)
            if checksum is not None:
                algorithm, expected = checksum
                if (actual := file_digest(tmp, algorithm)) != expected:
                    raise ValueError(f"{algorithm} mismatch: got {actual}, expected {expected}")
            if validate is not None:
                validate(tmp)
            os.replace(tmp, dest)
            return
        except Exception as e:  # any failure means: try the next mirror
            errors.append(f"  {url}: {type(e).__name__}: {e}")
        finally:
            tmp.unlink(missing_ok=True)
    for folder in created:  # nothing was fetched: leave no empty data root behind
        if any(folder.iterdir()):
            break
        folder.rmdir()
    raise RuntimeError(f"could not download {dest.name}; tried:\n" + "\n".join(errors))
