"""Binarized MNIST, 28x28, values 0/1: static (Larochelle & Murray) or dynamic binarization.

static: the fixed binarization of Larochelle & Murray (2011), split 50,000 / 10,000 / 10,000
    (train / valid / test), the benchmark of the PixelCNN, IWAE and VLAE papers. Sources in
    `root`, in order: `binarized_mnist.npz` (arrays train/valid/test, uint8 0/1, (N, 28, 28) or
    (N, 784)), else the three `binarized_mnist_{split}.amat` files, else those files downloaded.
    The parsed .amat files are cached as `binarized_mnist.npz` (parsing text is slow).
dynamic: grey MNIST resampled every epoch, pixel ~ Bernoulli(grey / 255). Split: train = the
    first 50,000 of the 60,000 MNIST training images, valid = the last 10,000, test = the
    10,000 test images. Sources in `root`: `mnist.npz` (arrays train (60000, 28, 28) and test
    (10000, 28, 28), uint8), else the IDX image files, else those downloaded. Val and test are
    binarized once with a fixed seed, so every run and every evaluation sees the same images.
sample: a small real subset of the static data shipped in `assets/` (see its README), for the
    quick-start and the tests; its numbers are not comparable to the papers'.
"""

import gzip
import importlib.resources
import os
import struct
import tempfile
from functools import partial
from pathlib import Path
from typing import Literal

import numpy as np
import scipy.io
import torch
from einops import rearrange
from torch.utils.data import Dataset

from . import files
from .base import ImageDataModule, IndexedImages
from .download import Source

PIXELS = 28 * 28

STATIC_SIZES = {"train": 50_000, "valid": 10_000, "test": 10_000}
MNIST_SIZES = {"train": 60_000, "test": 10_000}
MNIST_VALID = 10_000  # the last MNIST_VALID training images form the dynamic valid split
EVAL_BINARIZATION_SEED = 0  # dynamic val/test binarization; independent of `seed` on purpose

STATIC_NPZ = "binarized_mnist.npz"
AMAT = "binarized_mnist_{split}.amat"
LAROCHELLE_URL = "http://www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist/" + AMAT
# The same 50k/10k/10k data re-saved as MATLAB v5 files (variable X, N x 784 uint8) under the
# same names, pinned to a commit so that the hashes below are stable.
ARM_URL = (
    "https://raw.githubusercontent.com/mingzhang-yin/ARM-gradient/"
    "bac893cfcec486bbd00b755b12cf8402053b0e84/" + AMAT
)
STATIC_MIRRORS = (LAROCHELLE_URL, ARM_URL)
SHA256: dict[tuple[str, str], str | None] = {  # (mirror, split) -> sha256 of the file
    # No published hash of the original text files: their content is checked instead.
    (LAROCHELLE_URL, "train"): None,
    (LAROCHELLE_URL, "valid"): None,
    (LAROCHELLE_URL, "test"): None,
    (ARM_URL, "train"): "79a0312c7389d855cfc97e3812de3998417c5829d8a51543b56a90a91252ae7e",
    (ARM_URL, "valid"): "7436afc856959075c7787025bb8a4ba2b520b9230ee39667c66aa7dd2819dd68",
    (ARM_URL, "test"): "5bc30222e1e7896cbccd1e1db6b28540cc1230f4d2d5473841a5f6cc54be8d38",
}

MNIST_NPZ = "mnist.npz"
IDX = {"train": "train-images-idx3-ubyte.gz", "test": "t10k-images-idx3-ubyte.gz"}
IDX_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)
MD5 = {  # the published (torchvision) checksums of the original files
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
}

SAMPLE = "binarized_mnist_sample.npz"


def static_sources(split: str) -> list[Source]:
    """The mirrors of one .amat split, with its sha256 where known."""
    return [
        (mirror.format(split=split), ("sha256", h) if (h := SHA256[mirror, split]) else None)
        for mirror in STATIC_MIRRORS
    ]


def idx_sources(name: str) -> list[Source]:
    """The mirrors of one MNIST IDX file, with its md5."""
    return [(mirror + name, ("md5", MD5[name])) for mirror in IDX_MIRRORS]


