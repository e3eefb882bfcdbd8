"""Datamodules: the shipped sample, file formats, downloads, dynamic binarization, DDP eval.

Only the shipped sample and tiny synthetic files in tmp_path are used (no network, no data
outside the repository); the split sizes are patched down so that tiny files are accepted.
"""

import gzip
import hashlib
import struct

import lightning as L
import numpy as np
import pytest
import scipy.io
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

from datamodules import BinarizedMNIST, ImageDataModule
from datamodules import binarized_mnist as bm
from datamodules import download as dl
from datamodules.base import IndexedImages

TINY = {"train": 6, "valid": 3, "test": 4}


@pytest.fixture
def tiny(monkeypatch: pytest.MonkeyPatch) -> dict[str, np.ndarray]:
    """Tiny static splits (the expected sizes patched to match), as (N, 784) uint8 0/1."""
    monkeypatch.setattr(bm, "STATIC_SIZES", TINY)
    rng = np.random.default_rng(0)
    return {split: rng.integers(0, 2, (n, 784), dtype=np.uint8) for split, n in TINY.items()}


def amat_bytes(images: np.ndarray, newline: str = "\n") -> bytes:
    return "".join(" ".join(map(str, row)) + newline for row in images).encode()


def write_amat(root, splits: dict[str, np.ndarray]) -> None:
    for split, images in splits.items():
        (root / bm.AMAT.format(split=split)).write_bytes(amat_bytes(images))


def images_of(dataset) -> np.ndarray:
    return np.stack([dataset[i][0].numpy() for i in range(len(dataset))])


def assert_same(dm: BinarizedMNIST, splits: dict[str, np.ndarray]) -> None:
    for dataset, split in zip((dm.train_set, dm.val_set, dm.test_set), TINY, strict=True):
        np.testing.assert_array_equal(images_of(dataset).reshape(-1, 784), splits[split])


# ------------------------------------------------------------------ the shipped sample
def test_sample_loads_with_splits_and_indexed_binary_batches() -> None:
    dm = BinarizedMNIST(sample=True, batch_size=32, eval_batch_size=100)
    dm.setup("fit")
    assert (dm.data_shape, dm.data_kind) == ((1, 28, 28), "binary")
    assert [len(d) for d in (dm.train_set, dm.val_set, dm.test_set)] == [4000, 1000, 1000]

    x, index = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 1, 28, 28) and x.dtype == torch.float32
    assert set(x.unique().tolist()) == {0.0, 1.0}
    assert index.dtype == torch.int64 and index.shape == (32,)
    torch.testing.assert_close(x[0], dm.train_set[int(index[0])][0])
    assert len(dm.train_dataloader()) == 4000 // 32  # drop_last

    batches = list(dm.test_dataloader())
    order = torch.cat([i for _, i in batches]).tolist()
    assert sorted(order) == list(range(1000)) and order != list(range(1000))  # eval_order
    assert 0.10 < torch.cat([x for x, _ in batches]).mean() < 0.16  # MNIST: ~13% ones
    for x, index in batches[:3]:  # every example carries its index in the file
        torch.testing.assert_close(x, torch.stack([dm.test_set[int(i)][0] for i in index]))


def test_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="statically binarized"):
        BinarizedMNIST(sample=True, binarization="dynamic")
    with pytest.raises(ValueError, match="root"):
        BinarizedMNIST()


# ------------------------------------------------------------------ static: files in root
def test_amat_files_are_parsed_and_cached(tmp_path, tiny) -> None:
    write_amat(tmp_path, tiny)
    dm = BinarizedMNIST(root=str(tmp_path), download=False)
    dm.prepare_data()
    assert (tmp_path / "binarized_mnist.npz").exists()
    dm.setup("fit")
    assert_same(dm, tiny)

    for split in TINY:  # the cache alone is now enough
        (tmp_path / bm.AMAT.format(split=split)).unlink()
    dm = BinarizedMNIST(root=str(tmp_path), download=False)
    dm.setup("test")
    assert_same(dm, tiny)


