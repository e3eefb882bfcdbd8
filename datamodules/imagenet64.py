"""Downsampled ImageNet 64x64, RGB, values 0..255: two different releases, both read.

van den Oord et al. (2016, Pixel Recurrent Neural Networks): `train_64x64.tar` and
    `valid_64x64.tar`, folders of 64x64 PNGs, 1,281,149 train / 49,999 valid. The benchmark of
    the PixelRNN/PixelCNN line of papers: PixelVAE's Table 2 (3.62 bits/dim) is on this one.
Chrabaszcz et al. (2017, A Downsampled Variant of ImageNet): npz batches
    `train_data_batch_1..10.npz` (arrays data: uint8 (N, 12288), each row one image in
    channel-planar order, 4096 red values then green then blue, each row-major; labels; mean)
    and `val_data.npz` (data, labels), 1,281,167 train / 50,000 valid.
They are two different downsamplings of ImageNet (different resizing, different image sets):
bits/dim on one are not comparable to numbers on the other.

Splits: test = the valid release (what the papers report on); validation = the last
    `val_size` (default 10,000) training images in file order, train = the rest.
Sources in `root`, the first one found (one dataset per root):
    1. the caches `imagenet64_train.npy` and `imagenet64_valid.npy`, uint8 (N, 64, 64, 3),
       memory-mapped: the set (15.7 GB) is never loaded into memory.
    2. `train_64x64/` and `valid_64x64/`, the extracted tars (PNG files, in natural order of
       their names).
    3. `train_data_batch_{1..10}.npz` and `val_data.npz`, in root or one folder below it.
    4. `imagenet64_hf/`: a Hugging Face `datasets` DatasetDict saved with `save_to_disk`,
       splits train and valid (or validation, test), 64x64 images.
    Sources 2-4 are converted once, chunk by chunk, into the caches (minutes for 1.28M PNGs):
    run `prepare_data()` once before a multi-GPU job, so that no rank waits on it.
    The sizes must be those of one release; a cache is not updated when its source changes:
    delete it to rebuild. Nothing is downloaded: both releases are distributed by image-net.org
    (an account is needed); put the files in root.
"""

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from einops import rearrange

from . import files
from .natural_images import (
    NaturalImageDataModule,
    bad_file,
    chunked,
    hf_split,
    image_files,
    load_hf,
    npz_rows,
    open_npy,
    read_hf,
    read_images,
    write_npy,
)

log = logging.getLogger(__name__)

SIZE = 64
RELEASES = {  # (train, valid) sizes -> release
    (1_281_149, 49_999): "van den Oord et al. (PNG folders)",
    (1_281_167, 50_000): "Chrabaszcz et al. (npz batches)",
}
SPLITS = ("train", "valid")
CACHE = "imagenet64_{split}.npy"
FOLDERS = {"train": "train_64x64", "valid": "valid_64x64"}
NPZ_TRAIN = "train_data_batch_{}.npz"
NPZ_VALID = "val_data.npz"
HF_DIR = "imagenet64_hf"
HF_SPLITS = {"train": ["train"], "valid": ["valid", "validation", "test"]}


def release(sizes: tuple[int, int], where: object) -> str:
    """The release with these (train, valid) sizes, else a clear error."""
    if sizes not in RELEASES:
        known = "; ".join(f"{t:,} / {v:,} ({name})" for (t, v), name in RELEASES.items())
        raise bad_file(
            where,
            f"{sizes[0]:,} train / {sizes[1]:,} valid images, which is neither release: {known}",
            "replace it with a complete copy of one release",
        )
    return RELEASES[sizes]


def planar_to_hwc(data: np.ndarray) -> np.ndarray:
    """Rows of 12288 channel-planar values (R plane, G plane, B plane) -> (N, 64, 64, 3)."""
    return rearrange(data, "n (c h w) -> n h w c", c=3, h=SIZE)


def npz_batches(root: Path) -> dict[str, list[Path]] | None:
    """Chrabaszcz et al.'s npz files in root or one folder below it, if any."""

    def find(name: str) -> Path | None:
        found = sorted([*root.glob(name), *root.glob(f"*/{name}")])
        return found[0] if found else None

    train, valid = [find(NPZ_TRAIN.format(i)) for i in range(1, 11)], find(NPZ_VALID)
    if not any(train) and valid is None:
        return None
    if valid is None or not all(train):
        missing = [NPZ_TRAIN.format(i) for i, p in enumerate(train, 1) if p is None]
        missing += [NPZ_VALID] if valid is None else []
        raise FileNotFoundError(f"{root}: incomplete npz batches, missing {', '.join(missing)}")
    return {"train": [p for p in train if p is not None], "valid": [valid]}


