"""Prepare LSUN bedrooms for `datamodules.LSUNBedrooms` from the official LMDB export.

Reads `bedroom_train_lmdb` and `bedroom_val_lmdb` (as unpacked from the LSUN downloads; their
values are JPEG or WebP bytes), takes the central square crop of every image, resizes it to each
resolution with PIL's BOX filter (`datamodules.natural_images.square_image`) and writes
`lsun_bedroom_{R}_train.npy` and `lsun_bedroom_{R}_valid.npy` (uint8 (N, R, R, 3), the caches
the datamodule memory-maps) into --out. Images that cannot be decoded are skipped and counted.

Duplicates. PixelVAE uses the preprocessing of Radford et al. (DCGAN) to remove duplicates,
which removed *near*-duplicates: images whose 32x32 crops got the same hash of a binarized
autoencoder code. This script is a simpler stand-in that removes *exact* duplicates only: a
training image is dropped when its 32x32 uint8 crop is byte-identical to that of an earlier one.
So the training set is larger than DCGAN's (near-duplicates stay in), and not the same set.
The valid split (the test set, 300 images) is kept whole.

    pip install lmdb
    python scripts/prepare_lsun.py --lmdb /data/lsun --out /data/lsun_bedroom
"""

import argparse
import hashlib
import io
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from datamodules.lsun import cache_paths
from datamodules.natural_images import NpyWriter, square_image

HASH_SIZE = 32  # duplicates are detected on the 32x32 crop
BATCH = 1024  # images decoded per step
LMDB = {"train": "bedroom_train_lmdb", "valid": "bedroom_val_lmdb"}


def process(value: bytes, resolutions: Sequence[int]) -> dict[int, np.ndarray] | None:
    """One encoded image -> its crop at HASH_SIZE and at each resolution; None if undecodable."""
    try:
        with Image.open(io.BytesIO(value)) as image:
            image.load()
            return {size: square_image(image, size) for size in {HASH_SIZE, *resolutions}}
    except (UnidentifiedImageError, OSError, ValueError):
        return None


class Deduplicator:
    """Remembers the 32x32 crops seen (as 16-byte digests) and tells whether one is new."""

    def __init__(self) -> None:
        self.seen: set[bytes] = set()

    def is_new(self, crop: np.ndarray) -> bool:
        digest = hashlib.blake2b(np.ascontiguousarray(crop).tobytes(), digest_size=16).digest()
        if digest in self.seen:
            return False
        self.seen.add(digest)
        return True


def convert(
    values: Iterable[bytes],
    count: int,
    paths: dict[int, Path],
    dedupe: bool,
    workers: int = 8,
) -> dict[str, int]:
    """Decode, crop and resize `values` (at most `count` encoded images) into one `.npy` per
    resolution (`paths`), dropping exact duplicates if `dedupe`. Returns the numbers of images
    kept, duplicates and undecodable ones."""
    dedupe_by = Deduplicator() if dedupe else None
    stats = {"kept": 0, "duplicates": 0, "undecodable": 0}
    with ExitStack() as stack, ThreadPoolExecutor(workers) as pool:
        writers = {
            size: stack.enter_context(NpyWriter(p, count, size)) for size, p in paths.items()
        }
        for batch in batches(values, BATCH):
            for crops in pool.map(lambda v: process(v, list(paths)), batch):
                if crops is None:
                    stats["undecodable"] += 1
                elif dedupe_by is not None and not dedupe_by.is_new(crops[HASH_SIZE]):
                    stats["duplicates"] += 1
                else:
                    for size, writer in writers.items():
                        writer.append(crops[size][None])
                    stats["kept"] += 1
    return stats


def batches(values: Iterable[bytes], n: int) -> Iterator[list[bytes]]:
    batch: list[bytes] = []
    for value in values:
        batch.append(value)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def read_lmdb(path: Path) -> tuple[int, Iterator[bytes]]:
    """The number of entries of an LMDB database and an iterator over its values (key order)."""
    try:
        import lmdb
    except ImportError as e:
        raise SystemExit("reading the LSUN LMDB export needs lmdb: pip install lmdb") from e
    if not (path / "data.mdb").is_file():
        raise SystemExit(f"{path}: not an LMDB directory (no data.mdb); unpack the LSUN zip there")
    env = lmdb.open(str(path), readonly=True, lock=False, readahead=False, max_readers=1)
    count = env.stat()["entries"]

    def values() -> Iterator[bytes]:
        with env.begin(write=False) as txn:
            for _, value in txn.cursor():
                yield bytes(value)
        env.close()

    return count, values()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lmdb", required=True, type=Path, help="directory of the *_lmdb folders")
    parser.add_argument("--out", required=True, type=Path, help="the datamodule's root")
    parser.add_argument("--resolutions", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    args = parser.parse_args()

    for split, folder in LMDB.items():
        count, values = read_lmdb(args.lmdb / folder)
        paths = {size: cache_paths(args.out, size)[split] for size in args.resolutions}
        if existing := [p for p in paths.values() if p.exists()]:
            raise SystemExit(f"{', '.join(map(str, existing))} exist: delete them to rebuild")
        stats = convert(values, count, paths, dedupe=split == "train", workers=args.workers)
        print(f"{split}: {count} images in {folder}: {stats}", file=sys.stderr)


if __name__ == "__main__":
    main()