def test_amat_text_variants_and_matlab_copy(tmp_path, tiny) -> None:
    path = tmp_path / "x.amat"
    path.write_bytes(amat_bytes(tiny["train"], newline=" \r\n") + b"\n")  # CRLF, blank line
    np.testing.assert_array_equal(bm.read_amat(path, 6).reshape(6, 784), tiny["train"])
    scipy.io.savemat(path, {"X": tiny["train"]})  # the ARM-gradient mirror's format
    np.testing.assert_array_equal(bm.read_amat(path, 6).reshape(6, 784), tiny["train"])


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda text: text[2:], "line 1 has 783 values"),
        (lambda text: text[: text.index(b"\n") + 1], "1 lines, expected 6"),
        (lambda text: b"2" + text[1:], "single 0 or 1"),
        (lambda text: text[:-300], "has .* values"),  # an interrupted download
        (lambda text: b"", "0 lines, expected 6"),
    ],
)
def test_corrupt_amat_is_a_clear_error(tmp_path, tiny, corrupt, message) -> None:
    write_amat(tmp_path, tiny)
    path = tmp_path / "binarized_mnist_train.amat"
    path.write_bytes(corrupt(path.read_bytes()))
    dm = BinarizedMNIST(root=str(tmp_path), download=False)
    with pytest.raises(ValueError, match=message) as error:
        dm.setup("fit")
    assert str(path) in str(error.value) and "delete" in str(error.value)


@pytest.mark.parametrize(
    ("change", "message"),
    [(lambda a: a[:, :700], r"shape \(6, 700\)"), (lambda a: a * 2, "values must be 0 or 1")],
)
def test_wrong_npz_is_a_clear_error(tmp_path, tiny, change, message) -> None:
    np.savez(tmp_path / "binarized_mnist.npz", **{**tiny, "train": change(tiny["train"])})
    with pytest.raises(ValueError, match=message) as error:
        BinarizedMNIST(root=str(tmp_path)).setup("fit")
    assert "binarized_mnist.npz" in str(error.value)


def cut_in_half(path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def garble_member(path) -> None:
    """The archive's directory intact, a byte of the first member's data flipped."""
    data = bytearray(path.read_bytes())
    data[200] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda p: p.write_bytes(np.random.default_rng(0).bytes(5000)), "not an .npz"),
        (cut_in_half, "not an .npz"),
        (garble_member, "damaged archive member"),
    ],
    ids=["random bytes", "truncated", "damaged member"],
)
def test_corrupt_npz_names_the_file_and_the_fix(tmp_path, tiny, corrupt, message) -> None:
    """Never numpy's pickle hint (an unsafe fix) or zipfile's bare "File is not a zip file"."""
    path = tmp_path / "binarized_mnist.npz"
    np.savez(path, **tiny)
    corrupt(path)
    with pytest.raises(ValueError, match=message) as error:
        BinarizedMNIST(root=str(tmp_path)).setup("fit")
    text = str(error.value)
    assert str(path) in text and "delete or replace it" in text and "pickle" not in text


def test_missing_files_without_download_name_the_directory_and_files(tmp_path) -> None:
    dm = BinarizedMNIST(root=str(tmp_path), download=False)
    with pytest.raises(FileNotFoundError) as error:
        dm.prepare_data()
    text = str(error.value)
    for expected in [str(tmp_path), "binarized_mnist.npz", "sample: true", bm.LAROCHELLE_URL[:40]]:
        assert expected in text
    for split in TINY:
        assert bm.AMAT.format(split=split) in text


