"""Binary datamodules of the VLAE paper: OMNIGLOT (Burda's chardata.mat, dynamic binarization)
and Caltech-101 Silhouettes (Marlin's split 1, static): file layouts, orientation, the object = 1
convention, splits, binarization, downloads and errors.

Synthetic .mat files in tmp_path, in the real layouts, with the split sizes patched down; one
test reads the real Caltech npz in /work/shared/data when it is there (skipped otherwise).
"""

import hashlib
import io
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch

from datamodules import OMNIGLOT, CaltechSilhouettes
from datamodules import caltech_silhouettes as cs
from datamodules import download as dl
from datamodules import omniglot as om

REAL_CALTECH = Path("/work/shared/data/caltech101_silhouettes_28.npz")


def images_of(dataset) -> np.ndarray:
    """A dataset's images as (N, 28, 28), checking the (x, index) contract on the way."""
    out = []
    for i in range(len(dataset)):
        x, index = dataset[i]
        assert index == i and x.dtype == torch.float32 and x.shape == (1, 28, 28)
        out.append(x[0].numpy())
    return np.stack(out)


def matlab_columns(images: np.ndarray) -> np.ndarray:
    """Images (N, 28, 28) -> (784, N), each column one image as MATLAB's img(:) lists it:
    column by column, so pixel (r, c) is element r + 28 c."""
    return np.stack([image.flatten(order="F") for image in images], axis=1)


def check_loader(loader, n: int | None = None) -> None:
    x, index = next(iter(loader))
    assert x.dtype == torch.float32 and x.shape[1:] == (1, 28, 28)
    assert set(x.unique().tolist()) <= {0.0, 1.0} and index.dtype == torch.int64
    if n is not None:
        assert len(x) == n


# ------------------------------------------------------------------ OMNIGLOT
@pytest.fixture
def omni(tmp_path, monkeypatch: pytest.MonkeyPatch) -> dict[str, np.ndarray]:
    """A tiny chardata.mat in tmp_path: 20 training and 6 test grey images (N, 28, 28)."""
    monkeypatch.setattr(om, "SIZES", {"train": 20, "test": 6})
    rng = np.random.default_rng(0)
    grey = {s: rng.random((n, 28, 28)) for s, n in om.SIZES.items()}
    grey["train"][0] = 0.5
    grey["train"][0, 0] = 0  # a black row and a white row: never / always on
    grey["train"][0, 1] = 1
    write_chardata(tmp_path, grey)
    return grey


