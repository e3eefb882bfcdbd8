"""LightningDataModules, one per dataset family, on a common base (see DESIGN.md "Data")."""

from .base import ImageDataModule
from .binarized_mnist import BinarizedMNIST
from .cifar10 import CIFAR10
from .imagenet64 import ImageNet64
from .lsun import LSUNBedrooms

__all__ = ["CIFAR10", "BinarizedMNIST", "ImageDataModule", "ImageNet64", "LSUNBedrooms"]
