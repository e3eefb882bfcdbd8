"""arvae models: one LightningModule per paper on a shared backbone."""

from .agave import AGAVE
from .auxiliary_pixelcnn import AuxiliaryPixelCNN
from .base import ImageModel
from .hierarchical_pixelvae import HierarchicalPixelVAE
from .pixelcnn import PixelCNN
from .pixelcnnpp import PixelCNNpp
from .pixelvae import PixelVAE
from .vlae import VLAE

__all__ = [
    "AGAVE",
    "AuxiliaryPixelCNN",
    "HierarchicalPixelVAE",
    "ImageModel",
    "PixelCNN",
    "PixelCNNpp",
    "PixelVAE",
    "VLAE",
]
