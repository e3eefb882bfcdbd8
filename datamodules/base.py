"""The common base of every datamodule: loaders yielding `(x, index)`, correct under DDP.

Validation and test loaders run through each split in one fixed random order
(:func:`eval_order`), so that a limited evaluation is a random sample of the split.

`index` is each example's position in its split: models seed per-example evaluation noise
with it, so metrics do not depend on batch size, order or the number of ranks.
"""

from collections.abc import Callable, Iterator
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset

from .download import Source, download


class IndexedImages(Dataset):
    """Images stored as an integer array (N, C, H, W); yields `(x float32, index)`."""

    def __init__(self, images: np.ndarray | torch.Tensor) -> None:
        self.images = torch.as_tensor(images)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index].float(), index


class EpochSampler(DistributedSampler):
    """Seeded shuffling, sharded over the DDP ranks (one replica without DDP), that also
    passes the epoch to the dataset's `set_epoch` when it has one.

    Lightning calls `set_epoch` on the sampler before every epoch, before the workers are
    started (they are not persistent, so each epoch they receive the dataset with its new
    epoch), and keeps a sampler that is already a DistributedSampler. Per-epoch data noise
    (dynamic binarization) is thus seeded by the true epoch in every worker and rank.
    """

    skip: int = 0
    """Indices of this rank's shard to leave out, once, at the start of the next epoch
    (set when resuming mid-epoch, see :class:`ResumableLoader`)."""

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        if callable(set_dataset_epoch := getattr(self.dataset, "set_epoch", None)):
            set_dataset_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        skip, self.skip = self.skip, 0
        return iter(indices[skip:])


class ResumableLoader(DataLoader):
    """The training loader, resumable mid-epoch: Lightning stores its ``state_dict`` in every
    checkpoint and calls ``load_state_dict`` before it starts iterating a resumed run. The
    state is the epoch and the number of batches the model has consumed in it (read from the
    trainer: the loader itself runs ahead, by the prefetched batches); resuming restores the
    sampler's epoch (the shuffle, and the dataset's per-epoch noise in the workers, which
    start before Lightning sets the epoch) and skips those batches, so a resumed run sees
    the batches, in the order, that the uninterrupted run saw.

    Args (beyond DataLoader's): ``batches_done``: returns the batches consumed this epoch.
    """

    def __init__(self, *args, batches_done: Callable[[], int], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.batches_done = batches_done

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.sampler.epoch, "batches_done": int(self.batches_done())}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, done = state["epoch"], state["batches_done"]
        if done >= len(self):  # saved at the end of an epoch: the next one starts afresh
            epoch, done = epoch + 1, 0
        self.sampler.set_epoch(epoch)
        self.sampler.skip = done * self.batch_size


EVAL_ORDER_SEED = 0


def eval_order(dataset: Dataset) -> Subset:
    """The split in one fixed random order, the same for every run, model and seed.

    The files are not in random order (binarized MNIST's test set is sorted by class), so
    the first n examples, which ``limit_val_batches`` / ``limit_test_batches`` evaluate,
    would be a biased subset; in this order every prefix is a random sample of the split,
    nested in the longer ones. Examples keep their index, and with it their evaluation
    noise, so a full pass gives the same metrics in any order.
    """
    order = np.random.default_rng(EVAL_ORDER_SEED).permutation(len(dataset))
    return Subset(dataset, order.tolist())


def world() -> tuple[int, int]:
    """(world size, rank) of the initialized process group, else (1, 0)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class ImageDataModule(L.LightningDataModule):
    """Base of every dataset family. Subclasses set `data_shape` and `data_kind` and
    implement `setup(stage)` to fill `train_set`, `val_set` and `test_set`, datasets that
    yield `(x, index)`: x float32 (C, H, W), index the example's position in its split.

    Args:
        root: directory holding the dataset files (downloaded there when missing).
        batch_size: training batch size per device.
        eval_batch_size: validation/test batch size per device; defaults to `batch_size`.
        num_workers: DataLoader worker processes.
        seed: seed of the training order and of per-epoch data noise (dynamic binarization).
    """

    data_shape: tuple[int, int, int]
    """(C, H, W) of one example."""
    data_kind: str
    """Either "binary" (values 0/1) or "8bit" (values 0..255)."""

    train_set: Dataset
    val_set: Dataset
    test_set: Dataset
    labels: dict[str, np.ndarray] = {}
    """Class label of every example of a split ("train", "valid", "test"), by its index,
    for the datasets that come with them (8-bit MNIST); empty otherwise."""

    def __init__(
        self,
        root: str | None = None,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.root = root
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.seed = seed

    download: bool = True
    """Fetch missing files from the public mirrors (subclasses take it as an argument)."""

    def _help(self) -> str:
        """What files the dataset expects where, and where to get them (for error messages)."""
        return ""

    def fetch(
        self, path: Path, sources: list[Source], validate: Callable[[Path], object] | None = None
    ) -> None:
        """Download ``path`` from its mirrors unless it exists (checksum / ``validate`` checked
        by :func:`download`); with download off, or when every mirror fails, a clear error
        that ends with :meth:`_help`."""
        if path.exists():
            return
        if not self.download:
            raise FileNotFoundError(f"{path.name} is missing and download is off. {self._help()}")
        try:
            download(sources, path, validate)
        except RuntimeError as e:
            raise RuntimeError(f"{e}\n{self._help()}") from e

    def train_dataloader(self) -> DataLoader:
        """Shuffled, reproducible from `seed` and the epoch, incomplete last batch dropped."""
        size, rank = world()
        sampler = EpochSampler(
            self.train_set, num_replicas=size, rank=rank, shuffle=True, seed=self.seed
        )
        return ResumableLoader(
            self.train_set,
            **self._loader_options(self.batch_size, sampler, drop_last=True),
            batches_done=self._batches_done,
        )

    def _batches_done(self) -> int:
        """Training batches the trainer has run in the current epoch."""
        return self.trainer.fit_loop.epoch_loop.batch_progress.current.processed

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.test_set)

    def _eval_loader(self, dataset: Dataset) -> DataLoader:
        """In :func:`eval_order`; under DDP each example goes to exactly one rank (no padding
        duplicates, which would count twice in the metrics)."""
        dataset = eval_order(dataset)
        size, rank = world()
        sampler = None
        if size > 1:
            sampler = UnrepeatedDistributedSampler(
                dataset, num_replicas=size, rank=rank, shuffle=False
            )
        return self._loader(dataset, self.eval_batch_size, sampler, drop_last=False)

    def _loader(
        self, dataset: Dataset, batch_size: int, sampler: Sampler | None, drop_last: bool
    ) -> DataLoader:
        return DataLoader(dataset, **self._loader_options(batch_size, sampler, drop_last))

    def _loader_options(self, batch_size: int, sampler: Sampler | None, drop_last: bool) -> dict:
        return dict(
            batch_size=batch_size,
            sampler=sampler,
            drop_last=drop_last,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
        )