# ------------------------------------------------------------------ downloads
@pytest.mark.parametrize("failure", ["network", "truncated"])
def test_download_falls_back_to_the_next_mirror(tmp_path, tiny, monkeypatch, failure) -> None:
    split_of = {m.format(split=s): s for m in bm.STATIC_MIRRORS for s in TINY}
    for split, images in tiny.items():  # the second mirror has hashes: pin those of the fakes
        digest = hashlib.sha256(amat_bytes(images)).hexdigest()
        monkeypatch.setitem(bm.SHA256, (bm.ARM_URL, split), digest)
    calls = []

    def fake_fetch(url, dest, timeout=60.0):
        calls.append(url)
        data = amat_bytes(tiny[split_of[url]])
        if url.startswith("http://www.cs.toronto.edu/"):
            if failure == "network":
                raise OSError("HTTP Error 404: Not Found")
            data = data[:-50]
        dest.write_bytes(data)

    monkeypatch.setattr(dl, "fetch_url", fake_fetch)
    dm = BinarizedMNIST(root=str(tmp_path))
    dm.prepare_data()
    dm.setup("fit")
    assert_same(dm, tiny)
    assert calls == [m.format(split=s) for s in TINY for m in bm.STATIC_MIRRORS]
    assert not list(tmp_path.glob(".*part"))


def test_a_failed_download_leaves_no_empty_data_root(tmp_path) -> None:
    dest = tmp_path / "data" / "mnist" / "binarized_mnist.npz"
    with pytest.raises(RuntimeError, match="could not download binarized_mnist.npz"):
        dl.download([((tmp_path / "nowhere.npz").as_uri(), None)], dest)
    assert not (tmp_path / "data").exists()


def test_checksum_mismatch_is_an_error_and_leaves_no_file(tmp_path, tiny, monkeypatch) -> None:
    for key in bm.SHA256:
        monkeypatch.setitem(bm.SHA256, key, "0" * 64)
    monkeypatch.setattr(dl, "fetch_url", lambda url, dest, timeout=60.0: dest.write_bytes(b"x"))
    with pytest.raises(RuntimeError, match="sha256 mismatch") as error:
        BinarizedMNIST(root=str(tmp_path)).prepare_data()
    assert str(tmp_path) in str(error.value) and "sample: true" in str(error.value)
    assert list(tmp_path.iterdir()) == []


def test_download_with_real_fetch_from_file_urls(tmp_path) -> None:
    source = tmp_path / "served.bin"
    source.write_bytes(b"payload")
    md5 = hashlib.md5(b"payload").hexdigest()
    dest = tmp_path / "out" / "file.bin"
    missing = (tmp_path / "missing.bin").as_uri()
    dl.download([(missing, None), (source.as_uri(), ("md5", md5))], dest)
    assert dest.read_bytes() == b"payload"
    assert [p.name for p in dest.parent.iterdir()] == ["file.bin"]


# ------------------------------------------------------------------ dynamic binarization
def idx_gz(images: np.ndarray) -> bytes:
    return gzip.compress(struct.pack(">4i", 2051, len(images), 28, 28) + images.tobytes())


@pytest.fixture
def grey(tmp_path, monkeypatch: pytest.MonkeyPatch) -> dict[str, np.ndarray]:
    """Tiny grey MNIST in tmp_path/mnist.npz: 12 train (the last 4 = valid), 5 test."""
    monkeypatch.setattr(bm, "MNIST_SIZES", {"train": 12, "test": 5})
    monkeypatch.setattr(bm, "MNIST_VALID", 4)
    rng = np.random.default_rng(1)
    splits = {
        s: rng.integers(0, 256, (n, 28, 28), dtype=np.uint8) for s, n in bm.MNIST_SIZES.items()
    }
    splits["train"][0, 0] = 0  # a black row and a white row: never / always on
    splits["train"][0, 1] = 255
    np.savez(tmp_path / "mnist.npz", **splits)
    return splits


def dynamic(root, seed: int = 0, **kwargs) -> BinarizedMNIST:
    dm = BinarizedMNIST(root=str(root), binarization="dynamic", seed=seed, batch_size=4, **kwargs)
    dm.setup("fit")
    return dm


def train_epoch(dm: BinarizedMNIST, epoch: int) -> np.ndarray:
    dm.train_set.set_epoch(epoch)
    return images_of(dm.train_set)