def cols(grey: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """chardata.mat's variables: (784, N) columns, images in MATLAB's column-major order."""
    return {"data": matlab_columns(grey["train"]), "testdata": matlab_columns(grey["test"])}


def write_chardata(root: Path, grey: dict[str, np.ndarray]) -> None:
    scipy.io.savemat(root / "chardata.mat", cols(grey))


def omniglot(root, **kwargs) -> OMNIGLOT:
    dm = OMNIGLOT(root=str(root), batch_size=4, **{"val_size": 5, "download": False, **kwargs})
    dm.setup("fit")
    return dm


def train_epoch(dm, epoch: int) -> np.ndarray:
    dm.train_set.set_epoch(epoch)
    return images_of(dm.train_set)


def test_omniglot_columns_are_read_upright(tmp_path, omni) -> None:
    images = np.zeros((2, 28, 28))
    images[0, 2, 20] = 1  # one pixel at row 2, column 20: transposed it would be at (20, 2)
    images[1, 3:25, 4:7] = images[1, 22:25, 4:20] = 1  # an "L"
    columns = matlab_columns(images)
    assert columns[2 + 28 * 20, 0] == 1 and columns.sum(0)[0] == 1  # MATLAB's layout
    grey = {"train": omni["train"], "test": np.concatenate([images, omni["test"][2:]])}
    write_chardata(tmp_path, grey)
    test = images_of(omniglot(tmp_path).test_set)  # grey levels 0/1 binarize to themselves
    np.testing.assert_array_equal(test[:2], images)
    assert test[0, 2, 20] == 1 and test[0, 20, 2] == 0


def test_omniglot_splits_follow_iwae(tmp_path, omni) -> None:
    binary = {s: (g > 0.5).astype(float) for s, g in omni.items()}  # deterministic draws
    write_chardata(tmp_path, binary)
    dm = omniglot(tmp_path)
    assert (dm.data_shape, dm.data_kind) == ((1, 28, 28), "binary")
    permuted = binary["train"][np.random.RandomState(123).permutation(20)]
    np.testing.assert_array_equal(train_epoch(dm, 3), permuted[:15])
    np.testing.assert_array_equal(images_of(dm.val_set), permuted[15:])
    np.testing.assert_array_equal(images_of(dm.test_set), binary["test"])

    everything = omniglot(tmp_path, val_size=0)  # train on all, validate on the test set
    np.testing.assert_array_equal(train_epoch(everything, 0), permuted)
    assert everything.val_set is everything.test_set
    with pytest.raises(ValueError, match="leaves none"):
        omniglot(tmp_path, val_size=20)
    with pytest.raises(ValueError, match="val_size"):
        OMNIGLOT(root=str(tmp_path), val_size=-1)


def test_omniglot_dynamic_binarization_per_epoch_fixed_eval(tmp_path, omni) -> None:
    dm = omniglot(tmp_path)
    e0, e1 = train_epoch(dm, 0), train_epoch(dm, 1)
    assert set(np.unique(e0)) == {0.0, 1.0} and (e0 != e1).mean() > 0.2
    np.testing.assert_array_equal(train_epoch(omniglot(tmp_path), 1), e1)  # reproducible
    assert (train_epoch(omniglot(tmp_path, seed=1), 1) != e1).any()
    first = int(np.flatnonzero(np.random.RandomState(123).permutation(20) == 0)[0])
    assert (e0[first, 0] == 0).all() and (e0[first, 1] == 1).all()  # p = 0 and p = 1 rows
    p = omni["train"][np.random.RandomState(123).permutation(20)[:15]]
    assert abs(np.mean([train_epoch(dm, e) for e in range(5)]) - p.mean()) < 0.01

    other = omniglot(tmp_path, seed=7)  # val/test: one fixed draw, whatever the seed
    for split in ("val_set", "test_set"):
        a, b = images_of(getattr(dm, split)), images_of(getattr(other, split))
        np.testing.assert_array_equal(a, b)
        assert set(np.unique(a)) == {0.0, 1.0}

    loader = dm.train_dataloader()  # the sampler passes the epoch on to the dataset
    loader.sampler.set_epoch(4)
    assert dm.train_set.epoch == 4
    check_loader(loader, 4)
    check_loader(dm.val_dataloader())
    assert sorted(torch.cat([i for _, i in dm.test_dataloader()]).tolist()) == list(range(6))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda g: {"data": cols(g)["data"]}, "no variable 'testdata'"),
        (lambda g: {**cols(g), "data": cols(g)["data"][:, :-1]}, r"\(784, 19\), expected"),
        (lambda g: {**cols(g), "data": cols(g)["data"].T}, r"\(20, 784\), expected"),
        (lambda g: {**cols(g), "testdata": 255 * cols(g)["testdata"]}, r"grey levels in \[0, 1\]"),
    ],
)
def test_omniglot_wrong_file_is_a_clear_error(tmp_path, omni, change, message) -> None:
    scipy.io.savemat(tmp_path / "chardata.mat", change(omni))
    with pytest.raises(ValueError, match=message) as error:
        omniglot(tmp_path)
    assert "chardata.mat" in str(error.value) and "delete" in str(error.value)


def test_omniglot_corrupt_file_is_a_clear_error(tmp_path, omni) -> None:
    path = tmp_path / "chardata.mat"
    path.write_bytes(path.read_bytes()[:300])  # an interrupted copy
    with pytest.raises(ValueError, match="unreadable MATLAB file") as error:
        omniglot(tmp_path)
    assert str(path) in str(error.value)


def test_omniglot_missing_file_names_file_url_and_directory(tmp_path) -> None:
    with pytest.raises(FileNotFoundError) as error:
        OMNIGLOT(root=str(tmp_path), download=False).prepare_data()
    text = str(error.value)
    for expected in ["chardata.mat", om.URL, str(tmp_path), "download: true"]:
        assert expected in text