REFETCH = "delete or replace it (files are downloaded again when missing)"


def bad_file(where: object, problem: str) -> ValueError:
    """:func:`datamodules.files.bad_file` with the fix of downloaded files."""
    return files.bad_file(where, problem, REFETCH)


def check_binary(array: np.ndarray, n: int, where: object) -> np.ndarray:
    """Validate a static split, (n, 28, 28) or (n, 784) with values 0/1 -> uint8 (n, 28, 28)."""
    if array.ndim == 2 and array.shape[1] == PIXELS:
        array = rearrange(array, "n (h w) -> n h w", h=28)
    if array.shape != (n, 28, 28):
        raise bad_file(where, f"shape {array.shape}, expected ({n}, 28, 28) or ({n}, {PIXELS})")
    if not ((array == 0) | (array == 1)).all():
        raise bad_file(where, "values must be 0 or 1")
    return array.astype(np.uint8)


def check_grey(array: np.ndarray, n: int, where: object) -> np.ndarray:
    """Validate one grey MNIST split: uint8 (n, 28, 28)."""
    if array.dtype != np.uint8 or array.shape != (n, 28, 28):
        raise bad_file(where, f"{array.dtype} {array.shape}, expected uint8 ({n}, 28, 28)")
    return array


def read_matlab(path: Path, names: list[str] | None = None) -> dict[str, np.ndarray]:
    """The variables of a MATLAB file (only ``names`` when given); a damaged file is a clear
    error naming it."""
    try:
        mat = scipy.io.loadmat(path, variable_names=names)
    except Exception as e:  # scipy raises many types for a damaged file
        raise bad_file(path, f"unreadable MATLAB file ({e})") from e
    return {k: v for k, v in mat.items() if not k.startswith("__")}


def parse_amat_text(raw: bytes, where: object) -> np.ndarray:
    """Rows of whitespace-separated single-character 0/1 values -> uint8 (rows, 784).

    Vectorised over the bytes (the train file holds 39M values), and strict: every non-blank
    line must hold exactly 784 values, so a truncated or mangled file is caught.
    """
    chars = np.frombuffer(raw, dtype=np.uint8)
    filled = ~(
        (chars == ord(" ")) | (chars == ord("\n")) | (chars == ord("\r")) | (chars == ord("\t"))
    )
    values = chars[filled] - ord("0")  # uint8: anything but "0"/"1" ends up > 1
    if (values > 1).any() or (filled[1:] & filled[:-1]).any():
        raise bad_file(where, "every value must be a single 0 or 1 separated by spaces")
    starts = np.concatenate([[0], np.flatnonzero(chars == ord("\n")) + 1])
    ends = np.append(starts[1:], len(chars))
    per_line = np.array([np.count_nonzero(filled[a:b]) for a, b in zip(starts, ends, strict=True)])
    lines = np.flatnonzero(per_line)
    if len(wrong := lines[per_line[lines] != PIXELS]):
        line = wrong[0]
        raise bad_file(where, f"line {line + 1} has {per_line[line]} values, expected {PIXELS}")
    return rearrange(values, "(n p) -> n p", p=PIXELS)


def read_amat(path: Path, n: int) -> np.ndarray:
    """One Larochelle split: text, one image per line (784 values 0/1, row-major), or, as one
    mirror re-saved it under the same name, a MATLAB v5 file holding one (n, 784) array."""
    with open(path, "rb") as f:
        is_matlab = f.read(6) == b"MATLAB"
    if not is_matlab:
        values = parse_amat_text(path.read_bytes(), path)
        if len(values) != n:
            raise bad_file(path, f"{len(values)} lines, expected {n}")
        return check_binary(values, n, path)
    arrays = list(read_matlab(path).values())
    if len(arrays) != 1:
        raise bad_file(path, f"expected one array in the MATLAB file, found {len(arrays)}")
    return check_binary(arrays[0], n, path)