def test_dynamic_binarization_differs_per_epoch_and_is_reproducible(tmp_path, grey) -> None:
    dm = dynamic(tmp_path)
    assert [len(d) for d in (dm.train_set, dm.val_set, dm.test_set)] == [8, 4, 5]
    e0, e1 = train_epoch(dm, 0), train_epoch(dm, 1)
    assert set(np.unique(e0)) == {0.0, 1.0} and (e0 != e1).mean() > 0.2
    np.testing.assert_array_equal(train_epoch(dynamic(tmp_path), 1), e1)
    assert (train_epoch(dynamic(tmp_path, seed=1), 1) != e1).any()
    assert (e0[0, 0, 0] == 0).all() and (e0[0, 0, 1] == 1).all()
    p = grey["train"][:8] / 255  # Bernoulli(grey / 255): means agree over 8 x 784 pixels
    assert abs(np.mean([train_epoch(dm, e) for e in range(5)]) - p.mean()) < 0.01


def test_dynamic_mnist_labels_follow_the_splits(tmp_path, grey) -> None:
    """mnist.npz with train_labels / test_labels: labels by split, valid the last training
    ones (as its images); without them none; out-of-range ones are a clear error."""
    dm = BinarizedMNIST(root=str(tmp_path), binarization="dynamic")
    dm.setup("test")
    assert dm.labels == {}
    train, test = np.arange(12, dtype=np.uint8) % 10, np.arange(5, dtype=np.uint8)
    np.savez(tmp_path / "mnist.npz", **grey, train_labels=train, test_labels=test)
    dm.setup("test")
    assert {k: v.tolist() for k, v in dm.labels.items()} == {
        "train": train[:8].tolist(), "valid": train[8:].tolist(), "test": test.tolist()
    }  # fmt: skip
    np.savez(tmp_path / "mnist.npz", **grey, train_labels=train + 5, test_labels=test)
    with pytest.raises(ValueError, match="train_labels is uint8 \\(12,\\): not \\(12,\\) 0..9"):
        dm.setup("test")


def test_dynamic_val_and_test_are_fixed_across_seeds(tmp_path, grey) -> None:
    a, b = dynamic(tmp_path, seed=0), dynamic(tmp_path, seed=7)
    for split in ("val_set", "test_set"):
        np.testing.assert_array_equal(images_of(getattr(a, split)), images_of(getattr(b, split)))
    assert set(np.unique(images_of(a.test_set))) == {0.0, 1.0}


def test_dynamic_from_idx_files_and_their_download(tmp_path, grey, monkeypatch) -> None:
    (tmp_path / "mnist.npz").unlink()
    served = {name: idx_gz(grey[split]) for split, name in bm.IDX.items()}
    for name, data in served.items():
        monkeypatch.setitem(bm.MD5, name, hashlib.md5(data).hexdigest())
    monkeypatch.setattr(
        dl,
        "fetch_url",
        lambda url, dest, timeout=60.0: dest.write_bytes(served[url.rsplit("/", 1)[1]]),
    )
    dm = BinarizedMNIST(root=str(tmp_path), binarization="dynamic")
    dm.prepare_data()
    dm.setup("fit")
    np.testing.assert_array_equal(images_of(dm.test_set), images_of(dynamic(tmp_path).test_set))
    (tmp_path / bm.IDX["test"]).write_bytes(served[bm.IDX["test"]][:-10])
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.gz"):
        dm.setup("fit")


