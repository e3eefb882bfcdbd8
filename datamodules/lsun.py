"""LSUN bedrooms (Yu et al. 2015) at 32x32 or 64x64, RGB, values 0..255, as in PixelVAE.

Splits: train = bedroom_train (3,033,042 images in the official release, fewer once duplicates
    are removed) but the last `val_size` (default 3,000), which form the validation split;
    test = bedroom_val (300 images in the official release).
There is no small public copy: prepare the data once. From the official LMDB export
(`bedroom_train_lmdb`, `bedroom_val_lmdb`), `scripts/prepare_lsun.py` crops, resizes, removes
exact duplicates and writes the caches of source 1.
Sources in `root` (R = `resolution`), the first one found (one dataset per root):
    1. the caches `lsun_bedroom_{R}_train.npy` and `lsun_bedroom_{R}_valid.npy`, uint8
       (N, R, R, 3), memory-mapped: the set is never loaded into memory.
    2. `lsun_bedroom_{R}.npz`: arrays train and valid, uint8 (N, R, R, 3).
    3. `train/` and `valid/`: folders of PNG/JPEG/WebP images of any size (in natural order of
       their names), read as they are (no duplicate removal).
    4. `lsun_bedroom_hf/`: a Hugging Face `datasets` DatasetDict saved with `save_to_disk`,
       splits train and valid (or validation, test), one image column.
    Sources 2-4 are converted once, chunk by chunk, into the caches of source 1; a cache is not
    updated when its source changes: delete it to rebuild. Images of another size are reduced
    to their central square crop, resized to R x R with PIL's BOX filter (each output pixel the
    mean of the input pixels it covers: anti-aliased; `natural_images.square_image`).
"""

import logging
import warnings
from pathlib import Path

from . import files
from .natural_images import (
    NaturalImageDataModule,
    check_images,
    chunked,
    hf_split,
    image_files,
    load_hf,
    open_npy,
    read_hf,
    read_images,
    write_npy,
)

log = logging.getLogger(__name__)

SPLITS = ("train", "valid")
TEST_SIZE = 300  # bedroom_val of the official release
CACHE = "lsun_bedroom_{resolution}_{split}.npy"
NPZ = "lsun_bedroom_{resolution}.npz"
HF_DIR = "lsun_bedroom_hf"
HF_SPLITS = {"train": ["train"], "valid": ["valid", "validation", "test"]}


def cache_paths(root: Path, resolution: int) -> dict[str, Path]:
    return {split: root / CACHE.format(resolution=resolution, split=split) for split in SPLITS}


class LSUNBedrooms(NaturalImageDataModule):
    """LSUN bedrooms (see the module docstring for sources, splits and preparation).

    Args:
        root: directory of the data files and of the `.npy` caches.
        resolution: 32 or 64 (images are R x R).
        val_size: the last `val_size` training images form the validation split; 0: validate
            on the test split.
        flip: random horizontal flips of the training images, reproducible from (seed, epoch,
            index); off by default.
        batch_size: training batch size per device.
        eval_batch_size: validation/test batch size per device; defaults to `batch_size`.
        num_workers: DataLoader worker processes.
        seed: seed of the training order and of the flips.
    """

    def __init__(
        self,
        root: str,
        resolution: int = 32,
        val_size: int = 3000,
        flip: bool = False,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(root, batch_size, eval_batch_size, num_workers, seed, val_size, flip)
        self.save_hyperparameters()  # recorded with every checkpoint and test report
        if resolution not in (32, 64):
            raise ValueError(f"resolution must be 32 or 64, got {resolution}")
        self.resolution = resolution
        self.data_shape = (3, resolution, resolution)

    def prepare_data(self) -> None:
        """Build the caches from the first source found (Lightning runs this once per node)."""
        root, size = self._root, self.resolution
        caches = cache_paths(root, size)
        if all(path.exists() for path in caches.values()):
            return
        if (npz := root / NPZ.format(resolution=size)).is_file():
            for split, path in caches.items():
                images = files.read_npz(npz, [split])[split]
                check_images(images, size, f"{npz}[{split}]")
                if not path.exists():
                    write_npy(path, chunked(images), len(images), size)
            return
        if all((root / split).is_dir() for split in SPLITS):
            for split, path in caches.items():
                if not path.exists():
                    paths = image_files(root / split)
                    write_npy(path, read_images(paths, size, resize=True), len(paths), size)
            return
        if (root / HF_DIR).is_dir():
            data = load_hf(root / HF_DIR)
            for split, path in caches.items():
                if not path.exists():
                    part = hf_split(data, HF_SPLITS[split], root / HF_DIR)
                    write_npy(path, read_hf(part, size, True, root / HF_DIR), len(part), size)
            return
        raise FileNotFoundError(f"No LSUN bedroom files found. {self._help()}")

    def setup(self, stage: str) -> None:
        self.prepare_data()
        caches = cache_paths(self._root, self.resolution)
        n = {split: len(open_npy(path, self.resolution)) for split, path in caches.items()}
        if n["valid"] != TEST_SIZE:
            warnings.warn(
                f"{caches['valid']}: {n['valid']} test images, not the {TEST_SIZE} of the "
                "official bedroom_val: numbers on it are not comparable to the papers'.",
                stacklevel=2,
            )
        self._set_splits(caches["train"], caches["valid"])

    def _help(self) -> str:
        """What is expected where, and how to prepare it."""
        names = cache_paths(self._root, self.resolution)
        return (
            f"LSUN bedrooms ({self.resolution}x{self.resolution}) expects in "
            f"root={str(self._root)!r} one of: {names['train'].name} and {names['valid'].name} "
            "(uint8 (N, R, R, 3)), "
            f"{NPZ.format(resolution=self.resolution)} (arrays train and valid), the image "
            f"folders train/ and valid/, or {HF_DIR}/ (a Hugging Face DatasetDict saved with "
            "save_to_disk). Make the .npy files from the official LMDB export "
            "(bedroom_train_lmdb, bedroom_val_lmdb, from the LSUN site) with "
            f"`python scripts/prepare_lsun.py --lmdb <dir> --out {self._root}`."
        )
