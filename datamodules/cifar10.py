"""CIFAR-10 (Krizhevsky 2009), 32x32 RGB, values 0..255: the canonical 50,000 / 10,000 split.

Splits: train = the 50,000 training images (data_batch_1..5, in order) but the last `val_size`
    (default 5,000), which form the validation split; test = the 10,000 test images
    (test_batch). `val_size=0`: train on all 50,000 and validate on the test set, as PixelCNN++
    does; papers report bits/dim on the test set either way.
Sources in `root`, the first one found:
    1. `cifar-10-batches-py/`, the extracted tarball: data_batch_1..5 and test_batch, python
       pickles of a dict whose b"data" is uint8 (10000, 3072), each row one image in
       channel-planar order (1024 red values, then green, then blue; each row-major).
    2. `cifar-10-python.tar.gz`, read in place (not extracted).
    3. `cifar10.npz`, or the one `cifar10*.npz`: arrays train and test, uint8 (N, 32, 32, 3).
       Any N is accepted, with a warning (e.g. a JPEG-degraded or truncated copy: its numbers
       are not CIFAR-10 numbers).
    4. `cifar10_hf/`: a Hugging Face `datasets` DatasetDict saved with `save_to_disk`, splits
       train and test, image column "img" (the layout of the HF `cifar10` dataset).
    5. The tarball, downloaded (md5-checked) into root when `download` is on.
    The pickles are read with an unpickler that only builds numpy arrays and plain containers:
    a pickle can run arbitrary code, and these may come from anywhere.
sample: a small real sample of CIFAR-10 training images shipped in `assets/` (see its README),
    for the quick-start and the tests; its numbers are not comparable to the papers'.
"""

import importlib.resources
import io
import pickle
import tarfile
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from einops import rearrange

from . import files
from .natural_images import (
    NaturalImageDataModule,
    RGBImages,
    bad_file,
    check_images,
    hf_split,
    load_hf,
    read_hf,
)

BATCH = 10_000  # images per pickle batch
TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_BATCHES = ["test_batch"]
FOLDER = "cifar-10-batches-py"
TARBALL = "cifar-10-python.tar.gz"
URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
MD5 = "c58f30108f718f92721af3b95e74349a"
NPZ = "cifar10.npz"
HF_DIR = "cifar10_hf"
SAMPLE = "cifar10_sample.npz"


def canonical_sizes() -> dict[str, int]:
    return {"train": len(TRAIN_BATCHES) * BATCH, "test": len(TEST_BATCHES) * BATCH}


class ArrayUnpickler(pickle.Unpickler):
    """Builds numpy arrays and plain containers only; refuses any other class."""

    ALLOWED = {
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.numeric", "_frombuffer"),  # pickle protocol 5
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # bytes pickled by python 3 with protocol 2
    }

    def find_class(self, module: str, name: str) -> Callable:
        module = module.replace("numpy.core", "numpy._core")  # pickled by numpy 1
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def read_batch(raw: bytes, where: object) -> np.ndarray:
    """One CIFAR pickle batch -> uint8 (BATCH, 32, 32, 3)."""
    try:
        batch = ArrayUnpickler(io.BytesIO(raw), encoding="bytes").load()
        data = batch.get(b"data", batch.get("data"))
    except Exception as e:  # unpickling a damaged file raises many types
        raise bad_file(where, f"not a CIFAR-10 pickle ({type(e).__name__}: {e})") from e
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.shape != (BATCH, 3072):
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise bad_file(where, f"data is {got}, expected uint8 ({BATCH}, 3072)")
    return rearrange(data, "n (c h w) -> n h w c", c=3, h=32)


