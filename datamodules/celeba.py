"""CelebA (Liu et al. 2015) faces as in the Pyramid PixelCNN (Kolesnikov & Lampert 2017, §4.2):
the 128x128 crop of the aligned images, RGB, values 0..255, a random 95% / 5% train/test split.

Images: the aligned-and-cropped release, `img_align_celeba` (202,599 JPEGs 000001.jpg ..
    202599.jpg, 178 wide x 218 high), cut to the paper's fixed window: 25 pixels off the left and
    off the right, 50 off the top, 40 off the bottom, i.e. rows 50..177 and columns 25..152
    (`LEFT`, `RIGHT`, `TOP`, `BOTTOM`; `crop_aligned`). `size` < 128 (64, 32, 16 or 8, for CPU
    runs) reduces that window by exact block means: each output pixel is the mean of its
    (128/size)^2 input pixels, rounded half up (`box_reduce`, in numpy: independent of the
    Pillow version). Images of another size are an
    error (a resized copy, or the in-the-wild `img_celeba`, are not this release).
Splits:
    partition="random" (default, the paper's protocol): a random permutation of the image
        numbers, `np.random.default_rng(SPLIT_SEED)` with SPLIT_SEED = 0: its first 5% (rounded)
        are the test split (kept in file order), the rest the training split, in permuted order,
        whose last `val_size` (default 5,000) images form the validation split (a random subset).
        Of the release's 202,599 images: 192,469 train (187,469 once the 5,000 validation
        images are taken out) / 10,130 test. The split depends only on the number of images,
        so every layout below gives the same split of the same images.
    partition="official": `list_eval_partition.txt` (lines "000001.jpg 0": 0 train, 1 valid,
        2 test; 162,770 / 19,867 / 19,962), in file order; `val_size` is ignored.
Sources in `root`, the first one found (one dataset per root):
    1. the caches `celeba_{partition}_{size}_{split}.npy` (splits train and test, or train,
       valid and test), uint8 (N, size, size, 3), memory-mapped, with the manifest
       `celeba_{partition}_{size}.json` that records what they were built from.
    2. `img_align_celeba/`: the JPEG files (in natural order of their names; also one folder
       deeper, as in the Kaggle copy `img_align_celeba/img_align_celeba/`).
    3. `img_align_celeba.zip`, the official archive, read in place (not extracted).
    4. `celeba_hf/`: a Hugging Face `datasets` DatasetDict saved with `save_to_disk`, one image
       column, splits train, valid (or validation) and test holding the official partition,
       each in file order (the layout of the hub copy that `download` saves). With
       partition="random" its splits are joined in that order, which is file order: the
       official partition is contiguous (train 000001-162770, valid 162771-182637, test
       182638-202599), so the split is that of the other layouts. A single train split of all
       images in file order (as in other hub copies) serves partition="random" too.
    5. `celeba.npz`: array images, uint8 (N, 218, 178, 3), the aligned images in file order;
       for partition="official" also partition (N,) (0/1/2) or filenames (N,) (looked up in
       list_eval_partition.txt). Read into memory: meant for subsets (the release is 23.6 GB).
    6. with `download` on, the Hugging Face hub copy `flwrlabs/celeba` (see `HF_REPO`), saved
       as source 4.
    `list_eval_partition.txt` in root gives the official partition of sources 2, 3 and 5.
    Sources 2-5 are converted once, chunk by chunk, into the caches of source 1 (one set per
    partition and size); afterwards the sources are not read again (they may be deleted). A
    cache whose recorded source is still in root but has changed (another number or size of
    files), or that was built with other settings, is reported as stale: delete it to rebuild.
Checksums: torchvision's published MD5s (`MD5`) of `img_align_celeba.zip` and
    `list_eval_partition.txt` are checked (with `verify`, the default) before a cache is built
    from them, once: the manifest records the result. The folder and the hub copy have none.
sample: the first 32 images of the release, cropped, shipped in `assets/` (see its README):
    24 train / 4 valid / 4 test (a fixed-seed permutation; all 32 belong to the official train
    partition), for the quick-start and the tests; its numbers are not comparable to the papers'.
"""

