"""Caltech-101 Silhouettes 28x28 (Marlin et al. 2010), split 1: static binary images, 0/1.

Convention: object = 1, background = 0 (like MNIST's ink). Marlin's file stores the reverse
    (background 1, object 0): it is flipped on load.
Splits: Marlin's fixed split 1, train / valid / test = 4,100 / 2,264 / 2,307.
Sources in `root`, the first one found:
    1. `caltech101_silhouettes_28_split1.mat`, Marlin's MATLAB file: train_data (4100, 784),
       val_data (2264, 784), test_data (2307, 784), 0/1, background 1. Each row is one image in
       MATLAB's column-major order: the upright image is `row.reshape(28, 28, order="F")`
       (checked on the real data: airplanes, cars, chairs, lamps come out upright; a row-major
       reshape transposes them).
    2. `caltech101_silhouettes_28.npz`: arrays train/valid/test, 0/1, (N, 28, 28) upright
       images, in either convention: the border of a silhouette is nearly all background (97%
       of the border pixels of split 1, at least 58% in every image), so a border mean > 0.5
       means background = 1, and the images are flipped (logged).
    3. The .mat file, downloaded when `download` is on.
"""

import logging
from pathlib import Path

import numpy as np
from einops import rearrange

from . import files
from .base import ImageDataModule, IndexedImages
from .binarized_mnist import PIXELS, REFETCH, bad_file, channel_first, check_binary, read_matlab
from .download import Source

log = logging.getLogger(__name__)

SIZES = {"train": 4_100, "valid": 2_264, "test": 2_307}
VARIABLES = {"train": "train_data", "valid": "val_data", "test": "test_data"}

MAT = "caltech101_silhouettes_28_split1.mat"
NPZ = "caltech101_silhouettes_28.npz"
MARLIN_URL = "https://people.cs.umass.edu/~marlin/data/" + MAT
# A copy of Marlin's file (MATLAB header dated 2009-10-15) pinned to a commit; its sha256 was
# computed on that exact file when the evaluation data were gathered (/work/shared/data/README).
# No hash is published for Marlin's own file, whose content is checked instead.
GITHUB_URL = (
    "https://raw.githubusercontent.com/YingzhenLi/vae_renyi_divergence/"
    "f8c08e445567212a745c2f9981597f0d102c5ae8/data/silhouettes/" + MAT
)
GITHUB_SHA256 = "eb6735e8d84b1850fabc5590124aab1755e90c9fd28123585324398405e1e42a"
SOURCES: list[Source] = [(MARLIN_URL, None), (GITHUB_URL, ("sha256", GITHUB_SHA256))]


def background_is_one(splits: dict[str, np.ndarray]) -> bool:
    """Whether 1 marks the background: the image borders are then mostly 1."""
    border = [
        np.concatenate([a[:, 0], a[:, -1], a[:, 1:-1, 0], a[:, 1:-1, -1]], axis=1).ravel()
        for a in splits.values()
    ]
    return bool(np.concatenate(border).mean() > 0.5)


def read_mat(path: Path) -> dict[str, np.ndarray]:
    """Marlin's .mat file -> {"train", "valid", "test"}: uint8 (N, 28, 28), object 1, upright."""
    mat = read_matlab(path, list(VARIABLES.values()))
    splits = {}
    for split, name in VARIABLES.items():
        rows, n = mat.get(name), SIZES[split]
        if rows is None or rows.shape != (n, PIXELS):
            got = "missing" if rows is None else f"shape {rows.shape}"
            raise bad_file(path, f"{name} is {got}, expected ({n}, {PIXELS})")
        # Each row lists the image column by column (MATLAB's img(:)): element r + 28 c is the
        # pixel at row r, column c, i.e. row.reshape(28, 28, order="F").
        images = rearrange(rows, "n (w h) -> n h w", h=28)
        splits[split] = check_binary(images, n, f"{path}[{name}]")
    if not background_is_one(splits):
        raise bad_file(path, "the image borders are mostly 0, but this file marks background 1")
    return {split: 1 - images for split, images in splits.items()}


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """An npz of upright (N, 28, 28) 0/1 images in either convention -> object 1."""
    splits = files.read_npz(path, SIZES, REFETCH)
    for split, n in SIZES.items():
        if splits[split].ndim != 3:  # no flat rows: their pixel order would be ambiguous
            raise bad_file(path, f"{split} has shape {splits[split].shape}, expected ({n}, 28, 28)")
        splits[split] = check_binary(splits[split], n, f"{path}[{split}]")
    if background_is_one(splits):
        log.info("%s marks the background 1 (its image borders are mostly 1): flipped", path)
        splits = {split: 1 - images for split, images in splits.items()}
    return splits


class CaltechSilhouettes(ImageDataModule):
    """Caltech-101 Silhouettes 28x28, split 1 (see the module docstring for sources, splits,
    orientation and the object = 1 convention).

    Args:
        root: directory of the data files.
        download: fetch Marlin's .mat file into root when no source is there.
        batch_size: training batch size per device.
        eval_batch_size: validation/test batch size per device; defaults to `batch_size`.
        num_workers: DataLoader worker processes.
        seed: seed of the training order.
        train_on_valid: train on train + valid (6,364 images), the final-run protocol of
            VLAE appendix A; validation then reports training data (use the last checkpoint).
    """

    data_shape = (1, 28, 28)
    data_kind = "binary"

    def __init__(
        self,
        root: str,
        download: bool = True,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        train_on_valid: bool = False,
    ) -> None:
        super().__init__(root, batch_size, eval_batch_size, num_workers, seed)
        self.save_hyperparameters()  # recorded with every checkpoint and test report
        self.download = download
        self.train_on_valid = train_on_valid

    @property
    def _root(self) -> Path:
        assert self.root is not None
        return Path(self.root).expanduser()

    def prepare_data(self) -> None:
        """Download the .mat file when no source is in root (Lightning runs this once per node)."""
        if not (self._root / NPZ).exists():
            self.fetch(self._root / MAT, SOURCES, read_mat)

    def setup(self, stage: str) -> None:
        self.prepare_data()
        mat = self._root / MAT
        splits = read_mat(mat) if mat.exists() else read_npz(self._root / NPZ)
        self.train_set, self.val_set, self.test_set = (
            IndexedImages(channel_first(splits[split])) for split in SIZES
        )
        if self.train_on_valid:
            both = np.concatenate([splits["train"], splits["valid"]])
            self.train_set = IndexedImages(channel_first(both))

    def _help(self) -> str:
        """What is expected where, and where to get it."""
        return (
            f"Caltech-101 Silhouettes expects in root={str(self._root)!r}: {MAT} (Marlin's "
            f"split 1) or {NPZ} (arrays train/valid/test, uint8 0/1 (N, 28, 28)). "
            "Get the .mat file from:\n  "
            + "\n  ".join(url for url, _ in SOURCES)
            + "\nor set `download: true`."
        )
