"""arvae models: one LightningModule per paper on a shared backbone."""

from .base import ImageModel
from .pixelcnn import PixelCNN
from .pixelvae import PixelVAE

__all__ = ["ImageModel", "PixelCNN", "PixelVAE"]