class Recorder(L.LightningModule):
    """Records every training example seen, per epoch."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.seen: dict[tuple[int, int], torch.Tensor] = {}

    def training_step(self, batch, batch_idx):
        x, index = batch
        for image, i in zip(x, index.tolist(), strict=True):
            self.seen[self.current_epoch, i] = image
        return self.weight * x.mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_dynamic_epochs_reach_workers_under_the_trainer(tmp_path, grey) -> None:
    dm = dynamic(tmp_path, num_workers=2)
    model = Recorder()
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(model, datamodule=dm)
    assert len(model.seen) == 2 * 8
    reference = dynamic(tmp_path)
    for epoch in (0, 1):
        expected = train_epoch(reference, epoch)
        for i in range(8):
            np.testing.assert_array_equal(model.seen[epoch, i].numpy(), expected[i])
    assert any((model.seen[0, i] != model.seen[1, i]).any() for i in range(8))


# ------------------------------------------------------------------ the base under DDP
class Tiny(ImageDataModule):
    data_shape = (1, 2, 2)
    data_kind = "binary"

    def setup(self, stage: str) -> None:
        images = torch.zeros(7, 1, 2, 2, dtype=torch.uint8)
        self.train_set = self.val_set = self.test_set = IndexedImages(images)


class SortedByClass(ImageDataModule):
    """A split sorted by class, as binarized MNIST's test file is: 100 zeros, 100 ones."""

    data_shape = (1, 2, 2)
    data_kind = "binary"

    def setup(self, stage: str) -> None:
        images = torch.zeros(200, 1, 2, 2, dtype=torch.uint8)
        images[100:] = 1
        self.train_set = self.val_set = self.test_set = IndexedImages(images)


def test_limited_evaluation_is_a_random_sample_of_a_sorted_split() -> None:
    """What limit_val_batches / limit_test_batches evaluate, the loaders' first batches, is a
    random sample of the split (not its first class), the same in every datamodule."""
    dm, again = SortedByClass(eval_batch_size=20), SortedByClass(eval_batch_size=50)
    dm.setup("test")
    again.setup("test")
    for loader in (dm.val_dataloader(), dm.test_dataloader()):
        first, _ = next(iter(loader))
        assert 5 <= int(first.amax(dim=(1, 2, 3)).sum()) <= 15, "a prefix holds both classes"
    prefix = [i for _, index in dm.test_dataloader() for i in index.tolist()][:50]
    assert next(iter(again.test_dataloader()))[1].tolist() == prefix  # one fixed order


def test_eval_loaders_partition_the_set_across_ranks(monkeypatch) -> None:
    monkeypatch.setattr(torch.distributed, "is_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    dm = Tiny(batch_size=2, eval_batch_size=3)
    dm.setup("fit")
    per_rank = []
    for rank in (0, 1):
        monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None, rank=rank: rank)
        for loader in (dm.val_dataloader(), dm.test_dataloader()):
            assert isinstance(loader.sampler, UnrepeatedDistributedSampler)
        per_rank.append([i for _, index in dm.test_dataloader() for i in index.tolist()])
    assert sorted(per_rank[0] + per_rank[1]) == list(range(7))  # no duplicate, none missing
    assert dm.train_dataloader().sampler.num_replicas == 2


def test_train_order_is_seeded() -> None:
    def order(seed: int, epoch: int) -> list[int]:
        dm = Tiny(batch_size=2, seed=seed)
        dm.setup("fit")
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)
        return [i for _, index in loader for i in index.tolist()]

    assert order(0, 0) == order(0, 0) and len(order(0, 0)) == 6  # 7 // 2 batches of 2
    assert order(0, 0) != order(0, 1) and order(0, 0) != order(1, 0)


def test_train_on_valid_trains_on_both_static_and_dynamic(tmp_path, grey) -> None:
    """The final-run protocol of VLAE: train + valid for training, the eval splits unchanged."""
    sample = BinarizedMNIST(sample=True, train_on_valid=True)
    sample.setup("fit")
    both = np.concatenate([images_of(sample.train_set)[:4000][-1:], images_of(sample.val_set)])
    assert len(sample.train_set) == 5000 and len(sample.val_set) == 1000
    np.testing.assert_array_equal(images_of(sample.train_set)[-1001:], both)
    dm = dynamic(tmp_path, train_on_valid=True)
    assert [len(d) for d in (dm.train_set, dm.val_set, dm.test_set)] == [12, 4, 5]
    ones = train_epoch(dm, 0)[0, 0]
    assert (ones[0] == 0).all() and (ones[1] == 1).all()  # the same images, in file order
