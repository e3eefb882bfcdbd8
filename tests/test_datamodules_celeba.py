"""CelebA (the Pyramid PixelCNN's 128x128 crop): every source layout, the crop and block means,
the random and official splits, the memory-mapped caches and their staleness, checksums,
downloads (faked) and errors, and the shipped sample.

Only the shipped sample and tiny synthetic files in tmp_path are used (no network, no data
outside the repository); the release's sizes are patched down to match them (40 images).
"""

import hashlib
import importlib.util
import io
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_datamodules_natural import images_of

from datamodules import CelebA
from datamodules import celeba as cb

REPO = Path(__file__).resolve().parents[1]
N = 40
PARTITION_SIZES = {"train": 30, "valid": 5, "test": 5}


@pytest.fixture(autouse=True)
def tiny_release(monkeypatch: pytest.MonkeyPatch) -> None:
    """The release's sizes, patched to those of the synthetic copies (no size warnings)."""
    monkeypatch.setattr(cb, "IMAGES", N)
    monkeypatch.setattr(cb, "OFFICIAL", PARTITION_SIZES)


def coordinate_images(n: int = N) -> np.ndarray:
    """Aligned images uint8 (n, 218, 178, 3) whose red value is the row, green the column and
    blue the image number (1..n): every pixel says where it came from."""
    images = np.empty((n, 218, 178, 3), np.uint8)
    images[..., 0] = np.arange(218)[:, None]
    images[..., 1] = np.arange(178)[None, :]
    images[..., 2] = np.arange(1, n + 1)[:, None, None]
    return images


def names(n: int = N) -> list[str]:
    return [f"{i:06d}.jpg" for i in range(1, n + 1)]