def test_omniglot_download_checks_content_and_falls_back(tmp_path, omni, monkeypatch) -> None:
    served = (tmp_path / "chardata.mat").read_bytes()
    root = tmp_path / "data"
    calls = []

    def fake_fetch(url, dest, timeout=60.0):
        calls.append(url)
        if url == om.URL:  # the first mirror serves an error page
            dest.write_bytes(b"<html>rate limited</html>")
        else:
            dest.write_bytes(served)

    monkeypatch.setattr(dl, "fetch_url", fake_fetch)
    dm = omniglot(root, download=True)
    assert calls == [om.URL, om.ARM_URL] and len(dm.test_set) == 6
    assert sorted(p.name for p in root.iterdir()) == ["chardata.mat"]

    monkeypatch.setattr(dl, "fetch_url", lambda url, dest, timeout=60.0: dest.write_bytes(b"x"))
    with pytest.raises(RuntimeError, match="unreadable MATLAB file") as error:
        OMNIGLOT(root=str(tmp_path / "other")).prepare_data()
    assert om.URL in str(error.value) and str(tmp_path / "other") in str(error.value)
    assert not (tmp_path / "other").exists()  # no empty data root left behind


# ------------------------------------------------------------------ Caltech-101 Silhouettes
TINY = {"train": 5, "valid": 3, "test": 4}


def silhouettes(n: int, rng: np.random.Generator) -> np.ndarray:
    """Object = 1 images: a random rectangle well inside the frame, on background 0."""
    images = np.zeros((n, 28, 28), dtype=np.uint8)
    for image in images:
        top, left = rng.integers(3, 10, 2)
        bottom, right = rng.integers(16, 25, 2)
        image[top:bottom, left:right] = 1
    return images


@pytest.fixture
def caltech(monkeypatch: pytest.MonkeyPatch) -> dict[str, np.ndarray]:
    """Tiny splits in our convention (object 1), the expected sizes patched to match."""
    monkeypatch.setattr(cs, "SIZES", TINY)
    rng = np.random.default_rng(0)
    return {split: silhouettes(n, rng) for split, n in TINY.items()}


def marlin_mat(splits: dict[str, np.ndarray], **extra) -> dict[str, np.ndarray]:
    """Marlin's layout: (N, 784) rows listing each image column by column, background 1."""
    variables = {
        name: matlab_columns(1 - splits[split]).T.astype(np.float64)
        for split, name in cs.VARIABLES.items()
    }
    labels = {  # unused by the loader, present in the real file
        name.replace("data", "labels"): np.ones((len(splits[split]), 1))
        for split, name in cs.VARIABLES.items()
    }
    return {**variables, **labels, "classnames": np.array(["a"], dtype=object), **extra}


def mat_bytes(variables: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    scipy.io.savemat(buffer, variables)
    return buffer.getvalue()


def caltech_dm(root, **kwargs) -> CaltechSilhouettes:
    dm = CaltechSilhouettes(root=str(root), **{"download": False, "batch_size": 2, **kwargs})
    dm.setup("fit")
    return dm


def assert_caltech(dm: CaltechSilhouettes, splits: dict[str, np.ndarray]) -> None:
    assert (dm.data_shape, dm.data_kind) == ((1, 28, 28), "binary")
    for dataset, split in zip((dm.train_set, dm.val_set, dm.test_set), TINY, strict=True):
        np.testing.assert_array_equal(images_of(dataset), splits[split])


def test_caltech_mat_is_read_upright_with_object_one(tmp_path, caltech) -> None:
    ell = np.zeros((28, 28), dtype=np.uint8)
    ell[4:23, 5:9] = ell[19:23, 5:21] = 1  # an "L": transposed, its foot would point down
    caltech["test"][0] = ell
    scipy.io.savemat(tmp_path / cs.MAT, marlin_mat(caltech))
    dm = caltech_dm(tmp_path)
    assert_caltech(dm, caltech)
    test = images_of(dm.test_set)
    assert test[0, 21, 18] == 1 and test[0, 5, 18] == 0  # the foot, bottom right
    assert images_of(dm.train_set).mean() < 0.5  # object 1 on a background 0
    check_loader(dm.train_dataloader(), 2)
    check_loader(dm.test_dataloader())
    assert len(dm.train_dataloader()) == 2  # 5 // 2, last batch dropped


@pytest.mark.parametrize("background", [1, 0])
def test_caltech_npz_in_either_convention(tmp_path, caltech, background) -> None:
    stored = {s: images if background == 0 else 1 - images for s, images in caltech.items()}
    np.savez(tmp_path / cs.NPZ, **stored)
    assert_caltech(caltech_dm(tmp_path), caltech)


def test_caltech_mat_comes_before_npz(tmp_path, caltech) -> None:
    scipy.io.savemat(tmp_path / cs.MAT, marlin_mat(caltech))
    np.savez(tmp_path / cs.NPZ, **{s: images[:, ::-1] for s, images in caltech.items()})
    assert_caltech(caltech_dm(tmp_path), caltech)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda v: {**v, "val_data": v["val_data"][:2]}, r"val_data is shape \(2, 784\)"),
        (lambda v: {k: a for k, a in v.items() if k != "test_data"}, "test_data is missing"),
        (lambda v: {**v, "train_data": 2 * v["train_data"]}, "values must be 0 or 1"),
        (lambda v: {**v, **{n: 1 - v[n] for n in cs.VARIABLES.values()}}, "borders are mostly 0"),
    ],
)
def test_caltech_wrong_mat_is_a_clear_error(tmp_path, caltech, change, message) -> None:
    scipy.io.savemat(tmp_path / cs.MAT, change(marlin_mat(caltech)))
    with pytest.raises(ValueError, match=message) as error:
        caltech_dm(tmp_path)
    assert cs.MAT in str(error.value) and "delete" in str(error.value)