def read_npz_batches(paths: list[Path]) -> Iterator[np.ndarray]:
    """The images of npz batches, one batch in memory at a time, as chunks."""
    for path in paths:
        data = files.read_npz(path, ["data"])["data"]
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * SIZE * SIZE:
            raise bad_file(path, f"data is {data.dtype} {data.shape}, expected uint8 (N, 12288)")
        for chunk in chunked(data):
            yield planar_to_hwc(chunk)


class ImageNet64(NaturalImageDataModule):
    """Downsampled ImageNet 64x64 (see the module docstring for the two releases, sources and
    splits).

    Args:
        root: directory of the data files and of the `.npy` caches.
        val_size: the last `val_size` training images form the validation split; 0: validate
            on the test (valid) split.
        flip: random horizontal flips of the training images, reproducible from (seed, epoch,
            index); off by default.
        batch_size: training batch size per device.
        eval_batch_size: validation/test batch size per device; defaults to `batch_size`.
        num_workers: DataLoader worker processes.
        seed: seed of the training order and of the flips.
    """

    data_shape = (3, SIZE, SIZE)

    def __init__(
        self,
        root: str,
        val_size: int = 10_000,
        flip: bool = False,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(root, batch_size, eval_batch_size, num_workers, seed, val_size, flip)
        self.save_hyperparameters()  # recorded with every checkpoint and test report

    def prepare_data(self) -> None:
        """Build the caches from the first source found (Lightning runs this once per node)."""
        root = self._root
        caches = {split: root / CACHE.format(split=split) for split in SPLITS}
        if all(path.exists() for path in caches.values()):
            return
        if all((root / folder).is_dir() for folder in FOLDERS.values()):
            files = {split: image_files(root / FOLDERS[split]) for split in SPLITS}
            counts = {split: len(files[split]) for split in SPLITS}
            chunks = {split: read_images(files[split], SIZE, resize=False) for split in SPLITS}
            where = f"the folders {' and '.join(FOLDERS.values())} in {root}"
        elif batches := npz_batches(root):
            counts = {split: sum(npz_rows(p, "data") for p in batches[split]) for split in SPLITS}
            chunks = {split: read_npz_batches(batches[split]) for split in SPLITS}
            where = f"the npz batches in {root}"
        elif (root / HF_DIR).is_dir():
            data = load_hf(root / HF_DIR)
            parts = {split: hf_split(data, HF_SPLITS[split], root / HF_DIR) for split in SPLITS}
            counts = {split: len(parts[split]) for split in SPLITS}
            chunks = {split: read_hf(parts[split], SIZE, False, root / HF_DIR) for split in SPLITS}
            where = root / HF_DIR
        else:
            raise FileNotFoundError(f"No ImageNet 64x64 files found. {self._help()}")
        log.info("ImageNet 64x64 of %s", release((counts["train"], counts["valid"]), where))
        for split in SPLITS:
            if not caches[split].exists():
                write_npy(caches[split], chunks[split], counts[split], SIZE)

    def setup(self, stage: str) -> None:
        self.prepare_data()
        caches = {split: self._root / CACHE.format(split=split) for split in SPLITS}
        sizes = tuple(len(open_npy(path, SIZE)) for path in caches.values())
        release((sizes[0], sizes[1]), " and ".join(map(str, caches.values())))
        self._set_splits(caches["train"], caches["valid"])

    def _help(self) -> str:
        """What is expected where, and where to get it."""
        npz = ", ".join([NPZ_TRAIN.format("{1..10}"), NPZ_VALID])
        return (
            f"ImageNet64 expects in root={str(self._root)!r} one of: the folders "
            f"{' and '.join(FOLDERS.values())}/ (van den Oord et al.'s train_64x64.tar and "
            f"valid_64x64.tar, extracted), or Chrabaszcz et al.'s npz batches ({npz}), or "
            f"{HF_DIR}/ (a Hugging Face DatasetDict saved with save_to_disk, splits train and "
            "valid), or the caches " + " and ".join(CACHE.format(split=s) for s in SPLITS) + ". "
            "Both releases come from image-net.org (an account is needed)."
        )