import importlib.resources
import io
import json
import logging
import os
import shutil
import tempfile
import warnings
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from functools import cached_property, partial
from pathlib import Path
from threading import Lock
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from . import files
from .download import file_digest
from .natural_images import (
    CHUNK,
    IMAGE_SUFFIXES,
    NaturalImageDataModule,
    RGBImages,
    bad_file,
    check_images,
    hf_image_column,
    hf_split,
    image_files,
    load_hf,
    natural_key,
    open_npy,
    read_hf,
    read_image,
    read_images,
    write_npy,
)

log = logging.getLogger(__name__)

WIDTH, HEIGHT = 178, 218  # the aligned-and-cropped release
LEFT, RIGHT, TOP, BOTTOM = 25, 25, 50, 40  # the paper's margins: a 128x128 window
CROP = 128
ROWS, COLS = slice(TOP, HEIGHT - BOTTOM), slice(LEFT, WIDTH - RIGHT)
SIZES = (128, 64, 32, 16, 8)
IMAGES = 202_599
OFFICIAL = {"train": 162_770, "valid": 19_867, "test": 19_962}
SPLIT_SEED = 0
TEST_FRACTION = 0.05
PARTITIONS = {"random": ("train", "test"), "official": ("train", "valid", "test")}

FOLDER = "img_align_celeba"
ZIP = "img_align_celeba.zip"
PARTITION = "list_eval_partition.txt"
HF_DIR = "celeba_hf"
NPZ = "celeba.npz"
CACHE = "celeba_{partition}_{size}_{split}.npy"
MANIFEST = "celeba_{partition}_{size}.json"
SAMPLE = "celeba_sample.npz"
SAMPLE_SIZES = {"train": 24, "valid": 4, "test": 4}
HF_SPLITS = {"train": ["train"], "valid": ["valid", "validation"], "test": ["test"]}

MD5 = {  # torchvision.datasets.CelebA.file_list: checksums of the official files
    ZIP: "00d2c5bc6d35e252742224ab0c1e8fcb",
    PARTITION: "d32c9cbf5e040fd4025c592c306e6668",
}
SITE = "http://mmlab.ie.cuhk.edu.hk/projects/CelebA.html"
HF_REPO = "flwrlabs/celeba"
"""The hub copy `download` fetches, chosen because it is the aligned release, complete and
partitioned as the official files: Flower Labs' CelebA (an organization's copy, not one user's
upload), config "img_align+identity+attr": the aligned 178x218 images (column "image", with
celeb_id and the 40 attributes) in splits train / valid / test of the official partition's sizes
(162,770 / 19,867 / 19,962). Other hub copies are resized (64x64), CelebA-HQ, or one unsplit
train split. Pinned to a revision, so the download is the same every time. Its parquet files
total about 12 GB against the 1.4 GB of img_align_celeba.zip: the images are stored re-encoded,
not as the release's JPEG bytes, so no published checksum applies; the datamodule checks the
split sizes and the size of every image. The rows are taken to be in file order within each
split (the order of the official files), which decides which images the random split puts in
the test set: the sizes are checked, that order cannot be."""
HF_CONFIG = "img_align+identity+attr"
HF_REVISION = "2d738f56e0e7f925ea36ae7c808ea925264aacec"