def test_caltech_wrong_npz_is_a_clear_error(tmp_path, caltech) -> None:
    np.savez(tmp_path / cs.NPZ, train=caltech["train"], valid=caltech["valid"])
    with pytest.raises(ValueError, match=r"no arrays \['test'\]"):
        caltech_dm(tmp_path)
    np.savez(tmp_path / cs.NPZ, **{**caltech, "test": caltech["test"].reshape(4, 784)})
    with pytest.raises(ValueError, match=r"test has shape \(4, 784\)"):
        caltech_dm(tmp_path)


def test_caltech_missing_file_names_files_urls_and_directory(tmp_path) -> None:
    with pytest.raises(FileNotFoundError) as error:
        CaltechSilhouettes(root=str(tmp_path), download=False).prepare_data()
    text = str(error.value)
    for expected in [cs.MAT, cs.NPZ, cs.MARLIN_URL, cs.GITHUB_URL, str(tmp_path)]:
        assert expected in text


def test_caltech_download_content_check_then_pinned_mirror(tmp_path, caltech, monkeypatch) -> None:
    served = mat_bytes(marlin_mat(caltech))
    monkeypatch.setattr(cs, "SOURCES", [cs.SOURCES[0], (cs.GITHUB_URL, ("sha256", "0" * 64))])
    calls = []

    def fake_fetch(url, dest, timeout=60.0):
        calls.append(url)
        dest.write_bytes(served if url == cs.GITHUB_URL else served[:2000])  # truncated first

    monkeypatch.setattr(dl, "fetch_url", fake_fetch)
    with pytest.raises(RuntimeError, match="sha256 mismatch") as error:
        CaltechSilhouettes(root=str(tmp_path)).prepare_data()
    assert calls == [cs.MARLIN_URL, cs.GITHUB_URL]
    assert str(tmp_path) in str(error.value) and cs.MARLIN_URL in str(error.value)
    assert list(tmp_path.iterdir()) == []

    digest = hashlib.sha256(served).hexdigest()  # the pinned file's true hash: accepted
    monkeypatch.setattr(cs, "SOURCES", [cs.SOURCES[0], (cs.GITHUB_URL, ("sha256", digest))])
    assert_caltech(caltech_dm(tmp_path, download=True), caltech)
    assert [p.name for p in tmp_path.iterdir()] == [cs.MAT]


def test_caltech_real_npz() -> None:
    if not REAL_CALTECH.exists():
        pytest.skip(f"{REAL_CALTECH} is not here")
    dm = caltech_dm(REAL_CALTECH.parent, batch_size=64)
    sets = (dm.train_set, dm.val_set, dm.test_set)
    assert [len(d) for d in sets] == [4100, 2264, 2307]
    for dataset in sets:
        images = dataset.images.numpy()
        assert 0.3 < images.mean() < 0.5  # the object: 45-46% of the pixels
        assert images[:, :, 0].mean() < 0.1  # the top row: background (0)
    check_loader(dm.train_dataloader(), 64)


def test_caltech_train_on_valid_trains_on_both_and_keeps_the_eval_splits(tmp_path, caltech):
    """VLAE's final-run protocol: tune on valid, then train on train + valid."""
    np.savez(tmp_path / cs.NPZ, **caltech)
    dm = caltech_dm(tmp_path, train_on_valid=True)
    train = np.concatenate([caltech["train"], caltech["valid"]])
    np.testing.assert_array_equal(images_of(dm.train_set), train)
    np.testing.assert_array_equal(images_of(dm.val_set), caltech["valid"])
    np.testing.assert_array_equal(images_of(dm.test_set), caltech["test"])
