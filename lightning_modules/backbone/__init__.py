"""Plain-PyTorch building blocks shared by every model (no Lightning, nothing model-specific)."""

from .autoregressive import sample_autoregressive
from .gated_pixelcnn import GatedBlock, GatedHead, GatedPixelCNN, gate
from .init import he_init_, zero_init_
from .masked_conv import HorizontalConv2d, MaskedConv2d, VerticalConv2d, causal_mask, shift_down
from .mnist_convnets import MNISTDecoder, MNISTEncoder
from .plain_pixelcnn import PlainPixelCNN

__all__ = [
    "GatedBlock",
    "GatedHead",
    "GatedPixelCNN",
    "HorizontalConv2d",
    "MNISTDecoder",
    "MNISTEncoder",
    "MaskedConv2d",
    "PlainPixelCNN",
    "VerticalConv2d",
    "causal_mask",
    "gate",
    "he_init_",
    "zero_init_",
    "sample_autoregressive",
    "shift_down",
]
