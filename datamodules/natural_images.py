"""Shared pieces of the 8-bit RGB datamodules (CIFAR-10, LSUN bedrooms, ImageNet 64x64).

Images are kept as uint8 (N, H, W, 3) arrays, in memory for small sets, else in a `.npy` file
that is memory-mapped read-only, and converted one at a time to what the models take: float32
(3, H, W) holding the integers 0..255, not normalized (the likelihood is a 256-way categorical
over the raw values). A large set is converted once from its distributed format (image folders,
npz batches, a Hugging Face `datasets` copy) into such a `.npy` cache in `root`, chunk by chunk,
so that neither building nor reading it holds the set in memory.
"""

import logging
import os
import re
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from .base import ImageDataModule
from .files import bad_file

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}
RESAMPLING = Image.Resampling.BOX
"""Resize filter: each output pixel is the mean of the input pixels it covers (anti-aliased;
for integer factors such as LSUN's 256 -> 64 the block means, to within one level: Pillow
rounds between its horizontal and vertical passes); Chrabaszcz et al. downsampled ImageNet
with a box filter too."""

CHUNK = 4096  # images per conversion step: bounds the memory of a cache build
FIX_CACHE = "delete it: it is rebuilt from the source files in root"


def check_images(
    array: np.ndarray, size: int | tuple[int, int], where: object, fix: str = "replace it"
) -> None:
    """Raise unless `array` is uint8 (N, size, size, 3), or (N, height, width, 3) when `size`
    is (height, width)."""
    height, width = (size, size) if isinstance(size, int) else size
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[1:] != (height, width, 3):
        raise bad_file(
            where, f"{array.dtype} {array.shape}, expected uint8 (N, {height}, {width}, 3)", fix
        )


# ------------------------------------------------------------------ the dataset
def flipped(seed: int, epoch: int, index: int) -> bool:
    """Whether training image `index` is mirrored in `epoch`: a fair coin seeded by the three
    numbers, so it depends on nothing else (not on workers, ranks, batch size or order)."""
    return bool(np.random.default_rng((seed, epoch, index)).random() < 0.5)


class RGBImages(Dataset):
    """uint8 (N, H, W, 3) images -> `(x, index)`, x float32 (3, H, W) with values 0..255.

    Args:
        images: the array, or the path of a `.npy` file, memory-mapped on first access in each
            process and never pickled (so DataLoader workers, even spawned ones, do not copy
            the set into memory).
        rows: the rows of `images` that form this split (default: all); `index` counts
            positions in `rows`.
        flip: mirror each image horizontally with probability 1/2, drawn anew every epoch
            (set by `set_epoch`, which `EpochSampler` calls) from (seed, epoch, index).
        seed: seed of the flips.
    """

    def __init__(
        self,
        images: np.ndarray | Path,
        rows: range | None = None,
        flip: bool = False,
        seed: int = 0,
    ) -> None:
        self.path = None if isinstance(images, np.ndarray) else Path(images)
        self._images = images if isinstance(images, np.ndarray) else None
        self.rows = range(len(self.images)) if rows is None else rows
        self.flip = flip
        self.seed = seed
        self.epoch = 0

    @property
    def images(self) -> np.ndarray:
        if self._images is None:
            self._images = np.load(self.path, mmap_mode="r")
        return self._images

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        if self.path is not None:
            state["_images"] = None  # reopened by the receiving process
        return state

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[self.rows[index]]
        if self.flip and flipped(self.seed, self.epoch, index):
            image = image[:, ::-1]
        x = np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32)  # copies
        return torch.from_numpy(x), index


# ------------------------------------------------------------------ the .npy cache
class NpyWriter:
    """Writes a uint8 (N, size, size, 3) `.npy` chunk by chunk, memory-mapped so that it is
    never held in memory: at most `capacity` images, the file shrunk to those appended. The
    file appears at `path` only when the `with` block ends without an error (temporary file,
    then `os.replace`), so an interrupted build never leaves a cache a later run would trust.
    """

    def __init__(self, path: Path, capacity: int, size: int) -> None:
        self.path = path
        self.shape = (capacity, size, size, 3)
        self.count = 0

    def __enter__(self) -> "NpyWriter":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(
            dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".part"
        )
        os.close(fd)
        self.tmp = Path(name)
        self.array = np.lib.format.open_memmap(self.tmp, "w+", np.uint8, self.shape)
        return self

    def append(self, images: np.ndarray) -> None:
        if self.count + len(images) > self.shape[0]:
            raise ValueError(f"{self.path.name}: more than the {self.shape[0]} images announced")
        self.array[self.count : self.count + len(images)] = images
        self.count += len(images)

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType
    ) -> None:
        offset = self.array.offset
        self.array.flush()
        del self.array  # unmaps the file
        try:
            if kind is None:
                if self.count < self.shape[0]:
                    self._shrink(offset)
                os.replace(self.tmp, self.path)
        finally:
            self.tmp.unlink(missing_ok=True)

    def _shrink(self, offset: int) -> None:
        """Rewrite the header with the true count and cut the unused rows. numpy pads the
        header so that its length does not depend on the first dimension; checked anyway."""
        shape = (self.count, *self.shape[1:])
        with open(self.tmp, "r+b") as f:
            header = {"descr": "|u1", "fortran_order": False, "shape": shape}
            np.lib.format.write_array_header_1_0(f, header)
            if f.tell() != offset:
                raise RuntimeError(f"{self.path.name}: the .npy header changed length")
            f.truncate(offset + int(np.prod(shape)))


