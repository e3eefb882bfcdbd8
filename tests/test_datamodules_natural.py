"""8-bit RGB datamodules (CIFAR-10, LSUN bedrooms, ImageNet 64x64): every source format, the
splits, orientation, flips, the memory-mapped caches, downloads and errors.

Only the shipped CIFAR-10 sample and tiny synthetic files in tmp_path are used (no network, no
data outside the repository); the canonical split sizes are patched down to match them.
"""

import hashlib
import importlib.util
import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules import CIFAR10, ImageNet64, LSUNBedrooms, lsun
from datamodules import cifar10 as cf
from datamodules import download as dl
from datamodules import imagenet64 as inet
from datamodules import natural_images as ni

REPO = Path(__file__).resolve().parents[1]


def rgb(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def images_of(dataset) -> np.ndarray:
    """A dataset's images as uint8 (N, H, W, 3), checking the (x, index) contract on the way."""
    out = []
    for i in range(len(dataset)):
        x, index = dataset[i]
        assert index == i and x.dtype == torch.float32 and x.shape[0] == 3
        out.append(x.permute(1, 2, 0).numpy())
    stacked = np.stack(out)
    assert (stacked == stacked.round()).all() and stacked.min() >= 0 and stacked.max() <= 255
    return stacked.astype(np.uint8)


def assert_splits(dm, train: np.ndarray, test: np.ndarray, val_size: int) -> None:
    """train/val/test: the first N - val_size training images, the last val_size, the test set."""
    np.testing.assert_array_equal(images_of(dm.train_set), train[: len(train) - val_size])
    np.testing.assert_array_equal(images_of(dm.val_set), train[len(train) - val_size :])
    np.testing.assert_array_equal(images_of(dm.test_set), test)


def train_epoch(dm, epoch: int) -> np.ndarray:
    dm.train_set.set_epoch(epoch)
    return images_of(dm.train_set)


def png_bytes(image: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=fmt)
    return buffer.getvalue()


def write_folder(folder: Path, images: np.ndarray) -> None:
    """PNG files 1.png, 2.png, ..., 10.png, ...: natural, not lexicographic, order."""
    folder.mkdir(parents=True)
    for i, image in enumerate(images, 1):
        (folder / f"{i}.png").write_bytes(png_bytes(image))


def save_hf(path: Path, splits: dict[str, np.ndarray], column: str = "img") -> None:
    import datasets

    datasets.DatasetDict(
        {
            split: datasets.Dataset.from_dict(
                {column: [Image.fromarray(a) for a in images], "label": [0] * len(images)}
            )
            for split, images in splits.items()
        }
    ).save_to_disk(str(path))


# ------------------------------------------------------------------ CIFAR-10
@pytest.fixture
def cifar(monkeypatch: pytest.MonkeyPatch) -> dict[str, np.ndarray]:
    """Tiny CIFAR-10: 4 images per pickle batch (20 train, 4 test), uint8 (N, 32, 32, 3)."""
    monkeypatch.setattr(cf, "BATCH", 4)
    return {"train": rgb(20, 32, seed=1), "test": rgb(4, 32, seed=2)}


def cifar_pickle(images: np.ndarray) -> bytes:
    """One batch in the canonical layout: rows of 3072 values, the R, G, B planes in turn."""
    data = images.transpose(0, 3, 1, 2).reshape(len(images), 3072)
    batch = {b"batch_label": b"synthetic", b"data": data, b"labels": [0] * len(images)}
    return pickle.dumps(batch, protocol=2)


def cifar_members(splits: dict[str, np.ndarray]) -> dict[str, bytes]:
    batches = np.split(splits["train"], 5) + [splits["test"]]
    names = cf.TRAIN_BATCHES + cf.TEST_BATCHES
    return {name: cifar_pickle(images) for name, images in zip(names, batches, strict=True)}


def cifar_tarball(splits: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in cifar_members(splits).items():
            info = tarfile.TarInfo(f"{cf.FOLDER}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def write_cifar(root: Path, splits: dict[str, np.ndarray], source: str) -> None:
    if source == "folder":
        (root / cf.FOLDER).mkdir()
        for name, data in cifar_members(splits).items():
            (root / cf.FOLDER / name).write_bytes(data)
    elif source == "tarball":
        (root / cf.TARBALL).write_bytes(cifar_tarball(splits))
    elif source == "npz":
        np.savez(root / "cifar10_jpeg_q75.npz", **splits)  # any cifar10*.npz name
    else:
        save_hf(root / cf.HF_DIR, splits)


def test_cifar_sample_loads_with_indexed_8bit_batches() -> None:
    dm = CIFAR10(sample=True, batch_size=32, eval_batch_size=40)
    dm.setup("fit")
    assert (dm.data_shape, dm.data_kind) == ((3, 32, 32), "8bit")
    assert [len(d) for d in (dm.train_set, dm.val_set, dm.test_set)] == [400, 100, 100]
    x, index = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 3, 32, 32) and x.dtype == torch.float32
    assert (x == x.round()).all() and x.min() >= 0 and x.max() <= 255 and x.std() > 30
    assert index.dtype == torch.int64 and index.shape == (32,)
    torch.testing.assert_close(x[0], dm.train_set[int(index[0])][0])
    batches = list(dm.test_dataloader())
    assert sorted(torch.cat([i for _, i in batches]).tolist()) == list(range(100))
    sample = cf.load_sample()
    np.testing.assert_array_equal(images_of(dm.test_set), sample["test"])
    with np.load(REPO / "datamodules" / "assets" / cf.SAMPLE) as f:  # disjoint real images
        sources = [set(f[f"{s}_source_index"].tolist()) for s in ("train", "valid", "test")]
    assert sum(map(len, sources)) == len(set.union(*sources)) == 600


@pytest.mark.parametrize("source", ["folder", "tarball", "npz", "hf"])
def test_cifar_sources_round_trip_to_the_same_splits(tmp_path, cifar, source) -> None:
    write_cifar(tmp_path, cifar, source)
    dm = CIFAR10(root=str(tmp_path), val_size=6, download=False)
    dm.setup("fit")
    assert_splits(dm, cifar["train"], cifar["test"], val_size=6)


def test_cifar_planar_rows_come_out_upright(tmp_path, cifar) -> None:
    """A row with one red top-left, green top-right and blue bottom-left pixel."""
    row = np.zeros(3072, np.uint8)
    row[0] = row[1024 + 31] = row[2048 + 31 * 32] = 255
    data = np.zeros((4, 3072), np.uint8)
    data[0] = row
    image = cf.read_batch(pickle.dumps({b"data": data}), "batch")[0]
    expected = np.zeros((32, 32, 3), np.uint8)
    expected[0, 0, 0] = expected[0, 31, 1] = expected[31, 0, 2] = 255
    np.testing.assert_array_equal(image, expected)


def test_cifar_val_size_zero_validates_on_test(tmp_path, cifar) -> None:
    write_cifar(tmp_path, cifar, "folder")
    dm = CIFAR10(root=str(tmp_path), val_size=0)
    dm.setup("fit")
    np.testing.assert_array_equal(images_of(dm.train_set), cifar["train"])
    np.testing.assert_array_equal(images_of(dm.val_set), cifar["test"])
    with pytest.raises(ValueError, match="val_size=20 leaves none"):
        CIFAR10(root=str(tmp_path), val_size=20).setup("fit")


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        ("truncated", "not a readable .tar.gz"),
        ("wrong size", r"expected uint8 \(4, 3072\)"),
        ("missing member", "missing members"),
    ],
)
def test_cifar_bad_tarball_is_a_clear_error(tmp_path, cifar, corrupt, message) -> None:
    data = cifar_tarball(cifar)
    if corrupt == "truncated":
        data = data[: len(data) // 2]
    elif corrupt == "wrong size":
        data = cifar_tarball({"train": rgb(25, 32), "test": rgb(5, 32)})  # 5 per batch
    else:
        data = cifar_tarball({"train": cifar["train"], "test": cifar["test"][:0]})
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:  # rebuild without test_batch
            members = [(m, tar.extractfile(m).read()) for m in tar if "test" not in m.name]
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
            for member, body in members:
                tar.addfile(member, io.BytesIO(body))
        data = buffer.getvalue()
    (tmp_path / cf.TARBALL).write_bytes(data)
    with pytest.raises(ValueError, match=message) as error:
        CIFAR10(root=str(tmp_path), val_size=6, download=False).setup("fit")
    assert cf.TARBALL in str(error.value)


def test_cifar_npz_of_other_sizes_is_accepted_with_a_warning(tmp_path, cifar) -> None:
    np.savez(tmp_path / "cifar10_jpeg_q75.npz", train=cifar["train"][:18], test=cifar["test"])
    with pytest.warns(UserWarning, match="18 training and 4 test images, not CIFAR-10's 20"):
        dm = CIFAR10(root=str(tmp_path), val_size=6)
        dm.setup("fit")
    assert_splits(dm, cifar["train"][:18], cifar["test"], val_size=6)
    np.savez(tmp_path / "cifar10_other.npz", **cifar)
    with pytest.raises(ValueError, match="several CIFAR-10 npz files"):
        CIFAR10(root=str(tmp_path)).setup("fit")


def test_cifar_wrong_npz_and_hf_sizes_are_clear_errors(tmp_path, cifar) -> None:
    np.savez(tmp_path / "cifar10.npz", train=cifar["train"][..., 0], test=cifar["test"])
    with pytest.raises(ValueError, match=r"cifar10.npz\[train\].*expected uint8 \(N, 32, 32, 3\)"):
        CIFAR10(root=str(tmp_path)).setup("fit")
    (tmp_path / "cifar10.npz").unlink()
    save_hf(tmp_path / cf.HF_DIR, {"train": cifar["train"][:7], "test": cifar["test"]})
    with pytest.raises(ValueError, match="split train has 7 images, expected 20"):
        CIFAR10(root=str(tmp_path)).setup("fit")


def test_cifar_pickles_cannot_run_code(tmp_path, cifar) -> None:
    class Exploit:
        def __reduce__(self):
            return (print, ("pwned",))

    with pytest.raises(ValueError, match="refusing to load builtins.print"):
        cf.read_batch(pickle.dumps({b"data": Exploit()}), "batch")


def test_cifar_download_checks_the_md5(tmp_path, cifar, monkeypatch) -> None:
    served = cifar_tarball(cifar)
    calls = []

    def fake_fetch(url, dest, timeout=60.0):
        calls.append(url)
        dest.write_bytes(served)

    monkeypatch.setattr(dl, "fetch_url", fake_fetch)
    with pytest.raises(RuntimeError, match="md5 mismatch") as error:  # the real md5
        CIFAR10(root=str(tmp_path), val_size=6).prepare_data()
    assert "sample: true" in str(error.value) and list(tmp_path.iterdir()) == []

    monkeypatch.setattr(cf, "MD5", hashlib.md5(served).hexdigest())
    dm = CIFAR10(root=str(tmp_path), val_size=6)
    dm.prepare_data()
    dm.setup("fit")
    assert calls == [cf.URL, cf.URL] and (tmp_path / cf.TARBALL).read_bytes() == served
    assert_splits(dm, cifar["train"], cifar["test"], val_size=6)


def test_cifar_missing_without_download_names_the_files(tmp_path) -> None:
    with pytest.raises(FileNotFoundError) as error:
        CIFAR10(root=str(tmp_path), download=False).prepare_data()
    text = str(error.value)
    for expected in [str(tmp_path), cf.FOLDER, cf.TARBALL, cf.NPZ, cf.HF_DIR, cf.URL, "sample"]:
        assert expected in text
    with pytest.raises(ValueError, match="root"):
        CIFAR10()


def test_flips_train_only_reproducibly_and_anew_each_epoch(tmp_path, cifar) -> None:
    write_cifar(tmp_path, cifar, "folder")

    def datamodule(**kwargs) -> CIFAR10:
        dm = CIFAR10(root=str(tmp_path), val_size=6, batch_size=2, **kwargs)
        dm.setup("fit")
        return dm

    plain, dm = datamodule(), datamodule(flip=True, seed=3)
    base = images_of(plain.train_set)
    e0, e1 = train_epoch(dm, 0), train_epoch(dm, 1)
    mirrored = (e0 == base[:, :, ::-1]).all(axis=(1, 2, 3))
    assert ((e0 == base).all(axis=(1, 2, 3)) | mirrored).all() and 0 < mirrored.sum() < 14
    assert (e0 != e1).any()
    np.testing.assert_array_equal(train_epoch(datamodule(flip=True, seed=3), 1), e1)
    assert (train_epoch(datamodule(flip=True, seed=4), 1) != e1).any()
    for split in ("val_set", "test_set"):
        getattr(dm, split).set_epoch(1)  # never flipped
        np.testing.assert_array_equal(
            images_of(getattr(dm, split)), images_of(getattr(plain, split))
        )

    loader = datamodule(flip=True, seed=3, num_workers=2).train_dataloader()
    loader.sampler.set_epoch(1)  # as Lightning does: reaches the dataset in every worker
    seen = {i: x for xs, index in loader for x, i in zip(xs, index.tolist(), strict=True)}
    for i, x in seen.items():
        np.testing.assert_array_equal(x.permute(1, 2, 0).numpy(), e1[i])


# ------------------------------------------------------------------ shared pieces
def test_npy_writer_shrinks_and_never_leaves_a_partial_file(tmp_path) -> None:
    images = rgb(5, 4)
    path = tmp_path / "cache.npy"
    with ni.NpyWriter(path, capacity=9, size=4) as writer:
        writer.append(images[:3])
        writer.append(images[3:])
    np.testing.assert_array_equal(np.load(path), images)
    assert path.stat().st_size == np.load(path, mmap_mode="r").offset + images.nbytes

    with pytest.raises(ValueError, match="gave 5 of 6"):
        ni.write_npy(tmp_path / "other.npy", [images], capacity=6, size=4)
    with pytest.raises(ValueError, match="more than the 4"):
        ni.write_npy(tmp_path / "other.npy", [images], capacity=4, size=4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache.npy"]


def test_memmapped_dataset_pickles_without_its_images(tmp_path) -> None:
    path = tmp_path / "cache.npy"
    np.save(path, rgb(50, 32))
    dataset = ni.RGBImages(path, range(10, 50))
    assert isinstance(dataset.images, np.memmap) and len(dataset) == 40
    copy = pickle.loads(pickle.dumps(dataset))
    assert len(pickle.dumps(dataset)) < 1000
    torch.testing.assert_close(copy[0][0], dataset[0][0])
    np.testing.assert_array_equal(copy[0][0].permute(1, 2, 0).numpy(), np.load(path)[10])


def test_square_image_takes_the_central_crop_and_box_resizes() -> None:
    small = rgb(1, 16)[0]
    crop = np.kron(small, np.ones((2, 2, 1), np.uint8))  # 32x32, each pixel a 2x2 block
    wide = np.full((32, 48, 3), 255, np.uint8)  # 48 wide: 8 columns cut on each side
    wide[:, 8:40] = crop
    np.testing.assert_array_equal(ni.square_image(Image.fromarray(wide), 16), small)
    np.testing.assert_array_equal(ni.square_image(Image.fromarray(wide.transpose(1, 0, 2)), 32),
                                  crop.transpose(1, 0, 2))  # fmt: skip


# ------------------------------------------------------------------ LSUN bedrooms
@pytest.fixture
def bedrooms(monkeypatch: pytest.MonkeyPatch) -> dict[str, np.ndarray]:
    monkeypatch.setattr(lsun, "TEST_SIZE", 3)
    return {"train": rgb(12, 32, seed=3), "valid": rgb(3, 32, seed=4)}


def blown_up(images: np.ndarray, factor: int, margin: int) -> list[np.ndarray]:
    """Each image scaled up by pixel blocks and padded left/right with noise: its central
    square crop, BOX-resized by 1/factor, is the image again."""
    out = []
    for image in images:
        big = np.kron(image, np.ones((factor, factor, 1), np.uint8))
        pad = rgb(1, big.shape[0], seed=9)[0][:, :margin]
        out.append(np.concatenate([pad, big, pad], axis=1))
    return out


@pytest.mark.parametrize("source", ["npz", "folders", "hf"])
def test_lsun_sources_round_trip_and_the_cache_is_reused(tmp_path, bedrooms, source, monkeypatch):
    if source == "npz":
        np.savez(tmp_path / "lsun_bedroom_32.npz", **bedrooms)
    elif source == "folders":
        for split, images in bedrooms.items():
            (tmp_path / split).mkdir()
            for i, image in enumerate(blown_up(images, factor=3, margin=5)):
                (tmp_path / split / f"{i:03d}.png").write_bytes(png_bytes(image))
    else:
        big = {s: np.stack(blown_up(images, factor=2, margin=4)) for s, images in bedrooms.items()}
        save_hf(
            tmp_path / lsun.HF_DIR, {"train": big["train"], "validation": big["valid"]}, "image"
        )
    dm = LSUNBedrooms(root=str(tmp_path), val_size=4)
    dm.prepare_data()
    dm.setup("fit")
    assert (dm.data_shape, dm.data_kind) == ((3, 32, 32), "8bit")
    assert_splits(dm, bedrooms["train"], bedrooms["valid"], val_size=4)
    assert isinstance(dm.train_set.images, np.memmap)

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the cache was rebuilt")

    monkeypatch.setattr(lsun, "write_npy", no_rebuild)
    again = LSUNBedrooms(root=str(tmp_path), val_size=4)
    again.setup("test")
    np.testing.assert_array_equal(images_of(again.test_set), bedrooms["valid"])


def test_lsun_errors_and_warnings(tmp_path, bedrooms) -> None:
    with pytest.raises(ValueError, match="resolution must be 32 or 64"):
        LSUNBedrooms(root=str(tmp_path), resolution=48)
    with pytest.raises(FileNotFoundError) as error:
        LSUNBedrooms(root=str(tmp_path), resolution=64).setup("fit")
    for expected in ["lsun_bedroom_64_train.npy", "lsun_bedroom_64_valid.npy", "prepare_lsun.py"]:
        assert expected in str(error.value)
    np.savez(tmp_path / "lsun_bedroom_32.npz", train=bedrooms["train"], valid=bedrooms["valid"][:2])
    with pytest.warns(UserWarning, match="2 test images, not the 3"):
        LSUNBedrooms(root=str(tmp_path), val_size=4).setup("fit")
    cache = tmp_path / "lsun_bedroom_32_train.npy"
    cache.write_bytes(cache.read_bytes()[:-100])  # an interrupted copy
    with pytest.raises(ValueError, match="unreadable .npy") as error:
        LSUNBedrooms(root=str(tmp_path), val_size=4).setup("fit")
    assert str(cache) in str(error.value) and "rebuilt" in str(error.value)


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prepare_lsun_crops_resizes_and_drops_exact_duplicates(tmp_path, bedrooms) -> None:
    prepare = load_script("prepare_lsun")
    big = blown_up(bedrooms["train"][:6], factor=2, margin=6)  # 64x76: crop 64, resize 32
    values = [png_bytes(image) for image in big]
    values.insert(3, png_bytes(big[1]))  # an exact duplicate
    values.insert(5, png_bytes(big[1], fmt="BMP"))  # the same pixels, encoded differently
    values.append(b"not an image")
    paths = lsun.cache_paths(tmp_path, 32)["train"], lsun.cache_paths(tmp_path, 64)["train"]
    stats = prepare.convert(values, len(values), {32: paths[0], 64: paths[1]}, dedupe=True)
    assert stats == {"kept": 6, "duplicates": 2, "undecodable": 1}
    np.testing.assert_array_equal(np.load(paths[0]), bedrooms["train"][:6])
    assert np.load(paths[1]).shape == (6, 64, 64, 3)

    valid = lsun.cache_paths(tmp_path, 32)["valid"]
    stats = prepare.convert(values[:4], 4, {32: valid}, dedupe=False)  # test split kept whole
    assert stats["kept"] == 4
    dm = LSUNBedrooms(root=str(tmp_path), val_size=2)
    with pytest.warns(UserWarning, match="4 test images"):
        dm.setup("fit")
    assert len(dm.train_set) == 4 and len(dm.test_set) == 4


def test_prepare_lsun_from_an_lmdb_export(tmp_path, bedrooms, monkeypatch) -> None:
    lmdb = pytest.importorskip("lmdb")
    prepare = load_script("prepare_lsun")
    exports = {  # WebP (lossless) and PNG values, as encoded images in the LSUN export
        "bedroom_train_lmdb": [*bedrooms["train"], bedrooms["train"][0]],  # one duplicate
        "bedroom_val_lmdb": list(bedrooms["valid"]),
    }
    for name, images in exports.items():
        env = lmdb.open(str(tmp_path / name), map_size=1 << 24)
        with env.begin(write=True) as txn:
            for i, image in enumerate(images):
                value = Image.fromarray(np.kron(image, np.ones((2, 2, 1), np.uint8)))
                encoding = {"format": "WEBP", "lossless": True} if i % 2 else {"format": "PNG"}
                buffer = io.BytesIO()
                value.save(buffer, **encoding)
                txn.put(f"{i:040x}".encode(), buffer.getvalue())
        env.close()
    argv = ["prepare_lsun.py", "--lmdb", str(tmp_path), "--out", str(tmp_path / "out")]
    monkeypatch.setattr("sys.argv", argv)
    prepare.main()
    dm = LSUNBedrooms(root=str(tmp_path / "out"), val_size=4)
    dm.setup("fit")
    assert_splits(dm, bedrooms["train"], bedrooms["valid"], val_size=4)
    big = LSUNBedrooms(root=str(tmp_path / "out"), resolution=64, val_size=4)
    big.setup("fit")
    assert len(big.train_set) == 8 and big.test_set[0][0].shape == (3, 64, 64)


# ------------------------------------------------------------------ ImageNet 64x64
@pytest.fixture
def imagenet(monkeypatch: pytest.MonkeyPatch) -> dict[str, np.ndarray]:
    """20 train (2 per npz batch) and 3 valid images; the releases' sizes patched to match."""
    monkeypatch.setattr(inet, "RELEASES", {(20, 3): "tiny"})
    return {"train": rgb(20, 64, seed=5), "valid": rgb(3, 64, seed=6)}


def planar(images: np.ndarray) -> np.ndarray:
    return images.transpose(0, 3, 1, 2).reshape(len(images), -1)


def write_imagenet(root: Path, splits: dict[str, np.ndarray], source: str) -> None:
    if source == "folders":
        for split, images in splits.items():
            write_folder(root / inet.FOLDERS[split], images)
    elif source == "npz":
        (root / "Imagenet64_train").mkdir()  # the batches may sit one folder below root
        for i, part in enumerate(np.split(splits["train"], 10), 1):
            np.savez(root / "Imagenet64_train" / inet.NPZ_TRAIN.format(i), data=planar(part))
        np.savez_compressed(root / inet.NPZ_VALID, data=planar(splits["valid"]))
    else:
        save_hf(root / inet.HF_DIR, splits, "image")


@pytest.mark.parametrize("source", ["folders", "npz", "hf"])
def test_imagenet_sources_round_trip_and_the_cache_is_reused(
    tmp_path, imagenet, source, monkeypatch
) -> None:
    write_imagenet(tmp_path, imagenet, source)
    dm = ImageNet64(root=str(tmp_path), val_size=5)
    dm.setup("fit")
    assert (dm.data_shape, dm.data_kind) == ((3, 64, 64), "8bit")
    assert_splits(dm, imagenet["train"], imagenet["valid"], val_size=5)
    assert isinstance(dm.train_set.images, np.memmap)
    assert sorted(p.name for p in tmp_path.glob("*.npy")) == [
        "imagenet64_train.npy",
        "imagenet64_valid.npy",
    ]

    monkeypatch.setattr(inet, "write_npy", lambda *a, **k: pytest.fail("the cache was rebuilt"))
    again = ImageNet64(root=str(tmp_path), val_size=0)
    again.setup("fit")
    np.testing.assert_array_equal(images_of(again.val_set), imagenet["valid"])


def test_imagenet_planar_rows_come_out_upright() -> None:
    """A row with one red top-left, green top-right and blue bottom-left pixel."""
    row = np.zeros((1, 12288), np.uint8)
    row[0, 0] = row[0, 4096 + 63] = row[0, 8192 + 63 * 64] = 255
    expected = np.zeros((1, 64, 64, 3), np.uint8)
    expected[0, 0, 0, 0] = expected[0, 0, 63, 1] = expected[0, 63, 0, 2] = 255
    np.testing.assert_array_equal(inet.planar_to_hwc(row), expected)


def test_imagenet_wrong_sizes_and_files_are_clear_errors(tmp_path, imagenet) -> None:
    write_imagenet(
        tmp_path, {"train": imagenet["train"][:19], "valid": imagenet["valid"]}, "folders"
    )
    with pytest.raises(ValueError, match="19 train / 3 valid images, which is neither release"):
        ImageNet64(root=str(tmp_path)).setup("fit")
    assert not list(tmp_path.glob("*.npy"))
    (tmp_path / "train_64x64" / "20.png").write_bytes(png_bytes(rgb(1, 32)[0]))
    with pytest.raises(ValueError, match=r"20.png.*expected uint8 \(64, 64, 3\)"):
        ImageNet64(root=str(tmp_path)).setup("fit")
    assert not list(tmp_path.glob("*.npy")) and not list(tmp_path.glob(".*part"))


def test_imagenet_incomplete_or_missing_sources(tmp_path, imagenet) -> None:
    write_imagenet(tmp_path, imagenet, "npz")
    (tmp_path / "Imagenet64_train" / "train_data_batch_7.npz").unlink()
    with pytest.raises(FileNotFoundError, match="missing train_data_batch_7.npz"):
        ImageNet64(root=str(tmp_path)).setup("fit")
    with pytest.raises(FileNotFoundError) as error:
        ImageNet64(root=str(tmp_path / "empty")).setup("fit")
    for expected in ["train_64x64", "valid_64x64", "val_data.npz", inet.HF_DIR, "image-net.org"]:
        assert expected in str(error.value)
