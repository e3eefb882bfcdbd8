"""OMNIGLOT 28x28 of Burda et al. (2016, IWAE), dynamically binarized: the VLAE benchmark.

File: `chardata.mat` in `root` (downloaded when missing), MATLAB v5 with `data` (784, 24345)
    and `testdata` (784, 8070), grey levels in [0, 1], one image per column in MATLAB's
    column-major order: the upright image is `column.reshape(28, 28, order="F")` (a row-major
    reshape gives its transpose; IWAE's loader converts the same way).
Splits: test = the 8,070 test images. The 24,345 training images are permuted with IWAE's fixed
    permutation (`np.random.RandomState(123)`, as in IWAE's `datasets.py`) and the last
    `val_size` (default 1,345, IWAE's split) form the validation split. `val_size=0`: train on
    all 24,345 and validate on the test set, the final run of the VLAE protocol (tune on valid,
    then train on train + valid); papers report the test set either way.
Binarization: train, pixel ~ Bernoulli(grey) resampled every epoch (see `DynamicBinarized`);
    valid and test binarized once with a fixed seed, the same in every run and for every `seed`.
"""

from pathlib import Path

import numpy as np
from einops import rearrange

from .base import ImageDataModule, IndexedImages
from .binarized_mnist import (
    PIXELS,
    DynamicBinarized,
    bad_file,
    binarize_fixed,
    channel_first,
    read_matlab,
)
from .download import Source

SIZES = {"train": 24_345, "test": 8_070}
VARIABLES = {"train": "data", "test": "testdata"}
VAL_SIZE = 1_345  # IWAE's validation split, also used by VampPrior and ARM
SHUFFLE_SEED = 123  # IWAE's permutation of the training images before the split

FILE = "chardata.mat"
URL = "https://github.com/yburda/iwae/raw/master/datasets/OMNIGLOT/chardata.mat"
# ARM's copy under another name: its loader reads the same variables and splits the same way (not
# byte-compared with Burda's file, which no store here holds; the content check below applies).
ARM_URL = "https://raw.githubusercontent.com/mingzhang-yin/ARM-gradient/master/omniglot.mat"
# No published md5/sha256 of chardata.mat could be found (and the file could not be fetched to
# pin one), so downloads are checked by content instead: variables, shapes, values in [0, 1].
SOURCES: list[Source] = [(URL, None), (ARM_URL, None)]


def read_chardata(path: Path) -> dict[str, np.ndarray]:
    """`chardata.mat` -> {"train", "test"}: float32 (N, 28, 28) grey levels in [0, 1], upright."""
    mat = read_matlab(path, list(VARIABLES.values()))
    splits = {}
    for split, name in VARIABLES.items():
        if name not in mat:
            raise bad_file(path, f"no variable {name!r}")
        columns, n = mat[name], SIZES[split]
        if columns.shape != (PIXELS, n) or not np.issubdtype(columns.dtype, np.number):
            got = f"{columns.dtype} {columns.shape}"
            raise bad_file(path, f"{name} is {got}, expected numbers ({PIXELS}, {n})")
        grey = columns.astype(np.float32)
        if not ((grey >= 0) & (grey <= 1)).all():  # also catches NaN
            raise bad_file(path, f"{name} must hold grey levels in [0, 1]")
        # Column j is image j listed column by column (MATLAB's img(:)): element r + 28 c is
        # the pixel at row r, column c, i.e. column.reshape(28, 28, order="F").
        splits[split] = rearrange(grey, "(w h) n -> n h w", h=28)
    return splits


class OMNIGLOT(ImageDataModule):
    """OMNIGLOT 28x28 (see the module docstring for the file, splits and binarization).

    Args:
        root: directory of `chardata.mat`.
        val_size: the last `val_size` permuted training images form the validation split;
            0: train on all 24,345 and validate on the test set.
        download: fetch `chardata.mat` into root when it is missing.
        batch_size: training batch size per device.
        eval_batch_size: validation/test batch size per device; defaults to `batch_size`.
        num_workers: DataLoader worker processes.
        seed: seed of the training order and of the dynamic binarization of the train split.
    """

    data_shape = (1, 28, 28)
    data_kind = "binary"

    def __init__(
        self,
        root: str,
        val_size: int = VAL_SIZE,
        download: bool = True,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(root, batch_size, eval_batch_size, num_workers, seed)
        self.save_hyperparameters()  # recorded with every checkpoint and test report
        if val_size < 0:
            raise ValueError(f"val_size must be >= 0, got {val_size}")
        self.val_size = val_size
        self.download = download

    @property
    def _path(self) -> Path:
        assert self.root is not None
        return Path(self.root).expanduser() / FILE

    def prepare_data(self) -> None:
        """Download `chardata.mat` when missing (Lightning runs this once per node)."""
        self.fetch(self._path, SOURCES, read_chardata)

    def setup(self, stage: str) -> None:
        self.prepare_data()
        grey = read_chardata(self._path)
        n = len(grey["train"])
        if self.val_size >= n:
            raise ValueError(f"val_size={self.val_size} leaves none of the {n} training images")
        train = grey["train"][np.random.RandomState(SHUFFLE_SEED).permutation(n)]
        cut = n - self.val_size
        # DynamicBinarized and binarize_fixed draw Bernoulli(grey / 255): scale, not quantize.
        self.train_set = DynamicBinarized(train[:cut] * 255, self.seed)
        self.test_set = IndexedImages(channel_first(binarize_fixed(grey["test"] * 255, stream=2)))
        self.val_set = self.test_set
        if self.val_size:
            self.val_set = IndexedImages(channel_first(binarize_fixed(train[cut:] * 255, stream=1)))

    def _help(self) -> str:
        """What is expected where, and where to get it."""
        return (
            f"OMNIGLOT expects in root={str(self._path.parent)!r}: {FILE} (Burda et al.'s 28x28 "
            f"OMNIGLOT, MATLAB variables data ({PIXELS}, {SIZES['train']}) and testdata "
            f"({PIXELS}, {SIZES['test']})). Get it from:\n  "
            + "\n  ".join(url for url, _ in SOURCES)
            + f"\n(save the second one as {FILE}) or set `download: true`."
        )