def write_npy(
    path: Path, chunks: Iterable[np.ndarray], capacity: int, size: int, exact: bool = True
) -> int:
    """Write the images of `chunks` as a `.npy` cache (see `NpyWriter`); returns their number.
    `exact`: the source must yield exactly `capacity` images (checked before the file appears).
    """
    log.info("converting %d images into %s", capacity, path)
    with NpyWriter(path, capacity, size) as writer:
        for chunk in chunks:
            writer.append(chunk)
        if exact and writer.count != capacity:
            raise ValueError(f"{path.name}: the source gave {writer.count} of {capacity} images")
    return writer.count


def open_npy(path: Path, size: int) -> np.ndarray:
    """A `.npy` cache memory-mapped read-only, checked to be uint8 (N, size, size, 3)."""
    try:
        array = np.load(path, mmap_mode="r")
    except (ValueError, OSError, EOFError) as e:
        raise bad_file(path, f"unreadable .npy file ({e})", FIX_CACHE) from e
    check_images(array, size, path, FIX_CACHE)
    return array


def npz_rows(path: Path, key: str) -> int:
    """Rows of array `key` of an npz file, read from its header without loading the array."""
    try:
        with zipfile.ZipFile(path) as archive, archive.open(f"{key}.npy") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape = np.lib.format.read_array_header_1_0(f)[0]
            else:
                shape = np.lib.format.read_array_header_2_0(f)[0]
    except (KeyError, ValueError, OSError, zipfile.BadZipFile) as e:
        raise bad_file(path, f"no readable array {key!r} ({e})") from e
    return shape[0] if shape else 0


# ------------------------------------------------------------------ decoding images
def square_image(image: Image.Image, size: int) -> np.ndarray:
    """The central square crop of `image` (side: its shorter side), resized to size x size
    with `RESAMPLING`: uint8 (size, size, 3)."""
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    box = (left, top, left + side, top + side)
    return np.asarray(image.convert("RGB").resize((size, size), RESAMPLING, box=box))


def to_array(image: Image.Image | np.ndarray, size: int, resize: bool, where: object) -> np.ndarray:
    """One image as uint8 (size, size, 3): cropped and resized (`square_image`) if `resize`,
    else it must already have that size."""
    if isinstance(image, Image.Image):
        if resize:
            return square_image(image, size)
        image = np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.shape != (size, size, 3):
        expected = f"uint8 ({size}, {size}, 3)"
        raise bad_file(where, f"image {array.dtype} {array.shape}, expected {expected}")
    return array


Convert = Callable[[Image.Image | np.ndarray, object], np.ndarray]
"""`convert(image, where)`: one decoded image -> uint8 (size, size, 3), naming `where` in its
errors; replaces `to_array` for datasets with their own crop (CelebA)."""


def read_image(path: Path, size: int, resize: bool, convert: Convert | None = None) -> np.ndarray:
    """Decode one image file (PNG, JPEG, WebP) with `to_array`, or with `convert` if given."""
    try:
        with Image.open(path) as image:
            if convert is not None:
                return convert(image, path)
            return to_array(image, size, resize, path)
    except (UnidentifiedImageError, OSError) as e:
        raise bad_file(path, f"not a readable image ({e})") from e