def join(batches: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {
        "train": np.concatenate([batches[name] for name in TRAIN_BATCHES]),
        "test": np.concatenate([batches[name] for name in TEST_BATCHES]),
    }


def read_folder(folder: Path) -> dict[str, np.ndarray]:
    """The extracted `cifar-10-batches-py/` directory."""
    batches = {}
    for name in TRAIN_BATCHES + TEST_BATCHES:
        if not (path := folder / name).is_file():
            raise FileNotFoundError(f"{path} is missing: the directory {folder} is incomplete")
        batches[name] = read_batch(path.read_bytes(), path)
    return join(batches)


def read_tarball(path: Path) -> dict[str, np.ndarray]:
    """`cifar-10-python.tar.gz`, its members read in one pass (no extraction)."""
    wanted = {f"{FOLDER}/{name}": name for name in TRAIN_BATCHES + TEST_BATCHES}
    raw = {}
    try:
        with tarfile.open(path, "r:gz") as tar:
            for member in tar:
                if (name := wanted.get(member.name)) and (f := tar.extractfile(member)):
                    raw[name] = (f.read(), f"{path}:{member.name}")
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise bad_file(path, f"not a readable .tar.gz ({type(e).__name__}: {e})") from e
    batches = {name: read_batch(data, where) for name, (data, where) in raw.items()}
    if missing := [member for member, name in wanted.items() if name not in batches]:
        raise bad_file(path, f"missing members {missing}")
    return join(batches)


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """An npz with arrays train and test, uint8 (N, 32, 32, 3), any N (warned)."""
    splits = files.read_npz(path, ("train", "test"))
    for split, images in splits.items():
        check_images(images, 32, f"{path}[{split}]")
    sizes = {split: len(images) for split, images in splits.items()}
    if sizes != canonical_sizes():
        warnings.warn(
            f"{path}: {sizes['train']} training and {sizes['test']} test images, not CIFAR-10's "
            f"{canonical_sizes()['train']} and {canonical_sizes()['test']}: a partial or altered "
            "copy, whose bits/dim are not comparable to the papers' (and whose validation "
            "split, its last training images, is not the canonical one).",
            stacklevel=2,
        )
    return splits


def read_hf_dir(path: Path) -> dict[str, np.ndarray]:
    """A DatasetDict saved with `save_to_disk`: splits train and test, 32x32 images."""
    data = load_hf(path)
    splits = {}
    for split, n in canonical_sizes().items():
        images = hf_split(data, [split], path)
        if len(images) != n:
            raise bad_file(path, f"split {split} has {len(images)} images, expected {n}")
        splits[split] = np.concatenate(list(read_hf(images, 32, False, f"{path}[{split}]")))
    return splits


def load_sample() -> dict[str, np.ndarray]:
    """The shipped sample: train/valid/test uint8 (N, 32, 32, 3)."""
    resource = importlib.resources.files(__package__) / "assets" / SAMPLE
    with importlib.resources.as_file(resource) as path, np.load(path) as f:
        return {split: f[split] for split in ("train", "valid", "test")}


class CIFAR10(NaturalImageDataModule):
    """CIFAR-10 (see the module docstring for sources, splits and file layouts).

    Args:
        root: directory of the data files (not needed with `sample`).
        sample: use the small sample shipped with the package (its own train/valid/test;
            `val_size` is ignored): for a quick try and the tests, not for reportable numbers.
        val_size: the last `val_size` training images form the validation split; 0: validate
            on the test set (and train on all 50,000).
        flip: random horizontal flips of the training images, reproducible from (seed, epoch,
            index); off by default (some papers use them).
        download: fetch the tarball into root when no source is there.
        batch_size: training batch size per device.
        eval_batch_size: validation/test batch size per device; defaults to `batch_size`.
        num_workers: DataLoader worker processes.
        seed: seed of the training order and of the flips.
    """

    data_shape = (3, 32, 32)

    def __init__(
        self,
        root: str | None = None,
        sample: bool = False,
        val_size: int = 5000,
        flip: bool = False,
        download: bool = True,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(root, batch_size, eval_batch_size, num_workers, seed, val_size, flip)
        self.save_hyperparameters()  # recorded with every checkpoint and test report
        if root is None and not sample:
            raise ValueError("set `root` (the directory of the data files) or `sample: true`")
        self.sample = sample
        self.download = download

    def prepare_data(self) -> None:
        """Download the tarball when no source is in root (Lightning runs this once per node)."""
        if not self.sample and self._source() is None:
            self.fetch(self._root / TARBALL, [(URL, ("md5", MD5))], read_tarball)

    def setup(self, stage: str) -> None:
        if self.sample:
            splits = load_sample()
            self.train_set = RGBImages(splits["train"], flip=self.flip, seed=self.seed)
            self.val_set, self.test_set = RGBImages(splits["valid"]), RGBImages(splits["test"])
            return
        self.prepare_data()
        source = self._source()
        assert source is not None
        read, path = source
        splits = read(path)
        self._set_splits(splits["train"], splits["test"])

    def _source(self) -> tuple[Callable[[Path], dict[str, np.ndarray]], Path] | None:
        """The first source present in root, with its reader."""
        root = self._root
        if (root / FOLDER).is_dir():
            return read_folder, root / FOLDER
        if (root / TARBALL).is_file():
            return read_tarball, root / TARBALL
        if (root / NPZ).is_file():
            return read_npz, root / NPZ
        if npz := sorted(root.glob("cifar10*.npz")):
            if len(npz) > 1:
                names = ", ".join(p.name for p in npz)
                raise ValueError(f"several CIFAR-10 npz files in {root} ({names}): keep one")
            return read_npz, npz[0]
        if (root / HF_DIR).is_dir():
            return read_hf_dir, root / HF_DIR
        return None

    def _help(self) -> str:
        """What is expected where, and where to get it."""
        return (
            f"CIFAR-10 expects in root={str(self._root)!r} one of: the extracted directory "
            f"{FOLDER}/ ({', '.join(TRAIN_BATCHES + TEST_BATCHES)}), the tarball {TARBALL}, "
            f"{NPZ} (arrays train and test, uint8 (N, 32, 32, 3)), or {HF_DIR}/ (a Hugging Face "
            "DatasetDict saved with save_to_disk, splits train/test, image column img). "
            f"Get the tarball from:\n  {URL}\nor set `download: true`, or `sample: true` for a "
            "quick try on the small sample shipped with the package."
        )