def read_idx_images(path: Path, n: int) -> np.ndarray:
    """Images of an MNIST IDX file (gzip): uint8 (n, 28, 28)."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise bad_file(path, f"not a readable gzip file ({e})") from e
    header = struct.unpack(">4i", raw[:16]) if len(raw) >= 16 else None
    if header != (2051, n, 28, 28) or len(raw) != 16 + n * PIXELS:
        raise bad_file(path, f"not an IDX file of {n} 28x28 images")
    return np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(n, 28, 28)


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Compressed npz written to a temporary file then renamed, so it is never partial."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez_compressed(f, **arrays)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def load_sample() -> dict[str, np.ndarray]:
    """The shipped sample: train/valid/test uint8 (N, 28, 28) 0/1, unpacked from bits."""
    resource = importlib.resources.files(__package__) / "assets" / SAMPLE
    with importlib.resources.as_file(resource) as path, np.load(path) as f:
        return {
            split: rearrange(np.unpackbits(f[split], axis=1), "n (h w) -> n h w", h=28)
            for split in STATIC_SIZES
        }


LABELS = [f"{split}_labels" for split in ("train", "test")]  # optional arrays of mnist.npz


def split_labels(found: dict[str, np.ndarray], npz: Path) -> dict[str, np.ndarray]:
    """The digit classes of mnist.npz's arrays ``train_labels``, ``test_labels`` (read into
    ``found``) by split, the validation split's the last MNIST_VALID training ones; {} if it
    has none."""
    if not set(LABELS) <= set(found):
        return {}
    for split, n in MNIST_SIZES.items():
        labels = found[f"{split}_labels"]
        if labels.shape != (n,) or not np.isin(labels, np.arange(10)).all():
            raise bad_file(npz, f"{split}_labels is {labels.dtype} {labels.shape}: not ({n},) 0..9")
    train = found["train_labels"]
    return {
        "train": train[:-MNIST_VALID],
        "valid": train[-MNIST_VALID:],
        "test": found["test_labels"],
    }


def binarize_fixed(grey: np.ndarray, stream: int) -> np.ndarray:
    """One fixed Bernoulli(grey / 255) draw, the same in every run (for val/test)."""
    rng = np.random.default_rng((EVAL_BINARIZATION_SEED, stream))
    return (rng.random(grey.shape, dtype=np.float32) < grey / 255).astype(np.uint8)


def channel_first(images: np.ndarray) -> np.ndarray:
    return rearrange(images, "n h w -> n 1 h w")


class DynamicBinarized(Dataset):
    """Grey images resampled every epoch: pixel ~ Bernoulli(grey / 255).

    Each image's draw comes from a generator seeded by (seed, epoch, index), so it depends on
    those three numbers only, not on workers, ranks, batch size or order. The epoch is set by
    `set_epoch`, which the training sampler calls before each epoch (see `EpochSampler`).
    """

    def __init__(self, grey: np.ndarray, seed: int) -> None:
        self.grey = channel_first(grey)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.grey)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        rng = np.random.default_rng((self.seed, self.epoch, index))
        bits = rng.random(self.grey.shape[1:], dtype=np.float32) < self.grey[index] / 255
        return torch.from_numpy(bits).float(), index


class BinarizedMNIST(ImageDataModule):
    """Binarized MNIST (see the module docstring for sources, splits and file layouts).

    Args:
        root: directory of the data files (not needed with `sample`).
        batch_size: training batch size per device.
        eval_batch_size: validation/test batch size per device; defaults to `batch_size`.
        num_workers: DataLoader worker processes.
        seed: seed of the training order and of the dynamic binarization of the train split.
        binarization: "static" (the fixed Larochelle & Murray binarization, the papers'
            benchmark) or "dynamic" (resampled from grey MNIST every epoch).
        download: fetch missing files from the public mirrors.
        sample: use the small sample shipped with the package instead of `root` (static
            only): for a quick try and the tests, not for reportable numbers.
        train_on_valid: train on train + valid (60,000 digits), the final-run protocol of
            papers that tune on valid first (VLAE appendix A). Validation still reports the
            valid split, which is then training data: select the last checkpoint.
    """

    data_shape = (1, 28, 28)
    data_kind = "binary"

    def __init__(
        self,
        root: str | None = None,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        binarization: Literal["static", "dynamic"] = "static",
        download: bool = True,
        sample: bool = False,
        train_on_valid: bool = False,
    ) -> None:
        super().__init__(root, batch_size, eval_batch_size, num_workers, seed)
        self.save_hyperparameters()  # recorded with every checkpoint and test report
        if binarization not in ("static", "dynamic"):
            raise ValueError(f"binarization must be 'static' or 'dynamic', got {binarization!r}")
        if sample and binarization == "dynamic":
            raise ValueError("the shipped sample is statically binarized: use binarization: static")
        if root is None and not sample:
            raise ValueError("set `root` (the directory of the data files) or `sample: true`")
        self.binarization = binarization
        self.download = download
        self.sample = sample
        self.train_on_valid = train_on_valid

    def prepare_data(self) -> None:
        """Download and cache what is missing (Lightning runs this once per node)."""
        if not self.sample:
            self._ensure_files()

    def setup(self, stage: str) -> None:
        if self.binarization == "dynamic":
            self._setup_dynamic()
            return
        splits = load_sample() if self.sample else self._load_static()
        self.train_set, self.val_set, self.test_set = (
            IndexedImages(channel_first(splits[split])) for split in STATIC_SIZES
        )
        if self.train_on_valid:
            both = np.concatenate([splits["train"], splits["valid"]])
            self.train_set = IndexedImages(channel_first(both))

    @property
    def _root(self) -> Path:
        assert self.root is not None
        return Path(self.root).expanduser()

    def _ensure_files(self) -> None:
        """Make sure the sources exist in root: download missing files, build the npz cache."""
        root = self._root
        if self.binarization == "dynamic":
            if not (root / MNIST_NPZ).exists():
                for name in IDX.values():
                    self.fetch(root / name, idx_sources(name))
            return
        if (root / STATIC_NPZ).exists():
            return
        for split, n in STATIC_SIZES.items():
            path = root / AMAT.format(split=split)
            self.fetch(path, static_sources(split), partial(read_amat, n=n))
        splits = {
            split: read_amat(root / AMAT.format(split=split), n)
            for split, n in STATIC_SIZES.items()
        }
        save_npz(root / STATIC_NPZ, splits)

    def _help(self) -> str:
        """What is expected where, and where to get it."""
        if self.binarization == "static":
            files = f"{STATIC_NPZ} (arrays train/valid/test, uint8 0/1) or the three files "
            files += ", ".join(AMAT.format(split=s) for s in STATIC_SIZES)
            urls = [url for split in STATIC_SIZES for url, _ in static_sources(split)]
        else:
            files = f"{MNIST_NPZ} (arrays train, test: uint8 (N, 28, 28)) or the files "
            files += ", ".join(IDX.values())
            urls = [url for name in IDX.values() for url, _ in idx_sources(name)]
        return (
            f"Binarized MNIST ({self.binarization}) expects in root={str(self._root)!r}: {files}. "
            "Get them from:\n  " + "\n  ".join(urls) + "\nor set `sample: true` for a quick try "
            "on the small sample shipped with the package."
        )

    def _load_static(self) -> dict[str, np.ndarray]:
        self._ensure_files()
        path = self._root / STATIC_NPZ
        splits = files.read_npz(path, STATIC_SIZES, REFETCH)
        return {split: check_binary(splits[split], n, path) for split, n in STATIC_SIZES.items()}

    def _setup_dynamic(self) -> None:
        self._ensure_files()
        npz = self._root / MNIST_NPZ
        if npz.exists():
            splits = files.read_npz(npz, MNIST_SIZES, REFETCH, optional=LABELS)
            grey = {split: check_grey(splits[split], n, npz) for split, n in MNIST_SIZES.items()}
            self.labels = split_labels(splits, npz)
        else:
            grey = {
                split: read_idx_images(self._root / IDX[split], n)
                for split, n in MNIST_SIZES.items()
            }
        train, valid = grey["train"][:-MNIST_VALID], grey["train"][-MNIST_VALID:]
        self.train_set = DynamicBinarized(
            grey["train"] if self.train_on_valid else train, self.seed
        )
        self.val_set = IndexedImages(channel_first(binarize_fixed(valid, stream=1)))
        self.test_set = IndexedImages(channel_first(binarize_fixed(grey["test"], stream=2)))
