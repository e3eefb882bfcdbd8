"""LightningDataModules, one per dataset family, on a common base (see DESIGN.md "Data")."""

from .base import ImageDataModule
from .binarized_mnist import BinarizedMNIST

__all__ = ["BinarizedMNIST", "ImageDataModule"]