def jpeg(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def decoded(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def official_partition(interleaved: bool = True) -> np.ndarray:
    """0/1/2 per image with the patched official sizes: interleaved, or contiguous in file
    order as in the release (train 000001-162770, valid 162771-182637, test 182638-202599),
    where the splits of a hub copy, joined, are the images in file order."""
    part = np.repeat([0, 1, 2], list(PARTITION_SIZES.values()))
    return np.random.default_rng(7).permutation(part) if interleaved else part


def write_partition(root: Path, part: np.ndarray) -> None:
    lines = [f"{name} {k}" for name, k in zip(names(len(part)), part, strict=True)]
    (root / cb.PARTITION).write_text("\n".join(lines) + "\n")


def save_hf(path: Path, images: np.ndarray, part: np.ndarray | None = None) -> None:
    """A DatasetDict saved with save_to_disk: splits train/valid/test of the official
    partition (each in file order), or one train split of all images; PNG-encoded (lossless)."""
    import datasets

    def split(rows: np.ndarray) -> "datasets.Dataset":
        return datasets.Dataset.from_dict(
            {"image": [Image.fromarray(images[i]) for i in rows], "celeb_id": [0] * len(rows)}
        )

    if part is None:
        data = datasets.DatasetDict({"train": split(np.arange(len(images)))})
    else:
        splits = {name: split(np.flatnonzero(part == k)) for k, name in enumerate(cb.HF_SPLITS)}
        data = datasets.DatasetDict(splits)
    data.save_to_disk(str(path))


def write_source(root: Path, source: str) -> np.ndarray:
    """One layout of the same release in root: the JPEGs of the coordinate images (folder,
    zip), or their decoded pixels, stored losslessly (hf: the official partition as splits;
    npz: with filenames). Returns those pixels: what every layout must give."""
    data = [jpeg(image) for image in coordinate_images()]
    pixels = np.stack([decoded(body) for body in data])
    root.mkdir(parents=True, exist_ok=True)
    if source == "folder":
        (root / cb.FOLDER).mkdir()
        for name, body in zip(names(), data, strict=True):
            (root / cb.FOLDER / name).write_bytes(body)
    elif source == "zip":
        with zipfile.ZipFile(root / cb.ZIP, "w", zipfile.ZIP_DEFLATED) as archive:
            archive.mkdir(cb.FOLDER)
            for name, body in zip(names(), data, strict=True):
                archive.writestr(f"{cb.FOLDER}/{name}", body)
    elif source == "hf":
        save_hf(root / cb.HF_DIR, pixels, official_partition(interleaved=False))
    else:
        np.savez(root / cb.NPZ, images=pixels, filenames=np.array(names()))
    return pixels


def write_npz(root: Path, images: np.ndarray | None = None, **arrays: np.ndarray) -> np.ndarray:
    """celeba.npz of exact (not JPEG-degraded) images, the coordinate images by default."""
    images = coordinate_images() if images is None else images
    root.mkdir(parents=True, exist_ok=True)
    np.savez(root / cb.NPZ, images=images, **arrays)
    return images


def splits_of(dm: CelebA) -> dict[str, np.ndarray]:
    return {name: images_of(getattr(dm, f"{name}_set")) for name in ("train", "val", "test")}


def numbers(images: np.ndarray) -> list[int]:
    """The image numbers (1..N) of cropped coordinate images (their constant blue value)."""
    blue = images[..., 2].reshape(len(images), -1)
    assert (blue == blue[:, :1]).all()
    return blue[:, 0].tolist()


def datamodule(root: Path, **kwargs) -> CelebA:
    dm = CelebA(root=str(root), **{"val_size": 3, "verify": False, **kwargs})
    dm.setup("fit")
    return dm


# ------------------------------------------------------------------ the crop
def test_the_crop_is_rows_50_to_177_and_columns_25_to_152(tmp_path) -> None:
    write_npz(tmp_path)
    dm = datamodule(tmp_path)
    assert (dm.data_shape, dm.data_kind) == ((3, 128, 128), "8bit")
    for images in splits_of(dm).values():
        assert images.shape[1:] == (128, 128, 3)
        assert (images[..., 0] == np.arange(50, 178)[:, None]).all()  # rows 50..177
        assert (images[..., 1] == np.arange(25, 153)[None, :]).all()  # columns 25..152
    x, _ = dm.train_set[0]  # channel-first, row 0 at the top
    assert x[0, 0, 0] == 50 and x[1, 0, 0] == 25 and x[0, 127, 127] == 177 and x[1, 0, 127] == 152


@pytest.mark.parametrize("size", [64, 32, 8])
def test_smaller_sizes_are_exact_block_means_of_the_crop(tmp_path, size) -> None:
    images = write_npz(
        tmp_path, np.random.default_rng(3).integers(0, 256, (N, 218, 178, 3)).astype(np.uint8)
    )
    dm = datamodule(tmp_path, size=size, val_size=0)
    assert dm.data_shape == (3, size, size)
    f = 128 // size
    blocks = images[:, 50:178, 25:153].reshape(N, size, f, size, f, 3).astype(np.float64)
    means = np.floor(blocks.mean(axis=(2, 4)) + 0.5).astype(np.uint8)  # rounded half up
    expected = means[cb.random_split(N)["test"]]
    np.testing.assert_array_equal(images_of(dm.test_set), expected)


# ------------------------------------------------------------------ sources and splits
@pytest.mark.parametrize("source", ["folder", "zip", "hf", "npz"])
def test_every_layout_gives_the_same_random_split(tmp_path, source) -> None:
    """Each layout holds the same pixels; all give identical train/val/test arrays."""
    aligned = write_source(tmp_path, source)
    dm = datamodule(tmp_path)
    crops = aligned[:, 50:178, 25:153]
    rows = cb.random_split(N)
    got = splits_of(dm)
    np.testing.assert_array_equal(got["train"], crops[rows["train"][:-3]])
    np.testing.assert_array_equal(got["val"], crops[rows["train"][-3:]])
    np.testing.assert_array_equal(got["test"], crops[rows["test"]])
    assert isinstance(dm.train_set.images, np.memmap)


def test_the_random_split_is_95_5_disjoint_complete_and_fixed(tmp_path) -> None:
    write_npz(tmp_path / "a")
    first = {k: numbers(v) for k, v in splits_of(datamodule(tmp_path / "a")).items()}
    assert [len(first[k]) for k in ("train", "val", "test")] == [35, 3, 2]  # 38 / 2: 95% / 5%
    every = first["train"] + first["val"] + first["test"]
    assert sorted(every) == list(range(1, N + 1))  # disjoint and complete
    assert first["test"] == sorted(first["test"])  # test in file order; train in random order
    assert first["train"] != sorted(first["train"])
    write_npz(tmp_path / "b")  # built afresh elsewhere: the same split
    again = {k: numbers(v) for k, v in splits_of(datamodule(tmp_path / "b")).items()}
    assert again == first
    for n in (N, 202_599):
        rows = cb.random_split(n)
        assert len(rows["test"]) == round(0.05 * n) and len(rows["train"]) + len(rows["test"]) == n
        assert sorted(np.concatenate(list(rows.values())).tolist()) == list(range(n))
    assert len(cb.random_split(202_599)["test"]) == 10_130


@pytest.mark.parametrize("source", ["folder", "npz", "npz-partition", "hf"])
def test_the_official_partition_is_followed(tmp_path, source) -> None:
    part = official_partition(interleaved=source != "hf")
    if source == "npz-partition":
        aligned = write_npz(tmp_path, partition=part)
    else:  # hf: splits train/valid/test; npz: filenames, looked up in the partition file
        aligned = write_source(tmp_path, source)
    if source in ("folder", "npz"):
        write_partition(tmp_path, part)
    dm = datamodule(tmp_path, partition="official", val_size=1000)  # val_size: ignored
    got = splits_of(dm)
    for k, split in enumerate(("train", "val", "test")):
        np.testing.assert_array_equal(got[split], aligned[part == k][:, 50:178, 25:153])
    assert sorted(p.name for p in tmp_path.glob("*.npy")) == [
        f"celeba_official_128_{split}.npy" for split in ("test", "train", "valid")
    ]


def test_an_hf_copy_with_one_split_serves_the_random_split_only(tmp_path) -> None:
    images = coordinate_images()
    save_hf(tmp_path / cb.HF_DIR, images)  # one train split of all images
    got = splits_of(datamodule(tmp_path))
    assert numbers(got["test"]) == (cb.random_split(N)["test"] + 1).tolist()
    with pytest.raises(ValueError, match="partition='official' needs train, valid"):
        datamodule(tmp_path, partition="official")


# ------------------------------------------------------------------ the caches
def test_the_cache_is_built_once_and_outlives_the_source(tmp_path, monkeypatch) -> None:
    aligned = write_source(tmp_path, "folder")
    built = splits_of(datamodule(tmp_path))
    record = json.loads((tmp_path / "celeba_random_128.json").read_text())
    assert record["source"] == cb.FOLDER and record["fingerprint"]["files"] == N
    assert record["splits"] == {"train": 38, "test": 2} and record["settings"]["split_seed"] == 0
    shutil.rmtree(tmp_path / cb.FOLDER)  # the source is gone: the caches are enough
    monkeypatch.setattr(cb, "write_npy", lambda *a, **k: pytest.fail("the cache was rebuilt"))
    dm = datamodule(tmp_path, val_size=0)
    assert isinstance(dm.train_set.images, np.memmap) and isinstance(dm.test_set.images, np.memmap)
    np.testing.assert_array_equal(images_of(dm.val_set), built["test"])
    np.testing.assert_array_equal(images_of(dm.train_set)[:35], built["train"])
    assert aligned.shape == (N, 218, 178, 3)


def test_a_stale_cache_is_reported(tmp_path, monkeypatch) -> None:
    write_npz(tmp_path)
    datamodule(tmp_path)
    write_npz(tmp_path, coordinate_images(N + 1))  # a different source
    with pytest.raises(ValueError, match="Stale CelebA cache") as error:
        datamodule(tmp_path)
    text = str(error.value)
    assert cb.NPZ in text and "celeba_random_128_train.npy" in text and "Delete" in text
    (tmp_path / cb.NPZ).unlink()  # gone: nothing to compare with, the cache is used
    datamodule(tmp_path)
    monkeypatch.setattr(cb, "SPLIT_SEED", 1)  # built with other settings
    with pytest.raises(ValueError, match="Stale CelebA cache.*split_seed"):
        datamodule(tmp_path)
    cache = tmp_path / "celeba_random_128_train.npy"
    cache.write_bytes(cache.read_bytes()[:-100])  # an interrupted copy
    with pytest.raises(ValueError, match="unreadable .npy") as error:
        datamodule(tmp_path)
    assert str(cache) in str(error.value)


# ------------------------------------------------------------------ checksums
def test_checksums_of_the_zip_and_the_partition_file(tmp_path, monkeypatch) -> None:
    write_source(tmp_path, "zip")
    with pytest.raises(ValueError, match="md5") as error:  # the real md5: this zip is not it
        datamodule(tmp_path, verify=True)
    assert str(tmp_path / cb.ZIP) in str(error.value) and "verify: false" in str(error.value)
    assert not list(tmp_path.glob("*.npy")) and not list(tmp_path.glob(".*"))

    digest = hashlib.md5((tmp_path / cb.ZIP).read_bytes()).hexdigest()
    monkeypatch.setitem(cb.MD5, cb.ZIP, digest)
    write_partition(tmp_path, official_partition())
    with pytest.raises(ValueError, match="md5") as error:
        datamodule(tmp_path, verify=True, partition="official")
    assert str(tmp_path / cb.PARTITION) in str(error.value)
    partition_md5 = hashlib.md5((tmp_path / cb.PARTITION).read_bytes()).hexdigest()
    monkeypatch.setitem(cb.MD5, cb.PARTITION, partition_md5)
    datamodule(tmp_path, verify=True, partition="official")
    record = json.loads((tmp_path / "celeba_official_128.json").read_text())
    assert record["md5"] == digest and record["partition_file"]["name"] == cb.PARTITION


def test_the_published_checksums_are_torchvisions() -> None:
    assert cb.MD5 == {
        "img_align_celeba.zip": "00d2c5bc6d35e252742224ab0c1e8fcb",
        "list_eval_partition.txt": "d32c9cbf5e040fd4025c592c306e6668",
    }


# ------------------------------------------------------------------ errors
def test_missing_files_name_the_folder_and_every_layout(tmp_path) -> None:
    with pytest.raises(FileNotFoundError) as error:
        CelebA(root=str(tmp_path / "empty")).setup("fit")
    text = str(error.value)
    for expected in [str(tmp_path / "empty"), cb.FOLDER + "/", cb.ZIP, cb.HF_DIR, cb.NPZ]:
        assert expected in text
    for expected in [cb.PARTITION, "download: true", cb.HF_REPO, "sample: true", "178x218"]:
        assert expected in text
    (tmp_path / cb.FOLDER).mkdir()  # an empty folder (a failed extraction) comes first
    write_npz(tmp_path)
    with pytest.raises(FileNotFoundError, match="holds no images") as error:
        datamodule(tmp_path)
    assert str(tmp_path / cb.FOLDER) in str(error.value) and cb.ZIP in str(error.value)
    (tmp_path / cb.FOLDER).rmdir()
    with pytest.raises(ValueError, match="no array partition.*nor filenames") as error:
        datamodule(tmp_path, partition="official")  # the npz, which cannot say
    assert str(tmp_path / cb.NPZ) in str(error.value)
    write_source(tmp_path / "official", "folder")
    with pytest.raises(FileNotFoundError) as error:  # official, without the partition file
        datamodule(tmp_path / "official", partition="official")
    assert f"needs {tmp_path / 'official' / cb.PARTITION}" in str(error.value)


@pytest.mark.parametrize("damage", ["truncated", "not an image", "wrong size"])
def test_a_bad_jpeg_names_its_file(tmp_path, damage) -> None:
    write_source(tmp_path, "folder")
    bad = tmp_path / cb.FOLDER / "000007.jpg"
    if damage == "truncated":
        bad.write_bytes(bad.read_bytes()[:300])
        message = "not a readable image"
    elif damage == "not an image":
        bad.write_bytes(b"\xff\xd8 not a JPEG")
        message = "not a readable image"
    else:
        bad.write_bytes(jpeg(np.zeros((200, 200, 3), np.uint8)))
        message = "a 200x200 image, expected 178x218"
    with pytest.raises(ValueError, match=message) as error:
        datamodule(tmp_path)
    assert str(bad) in str(error.value)
    assert not list(tmp_path.glob("*.npy")) and not list(tmp_path.glob(".*part"))


def test_a_bad_zip_or_npz_names_the_file(tmp_path) -> None:
    write_source(tmp_path / "zip", "zip")
    archive = tmp_path / "zip" / cb.ZIP
    archive.write_bytes(archive.read_bytes()[:-200])  # cut short: no central directory
    with pytest.raises(ValueError, match="not a readable zip archive") as error:
        datamodule(tmp_path / "zip")
    assert str(archive) in str(error.value)

    root = tmp_path / "member"
    root.mkdir()
    with zipfile.ZipFile(root / cb.ZIP, "w") as f:
        f.writestr(f"{cb.FOLDER}/000001.jpg", jpeg(coordinate_images(1)[0]))
        f.writestr(f"{cb.FOLDER}/000002.jpg", b"garbage")
    with pytest.raises(ValueError, match="000002.jpg: not a readable image") as error:
        next(cb.ZipSource(root / cb.ZIP, verify=False).chunks(np.arange(2), 32))
    assert str(root / cb.ZIP) in str(error.value)

    write_npz(tmp_path / "npz")
    npz = tmp_path / "npz" / cb.NPZ
    npz.write_bytes(npz.read_bytes()[: npz.stat().st_size // 2])
    with pytest.raises(ValueError, match="cut short") as error:
        datamodule(tmp_path / "npz")
    assert str(npz) in str(error.value)
    np.savez(npz, images=np.zeros((N, 128, 128, 3), np.uint8))  # pre-cropped: not the release
    with pytest.raises(ValueError, match=r"expected uint8 \(N, 218, 178, 3\)"):
        datamodule(tmp_path / "npz")


def test_a_bad_partition_file_is_a_clear_error(tmp_path) -> None:
    write_source(tmp_path, "folder")
    write_partition(tmp_path, official_partition()[:-1])  # the last image is not listed
    with pytest.raises(ValueError, match="does not list 1 of the 40 images.*000040.jpg"):
        datamodule(tmp_path, partition="official")
    (tmp_path / cb.PARTITION).write_text("000001.jpg 3\n")
    with pytest.raises(ValueError, match="line 1 is '000001.jpg 3'") as error:
        datamodule(tmp_path, partition="official")
    assert str(tmp_path / cb.PARTITION) in str(error.value)


def test_options_are_checked_and_odd_sizes_warned(tmp_path, monkeypatch) -> None:
    with pytest.raises(ValueError, match="size must be one of"):
        CelebA(root=str(tmp_path), size=48)
    with pytest.raises(ValueError, match="partition must be"):
        CelebA(root=str(tmp_path), partition="identity")
    with pytest.raises(ValueError, match="root"):
        CelebA()
    write_npz(tmp_path)
    monkeypatch.setattr(cb, "IMAGES", 202_599)
    with pytest.warns(UserWarning, match="40 images, not the 202,599 of the release"):
        datamodule(tmp_path)


# ------------------------------------------------------------------ download (faked)
def test_download_saves_the_hub_copy_and_builds_from_it(tmp_path, monkeypatch) -> None:
    import datasets

    images = coordinate_images()
    save_hf(tmp_path / "hub", images, official_partition(interleaved=False))
    calls = []

    def fake_load_dataset(path, name=None, revision=None, cache_dir=None, **kwargs):
        calls.append((path, name, revision))
        assert Path(cache_dir).parent.parent == tmp_path / "root"  # a temporary folder in root
        return datasets.load_from_disk(str(tmp_path / "hub"))

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    root = tmp_path / "root"
    with pytest.raises(FileNotFoundError, match="download: true"):
        CelebA(root=str(root)).setup("fit")  # off by default
    assert calls == [] and not root.exists()
    got = splits_of(datamodule(root, download=True))
    assert calls == [(cb.HF_REPO, cb.HF_CONFIG, cb.HF_REVISION)]
    assert sorted(p.name for p in root.iterdir() if not p.name.endswith(".npy")) == [
        cb.HF_DIR,
        "celeba_random_128.json",
    ]
    assert numbers(got["test"]) == (cb.random_split(N)["test"] + 1).tolist()

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(RuntimeError, match="could not download flwrlabs/celeba.*no network"):
        CelebA(root=str(tmp_path / "other"), download=True).setup("fit")
    assert not (tmp_path / "other").exists()  # no empty data root left behind


# ------------------------------------------------------------------ the shipped sample
def test_the_shipped_sample_loads_with_its_documented_splits() -> None:
    dm = CelebA(sample=True, batch_size=8)
    dm.setup("fit")
    assert (dm.data_shape, dm.data_kind) == ((3, 128, 128), "8bit")
    splits = splits_of(dm)
    assert {k: len(v) for k, v in splits.items()} == {"train": 24, "val": 4, "test": 4}
    assert splits["train"].std() > 30  # real faces, not a constant
    x, index = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 3, 128, 128) and x.dtype == torch.float32 and index.shape == (8,)
    torch.testing.assert_close(x[0], dm.train_set[int(index[0])][0])
    with np.load(REPO / "datamodules" / "assets" / cb.SAMPLE) as f:
        sources = [f[f"{s}_source_index"].tolist() for s in ("train", "valid", "test")]
    assert sorted(sum(sources, [])) == list(range(32))  # images 000001..000032, disjoint

    small = CelebA(sample=True, size=32)
    small.setup("test")
    assert small.data_shape == (3, 32, 32) and small.test_set[0][0].shape == (3, 32, 32)
    blocks = splits["test"].reshape(4, 32, 4, 32, 4, 3).astype(np.float64)
    expected = np.floor(blocks.mean(axis=(2, 4)) + 0.5)
    np.testing.assert_array_equal(images_of(small.test_set), expected)


def test_flips_mirror_training_images_only(tmp_path) -> None:
    plain, flipped = CelebA(sample=True), CelebA(sample=True, flip=True, seed=1)
    plain.setup("fit")
    flipped.setup("fit")
    base, seen = images_of(plain.train_set), images_of(flipped.train_set)
    mirrored = (seen == base[:, :, ::-1]).all(axis=(1, 2, 3))
    assert ((seen == base).all(axis=(1, 2, 3)) | mirrored).all() and 0 < mirrored.sum() < 24
    np.testing.assert_array_equal(images_of(flipped.test_set), images_of(plain.test_set))


def test_the_sample_script_crops_and_splits_its_source(tmp_path, monkeypatch) -> None:
    spec = importlib.util.spec_from_file_location("make", REPO / "scripts/make_celeba_sample.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    source, out = tmp_path / "source.npz", tmp_path / "sample.npz"
    np.savez(source, test_original=coordinate_images(32), filenames=np.array(names(32)))
    monkeypatch.setattr("sys.argv", ["make", "--source", str(source), "--out", str(out)])
    script.main()
    with np.load(out) as f:
        arrays = {k: f[k] for k in f.files}
    for split, n in {"train": 24, "valid": 4, "test": 4}.items():
        images, index = arrays[split], arrays[f"{split}_source_index"]
        assert images.shape == (n, 128, 128, 3) and index.tolist() == sorted(index.tolist())
        assert (images[..., 0] == np.arange(50, 178)[:, None]).all()
        assert numbers(images) == (index + 1).tolist()  # the right images, cropped
    every = np.concatenate([arrays[f"{s}_source_index"] for s in ("train", "valid", "test")])
    assert sorted(every.tolist()) == list(range(32))
