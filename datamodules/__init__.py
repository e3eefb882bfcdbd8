"""LightningDataModules, one per dataset family, on a common base (see DESIGN.md "Data")."""

from .base import ImageDataModule
from .binarized_mnist import BinarizedMNIST
from .caltech_silhouettes import CaltechSilhouettes
from .celeba import CelebA
from .cifar10 import CIFAR10
from .imagenet64 import ImageNet64
from .lsun import LSUNBedrooms
from .omniglot import OMNIGLOT

__all__ = [
    "CIFAR10",
    "OMNIGLOT",
    "BinarizedMNIST",
    "CaltechSilhouettes",
    "CelebA",
    "ImageDataModule",
    "ImageNet64",
    "LSUNBedrooms",
]
