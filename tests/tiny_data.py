"""Tiny datamodules for the tests: slices of the samples shipped in the package.

The split sizes are arguments so a test can choose awkward ones, e.g. an odd test set that is
not a multiple of the batch size (where a padding DDP sampler would count examples twice).
A CLI subprocess reaches them as ``--data.class_path tests.tiny_data.TinyBinary`` when the
repository root is on its PYTHONPATH; in-process tests import them from this module.
"""

from einops import rearrange

from datamodules import ImageDataModule
from datamodules.base import IndexedImages
from datamodules.binarized_mnist import channel_first, load_sample
from datamodules.cifar10 import load_sample as load_cifar_sample


class TinyBinary(ImageDataModule):
    """Real 28x28 binary digits, the first ``n_*`` images of each split of the shipped sample.

    Args:
        n_train / n_val / n_test: examples per split (at most 4000 / 1000 / 1000).
        batch_size, eval_batch_size, num_workers, seed: as in :class:`ImageDataModule`.
    """

    data_shape = (1, 28, 28)
    data_kind = "binary"

    def __init__(
        self,
        n_train: int = 64,
        n_val: int = 16,
        n_test: int = 37,
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(None, batch_size, eval_batch_size, num_workers, seed)
        self.save_hyperparameters()  # as the real datamodules: shown in test reports
        self.sizes = {"train": n_train, "valid": n_val, "test": n_test}

    def setup(self, stage: str) -> None:
        splits = load_sample()
        self.train_set, self.val_set, self.test_set = (
            IndexedImages(channel_first(splits[split][:n])) for split, n in self.sizes.items()
        )


class MisdeclaredBinary(TinyBinary):
    """A broken datamodule: declares 2-channel images but yields 1-channel ones. The CLI links
    ``data_shape`` into the model, so the model's input check must catch the mismatch."""

    data_shape = (2, 28, 28)


class TinyColour(ImageDataModule):
    """Real 8-bit RGB images, 8x8 crops (top-left) of the CIFAR-10 sample shipped in the
    package: the natural-image path at a size where autoregressive sampling is instant.

    Args:
        n_train / n_val / n_test: examples per split (at most 400 / 100 / 100).
        batch_size, eval_batch_size, num_workers, seed: as in :class:`ImageDataModule`.
    """

    data_shape = (3, 8, 8)
    data_kind = "8bit"

    def __init__(
        self,
        n_train: int = 32,
        n_val: int = 8,
        n_test: int = 13,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(None, batch_size, eval_batch_size, num_workers, seed)
        self.save_hyperparameters()
        self.sizes = {"train": n_train, "valid": n_val, "test": n_test}

    def setup(self, stage: str) -> None:
        splits = load_cifar_sample()
        self.train_set, self.val_set, self.test_set = (
            IndexedImages(rearrange(splits[split][:n, :8, :8], "n h w c -> n c h w"))
            for split, n in self.sizes.items()
        )