def natural_key(path: Path) -> list[str | int]:
    """Sort key that orders numbered names by number: img_2 before img_10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.as_posix())]


def image_files(folder: Path) -> list[Path]:
    """The image files under `folder` (recursively), in natural order of their relative path."""
    files = [p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    return sorted(files, key=lambda p: natural_key(p.relative_to(folder)))


def read_images(
    files: Sequence[Any],
    size: int,
    resize: bool,
    read: Callable[..., np.ndarray] = read_image,
) -> Iterator[np.ndarray]:
    """The images of `files` in order, decoded by a thread pool (Pillow decodes and resizes
    without holding the GIL), as chunks of at most `CHUNK` images. `read(file, size=size,
    resize=resize)` decodes one (default `read_image`; e.g. the member of a zip archive)."""
    workers = min(16, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        for start in range(0, len(files), CHUNK):
            part = files[start : start + CHUNK]
            yield np.stack(list(pool.map(partial(read, size=size, resize=resize), part)))


# ------------------------------------------------------------------ Hugging Face datasets
def load_hf(path: Path) -> Any:
    """A `datasets.DatasetDict` saved with `save_to_disk` at `path`."""
    import datasets  # slow to import: only when this source is used

    try:
        data = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets raises many types for a damaged directory
        raise bad_file(path, f"not readable by datasets.load_from_disk ({e})") from e
    if not isinstance(data, datasets.DatasetDict):
        raise bad_file(path, "a single Dataset, expected a DatasetDict of splits")
    return data


def hf_split(data: Any, names: Sequence[str], where: object) -> Any:
    """The first split of `data` named in `names`."""
    for name in names:
        if name in data:
            return data[name]
    raise bad_file(where, f"no split named {' or '.join(names)} (it has {sorted(data)})")


def hf_image_column(split: Any, where: object) -> str:
    """The image column: "img" or "image", else the only column of type `datasets.Image`."""
    import datasets

    for name in ("img", "image"):
        if name in split.column_names:
            return name
    found = [k for k, v in split.features.items() if isinstance(v, datasets.Image)]
    if len(found) != 1:
        raise bad_file(where, f"no image column among {split.column_names}")
    return found[0]


def read_hf(
    split: Any,
    size: int,
    resize: bool,
    where: object,
    convert: Convert | None = None,
    rows: Sequence[int] | None = None,
) -> Iterator[np.ndarray]:
    """The images of one split of a Hugging Face dataset, in order, as chunks (`to_array`, or
    `convert` if given); only those of `rows`, in that order, if given (errors name the row).
    """

    def decode(image: Image.Image | np.ndarray, at: str) -> np.ndarray:
        if convert is not None:
            return convert(image, at)
        return to_array(image, size, resize, at)

    column = hf_image_column(split, where)
    split = split.select_columns([column])
    if rows is not None:
        split = split.select(rows)
    start = 0
    for batch in split.iter(batch_size=CHUNK):
        images = batch[column]
        end = start + len(images)
        labels = range(start, end) if rows is None else rows[start:end]
        yield np.stack([decode(im, f"{where}[{r}]") for r, im in zip(labels, images, strict=True)])
        start += len(images)


def chunked(images: np.ndarray) -> Iterator[np.ndarray]:
    """An in-memory array as chunks of at most `CHUNK` images."""
    for start in range(0, len(images), CHUNK):
        yield images[start : start + CHUNK]


# ------------------------------------------------------------------ the datamodule base
class NaturalImageDataModule(ImageDataModule):
    """Base of the 8-bit RGB datamodules: the splits and the training flips.

    Args (besides those of `ImageDataModule`):
        val_size: the last `val_size` training images form the validation split and are left
            out of training; 0: train on all of them and validate on the test split.
        flip: random horizontal flips of the training images (not of val/test), drawn anew
            every epoch, reproducible from (seed, epoch, index).
    """

    data_kind = "8bit"

    def __init__(
        self,
        root: str | None,
        batch_size: int,
        eval_batch_size: int | None,
        num_workers: int,
        seed: int,
        val_size: int,
        flip: bool,
    ) -> None:
        super().__init__(root, batch_size, eval_batch_size, num_workers, seed)
        if val_size < 0:
            raise ValueError(f"val_size must be >= 0, got {val_size}")
        self.val_size = val_size
        self.flip = flip

    @property
    def _root(self) -> Path:
        assert self.root is not None
        return Path(self.root).expanduser()

    def _set_splits(self, train: np.ndarray | Path, test: np.ndarray | Path) -> None:
        """train/val/test from the full training images and the test images."""
        n = len(RGBImages(train))
        if self.val_size >= n:
            raise ValueError(f"val_size={self.val_size} leaves none of the {n} training images")
        cut = n - self.val_size
        self.train_set = RGBImages(train, range(cut), flip=self.flip, seed=self.seed)
        self.val_set = RGBImages(train, range(cut, n)) if self.val_size else RGBImages(test)
        self.test_set = RGBImages(test)