# ------------------------------------------------------------------ the crop
def box_reduce(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 (N, 128, 128, 3) -> (N, size, size, 3): each pixel the mean of its block of
    (128/size)^2 pixels, rounded half up."""
    factor = CROP // size
    if factor == 1:
        return np.ascontiguousarray(images)
    blocks = images.reshape(len(images), size, factor, size, factor, 3)
    sums = blocks.sum(axis=(2, 4), dtype=np.uint32)
    return ((sums + factor * factor // 2) // (factor * factor)).astype(np.uint8)


def crop_aligned(images: np.ndarray, size: int) -> np.ndarray:
    """Aligned images uint8 (N, 218, 178, 3) -> the paper's window, (N, size, size, 3)."""
    return box_reduce(images[:, ROWS, COLS], size)


def crop_image(image: Image.Image | np.ndarray, where: object, size: int) -> np.ndarray:
    """One aligned image (decoded, or an array) -> uint8 (size, size, 3); an image that is not
    178x218 is a clear error naming `where`."""
    if isinstance(image, Image.Image):
        if image.size != (WIDTH, HEIGHT):
            width, height = image.size
            raise bad_file(
                where,
                f"a {width}x{height} image, expected {WIDTH}x{HEIGHT} (width x height), the size "
                f"of every image of the aligned-and-cropped release ({FOLDER})",
                f"replace it with the original file of {FOLDER}",
            )
        image = image.convert("RGB")
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.shape != (HEIGHT, WIDTH, 3):
        expected = f"uint8 ({HEIGHT}, {WIDTH}, 3), an image of {FOLDER}"
        raise bad_file(where, f"image {array.dtype} {array.shape}, expected {expected}")
    return crop_aligned(array[None], size)[0]


# ------------------------------------------------------------------ splits and checksums
def random_split(n: int) -> dict[str, np.ndarray]:
    """The paper's protocol: positions (in file order) of the train images, in permuted order,
    and of the test images, in file order; 5% of `n` (rounded) are test images."""
    order = np.random.default_rng(SPLIT_SEED).permutation(n)
    test = round(TEST_FRACTION * n)
    if test < 1 or test >= n:
        raise ValueError(f"{n} images: too few for a {TEST_FRACTION:.0%} test split")
    return {"train": order[test:], "test": np.sort(order[:test])}


def check_md5(path: Path, verify: bool) -> str | None:
    """The file's md5, checked against the published one when `verify` (else None)."""
    if not verify:
        return None
    expected = MD5[path.name]
    if (actual := file_digest(path, "md5")) != expected:
        raise bad_file(
            path,
            f"md5 {actual}, not {expected} (torchvision's checksum of the official {path.name})",
            f"replace it with the official file (from {SITE}), or set `verify: false` to use "
            "this copy anyway",
        )
    return actual


FIX_STALE = "delete it and the caches it describes: they are rebuilt from the files in root"
FIX_PARTITION = f"replace it with the official {PARTITION}, or use `partition: random`"


def read_partition(path: Path) -> dict[str, int]:
    """`list_eval_partition.txt`: file name -> 0 (train), 1 (valid) or 2 (test)."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise bad_file(path, f"unreadable ({e})", FIX_PARTITION) from e
    table = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
            raise bad_file(
                path,
                f"line {number} is {line!r}, expected '<file name> <0, 1 or 2>' ('000001.jpg 0')",
                FIX_PARTITION,
            )
        table[fields[0]] = int(fields[1])
    return table


def fingerprint(path: Path) -> dict[str, int]:
    """What a cache records of its source: the number of files (folders) and bytes; not
    counting the cache-*.arrow files that `datasets` may add next to a saved dataset."""
    if not path.is_dir():
        return {"bytes": path.stat().st_size}
    count = size = 0
    for folder, _, found in os.walk(path):
        names = [name for name in found if not name.startswith("cache-")]
        count += len(names)
        size += sum(os.stat(os.path.join(folder, name)).st_size for name in names)
    return {"files": count, "bytes": size}


# ------------------------------------------------------------------ the source layouts
class Source:
    """One layout of the aligned images in root: their number, their official partition, and
    the images at given positions (in file order), cropped, as chunks."""

    layout = ""

    def __init__(self, path: Path, verify: bool) -> None:
        self.path = path
        self.verify = verify
        self.md5: str | None = None  # of the archive, when checked
        self.partition_file: Path | None = None  # when the partition comes from it

    def names(self) -> list[str]:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.names())

    def chunks(self, rows: np.ndarray, size: int) -> Iterator[np.ndarray]:
        raise NotImplementedError

    def partition(self) -> np.ndarray:
        """0/1/2 per image, from list_eval_partition.txt next to the source, by file name."""
        names = self.names()
        path = self.path.parent / PARTITION
        if not path.is_file():
            raise FileNotFoundError(
                f"partition='official' needs {path} (lines '000001.jpg 0': 0 train, 1 valid, "
                f"2 test), from the Eval folder of the CelebA downloads ({SITE}); or use "
                "`partition: random`, the paper's protocol"
            )
        check_md5(path, self.verify)
        self.partition_file = path
        return by_name(names, read_partition(path), path, self.path)


def by_name(names: Sequence[str], table: dict[str, int], path: Path, where: Path) -> np.ndarray:
    """The partition of each of `names`, every one of which `table` (read from `path`) lists."""
    if missing := [name for name in names if name not in table]:
        raise bad_file(
            path,
            f"it does not list {len(missing)} of the {len(names)} images of {where} "
            f"(e.g. {missing[0]})",
            FIX_PARTITION,
        )
    return np.array([table[name] for name in names], np.int64)


class FolderSource(Source):
    layout = "folder"

    @cached_property
    def files(self) -> list[Path]:
        return image_files(self.path)

    def names(self) -> list[str]:
        return [path.name for path in self.files]

    def chunks(self, rows: np.ndarray, size: int) -> Iterator[np.ndarray]:
        read = partial(read_image, convert=partial(crop_image, size=size))
        return read_images([self.files[i] for i in rows], size, False, read=read)


FIX_ZIP = f"replace it with the official {ZIP} (md5 {MD5[ZIP]}), from {SITE}"


def read_member(
    name: str, size: int, resize: bool, archive: zipfile.ZipFile, path: Path, lock: Lock
) -> np.ndarray:
    """One image of a zip archive, read under `lock` (a ZipFile's bookkeeping of open members
    is not thread-safe), then decoded and cropped (`crop_image`) in parallel."""
    where = f"{path}:{name}"
    try:
        with lock:
            raw = archive.read(name)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
        raise bad_file(where, f"a damaged archive member ({type(e).__name__}: {e})", FIX_ZIP) from e
    try:
        with Image.open(io.BytesIO(raw)) as image:
            return crop_image(image, where, size)
    except (UnidentifiedImageError, OSError) as e:
        raise bad_file(where, f"not a readable image ({e})", FIX_ZIP) from e


def open_zip(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise bad_file(path, f"not a readable zip archive, or cut short ({e})", FIX_ZIP) from e


class ZipSource(Source):
    layout = "zip"

    @cached_property
    def members(self) -> list[str]:
        with open_zip(self.path) as archive:
            names = [
                info.filename
                for info in archive.infolist()
                if not info.is_dir() and Path(info.filename).suffix.lower() in IMAGE_SUFFIXES
            ]
        return sorted(names, key=lambda name: natural_key(Path(name)))

    def names(self) -> list[str]:
        return [Path(name).name for name in self.members]

    def check(self) -> None:
        """The published md5, once, before the archive is read."""
        if self.md5 is None:
            self.md5 = check_md5(self.path, self.verify)

    def chunks(self, rows: np.ndarray, size: int) -> Iterator[np.ndarray]:
        self.check()
        with open_zip(self.path) as archive:
            read = partial(read_member, archive=archive, path=self.path, lock=Lock())
            yield from read_images([self.members[i] for i in rows], size, False, read=read)


class HFSource(Source):
    layout = "hf"

    @cached_property
    def splits(self) -> dict[str, Any]:
        """The splits train, valid (or validation), test that it has, in that order."""
        data = load_hf(self.path)
        found = {
            split: hf_split(data, names, self.path)
            for split, names in HF_SPLITS.items()
            if any(name in data for name in names)
        }
        if not found:
            raise bad_file(
                self.path, f"no split named train, valid or test (it has {sorted(data)})"
            )
        return found

    @cached_property
    def joined(self) -> Any:
        """Its splits, one after the other, image column only."""
        import datasets

        parts = []
        for part in self.splits.values():
            column = hf_image_column(part, self.path)
            part = part.select_columns([column])
            parts.append(part.rename_column(column, "image") if column != "image" else part)
        return datasets.concatenate_datasets(parts)

    def __len__(self) -> int:
        return sum(len(part) for part in self.splits.values())

    def partition(self) -> np.ndarray:
        if list(self.splits) != list(HF_SPLITS):
            raise bad_file(
                self.path,
                f"splits {sorted(self.splits)}: partition='official' needs train, valid (or "
                "validation) and test",
                "save the official partition as those splits, or use `partition: random`",
            )
        return np.repeat(np.arange(3), [len(part) for part in self.splits.values()])

    def chunks(self, rows: np.ndarray, size: int) -> Iterator[np.ndarray]:
        where = f"{self.path} ({'+'.join(self.splits)})"
        convert = partial(crop_image, size=size)
        return read_hf(self.joined, size, False, where, convert, rows=rows.tolist())


class NpzSource(Source):
    layout = "npz"

    @cached_property
    def arrays(self) -> dict[str, np.ndarray]:
        arrays = files.read_npz(self.path, ["images"], optional=["partition", "filenames"])
        check_images(arrays["images"], (HEIGHT, WIDTH), f"{self.path}[images]")
        return arrays

    def __len__(self) -> int:
        return len(self.arrays["images"])

    def partition(self) -> np.ndarray:
        n = len(self)
        if "partition" in self.arrays:
            part = self.arrays["partition"]
            if part.shape != (n,) or not np.isin(part, (0, 1, 2)).all():
                raise bad_file(f"{self.path}[partition]", f"expected ({n},) values 0, 1 or 2")
            return part.astype(np.int64)
        return super().partition()

    def names(self) -> list[str]:
        """The file names of the images (array filenames), to look up in the partition file."""
        if "filenames" not in self.arrays:
            raise bad_file(
                self.path,
                "no array partition (0 train / 1 valid / 2 test per image) nor filenames (to "
                f"look up in {PARTITION}), which partition='official' needs",
                "add one, or use `partition: random`",
            )
        return [str(name) for name in self.arrays["filenames"]]

    def chunks(self, rows: np.ndarray, size: int) -> Iterator[np.ndarray]:
        images = self.arrays["images"]
        for start in range(0, len(rows), CHUNK):
            yield crop_aligned(images[rows[start : start + CHUNK]], size)


LAYOUTS: list[tuple[str, type[Source]]] = [
    (FOLDER, FolderSource),
    (ZIP, ZipSource),
    (HF_DIR, HFSource),
    (NPZ, NpzSource),
]


# ------------------------------------------------------------------ download and sample
def download_hf(dest: Path) -> None:
    """`HF_REPO` at `HF_REVISION` via `datasets.load_dataset`, its split sizes checked, saved
    with `save_to_disk` at `dest`. It appears there only when complete (built in a temporary
    folder next to it, then renamed); the hub's cache, in that folder, is removed afterwards."""
    import datasets

    created = [p for p in (dest.parent, *dest.parent.parents) if not p.exists()]
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
    try:
        data = datasets.load_dataset(
            HF_REPO, HF_CONFIG, revision=HF_REVISION, cache_dir=str(work / "cache")
        )
        sizes = {split: len(data[split]) for split in data}
        if sizes != OFFICIAL:
            raise ValueError(f"{HF_REPO} has splits {sizes}, expected {OFFICIAL}")
        data.save_to_disk(str(work / "saved"))
        os.replace(work / "saved", dest)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        for folder in created:  # leave no empty data root behind
            if any(folder.iterdir()):
                break
            folder.rmdir()
        raise
    shutil.rmtree(work, ignore_errors=True)


def load_sample(size: int) -> dict[str, np.ndarray]:
    """The shipped sample: train/valid/test uint8 (N, size, size, 3)."""
    resource = importlib.resources.files(__package__) / "assets" / SAMPLE
    with importlib.resources.as_file(resource) as path:
        splits = files.read_npz(path, SAMPLE_SIZES)
    for split, images in splits.items():
        check_images(images, CROP, f"{SAMPLE}[{split}]")
    return {split: box_reduce(images, size) for split, images in splits.items()}


# ------------------------------------------------------------------ the datamodule
class CelebA(NaturalImageDataModule):
    """CelebA 128x128 (see the module docstring for the crop, splits, sources and checks).

    Args:
        root: directory of the data files and of the `.npy` caches (not needed with `sample`).
        sample: use the 32 images shipped with the package (24 train / 4 valid / 4 test;
            `partition` and `val_size` are ignored): for a quick try and the tests.
        size: 128 (the paper), or 64, 32, 16, 8: the 128x128 crop reduced by block means.
        partition: "random" (the paper's 95% / 5% split, seed `SPLIT_SEED`) or "official"
            (list_eval_partition.txt).
        val_size: with partition="random", the last `val_size` training images (in random
            order) form the validation split; 0: validate on the test split.
        flip: random horizontal flips of the training images, reproducible from (seed, epoch,
            index); off by default.
        verify: check the published MD5s of img_align_celeba.zip and list_eval_partition.txt
            before building a cache from them; false accepts other copies (a repacked zip).
        download: with no source in root, fetch the Hugging Face hub copy (`HF_REPO`, about
            12 GB, 36 GB free while downloading) into root/celeba_hf. Off by default: the
            images are large and come under the CelebA release agreement (non-commercial
            research use).
        batch_size: training batch size per device.
        eval_batch_size: validation/test batch size per device; defaults to `batch_size`.
        num_workers: DataLoader worker processes.
        seed: seed of the training order and of the flips (not of the split).
    """

    def __init__(
        self,
        root: str | None = None,
        sample: bool = False,
        size: int = 128,
        partition: str = "random",
        val_size: int = 5000,
        flip: bool = False,
        verify: bool = True,
        download: bool = False,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(root, batch_size, eval_batch_size, num_workers, seed, val_size, flip)
        self.save_hyperparameters()  # recorded with every checkpoint and test report
        if root is None and not sample:
            raise ValueError("set `root` (the directory of the data files) or `sample: true`")
        if size not in SIZES:
            raise ValueError(f"size must be one of {SIZES}, got {size}")
        if partition not in PARTITIONS:
            raise ValueError(f"partition must be 'random' or 'official', got {partition!r}")
        self.sample = sample
        self.size = size
        self.partition = partition
        self.verify = verify
        self.download = download
        self.data_shape = (3, size, size)

    # -------------------------------------------------------------- paths and settings
    def caches(self) -> dict[str, Path]:
        return {
            split: self._root / CACHE.format(partition=self.partition, size=self.size, split=split)
            for split in PARTITIONS[self.partition]
        }

    @property
    def manifest_path(self) -> Path:
        return self._root / MANIFEST.format(partition=self.partition, size=self.size)

    def settings(self) -> dict[str, Any]:
        """What the caches depend on besides the source (recorded in the manifest)."""
        crop = {"left": LEFT, "right": RIGHT, "top": TOP, "bottom": BOTTOM}
        settings = {"partition": self.partition, "size": self.size, "crop": crop}
        if self.partition == "random":
            settings |= {"split_seed": SPLIT_SEED, "test_fraction": TEST_FRACTION}
        return settings

    def _source(self) -> Source | None:
        """The first source present in root."""
        for name, layout in LAYOUTS:
            if (path := self._root / name).exists():
                return layout(path, self.verify)
        return None

    # -------------------------------------------------------------- building the caches
    def prepare_data(self) -> None:
        """Build the caches from the first source found, downloading it first when allowed
        (Lightning runs this once per node)."""
        if self.sample or all(path.exists() for path in self.caches().values()):
            return
        if (source := self._source()) is None:
            self._fetch()
            source = self._source()
            assert source is not None
        self._build(source)

    def _build(self, source: Source) -> None:
        if not (n := len(source)):
            raise FileNotFoundError(f"{source.path} holds no images. {self._help()}")
        if self.partition == "random":
            rows = random_split(n)
        else:
            part = source.partition()
            rows = {
                split: np.flatnonzero(part == k) for k, split in enumerate(PARTITIONS["official"])
            }
        if empty := [split for split, index in rows.items() if not len(index)]:
            raise bad_file(
                source.path, f"no images in the {' and '.join(empty)} split", FIX_PARTITION
            )
        if isinstance(source, ZipSource):
            source.check()
        log.info("CelebA: building the %s caches from %s", self.partition, source.path)
        for split, path in self.caches().items():
            write_npy(path, source.chunks(rows[split], self.size), len(rows[split]), self.size)
        record = {
            "source": source.path.name,
            "layout": source.layout,
            "fingerprint": fingerprint(source.path),
            "md5": source.md5,
            "partition_file": None,
            "images": n,
            "splits": {split: len(index) for split, index in rows.items()},
            "settings": self.settings(),
        }
        if source.partition_file is not None:
            record["partition_file"] = {
                "name": source.partition_file.name,
                "fingerprint": fingerprint(source.partition_file),
            }
        tmp = self.manifest_path.with_name(f".{self.manifest_path.name}.part")
        tmp.write_text(json.dumps(record, indent=1) + "\n")
        os.replace(tmp, self.manifest_path)

    def _fetch(self) -> None:
        """Download the hub copy into root/celeba_hf, or a clear error."""
        if not self.download:
            raise FileNotFoundError(f"No CelebA files found. {self._help()}")
        dest = self._root / HF_DIR
        log.warning("downloading %s (about 12 GB) into %s", HF_REPO, dest)
        try:
            download_hf(dest)
        except Exception as e:  # the network, the hub, the disk: all mean the same here
            raise RuntimeError(
                f"could not download {HF_REPO} (revision {HF_REVISION}) into {dest}: "
                f"{type(e).__name__}: {e}\n{self._help()}"
            ) from e

    # -------------------------------------------------------------- using them
    def setup(self, stage: str) -> None:
        if self.sample:
            splits = load_sample(self.size)
            self.train_set = RGBImages(splits["train"], flip=self.flip, seed=self.seed)
            self.val_set, self.test_set = RGBImages(splits["valid"]), RGBImages(splits["test"])
            return
        self.prepare_data()
        caches = self.caches()
        sizes = {split: len(open_npy(path, self.size)) for split, path in caches.items()}
        self._check_manifest(sizes)
        self._warn_sizes(sizes)
        if self.partition == "random":
            self._set_splits(caches["train"], caches["test"])
        else:
            self.train_set = RGBImages(caches["train"], flip=self.flip, seed=self.seed)
            self.val_set, self.test_set = RGBImages(caches["valid"]), RGBImages(caches["test"])

    def _check_manifest(self, sizes: dict[str, int]) -> None:
        """Report a stale cache: built with other settings, or from a source still in root
        that has changed since."""
        path = self.manifest_path
        if not path.is_file():
            log.info("%s is missing: the CelebA caches are used unchecked", path)
            return
        try:
            record = json.loads(path.read_text())
            recorded = [(record["source"], record["fingerprint"])]
            if record["partition_file"]:
                file = record["partition_file"]
                recorded.append((file["name"], file["fingerprint"]))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise bad_file(path, f"not a CelebA cache manifest ({e!r})", FIX_STALE) from e
        problems = []
        if record.get("settings") != self.settings():
            problems.append(f"built with {record.get('settings')}, not {self.settings()}")
        if record.get("splits") != sizes:
            problems.append(
                f"it records the splits {record.get('splits')}, the caches hold {sizes}"
            )
        for name, old in recorded:
            if (source := self._root / name).exists() and (new := fingerprint(source)) != old:
                problems.append(
                    f"{source} has changed since it was built from it ({old}, now {new})"
                )
        if problems:
            names = ", ".join(p.name for p in [*self.caches().values(), path])
            raise ValueError(
                f"Stale CelebA cache in {self._root}: {'; '.join(problems)}. Delete {names}: "
                "they are rebuilt from the files in root."
            )

    def _warn_sizes(self, sizes: dict[str, int]) -> None:
        if self.partition == "random":
            n = sum(sizes.values())
            canonical = n == IMAGES
            what = f"{n:,} images, not the {IMAGES:,} of the release"
        else:
            canonical = sizes == OFFICIAL
            what = f"splits of {sizes}, not the official {OFFICIAL}"
        if not canonical:
            names = " and ".join(p.name for p in self.caches().values())
            warnings.warn(
                f"{names} in {self._root}: {what}: a partial or altered copy, whose bits/dim "
                "are not comparable to the papers'.",
                stacklevel=3,
            )

    def _help(self) -> str:
        """What is expected where, and where to get it."""
        return (
            f"CelebA expects in root={str(self._root)!r} one of: the folder {FOLDER}/ (the "
            f"aligned-and-cropped JPEGs 000001.jpg .. 202599.jpg, 178x218), the archive {ZIP} "
            f"(read in place), {HF_DIR}/ (a Hugging Face DatasetDict saved with save_to_disk, "
            f"one image column, splits train/valid/test), or {NPZ} (array images, uint8 "
            f"(N, 218, 178, 3)); with `partition: official` also {PARTITION}. Get {ZIP} and "
            f"{PARTITION} (Eval folder) from {SITE}, or set `download: true` to fetch the "
            f"Hugging Face copy {HF_REPO} (about 12 GB), or `sample: true` for a quick try on "
            "the 32 images shipped with the package."
        )
