"""Plain-PyTorch building blocks shared by every model (no Lightning, nothing model-specific)."""

from .autoregressive import sample_autoregressive
from .embedding_net import EmbeddingNet
from .flows import AutoregressiveFlowPrior, IAFPosterior
from .gated_pixelcnn import GatedBlock, GatedHead, GatedPixelCNN, gate
from .init import he_init_, shrink_init_, zero_init_
from .local_pixelcnn import LocalPixelCNN
from .made import MADE, MaskedLinear
from .masked_conv import (
    HorizontalConv2d,
    MaskedConv2d,
    VerticalConv2d,
    causal_mask,
    shift_down,
)
from .mnist_convnets import MNISTDecoder, MNISTEncoder
from .pixel_decoder import (
    PixelDecoder,
    PixelDecoderFactory,
    as_factory,
    built,
    factory_config,
    network_config,
)
from .pixel_embedding import PixelEmbedding
from .pixelcnnpp import PixelCNNppNet
from .plain_pixelcnn import PlainPixelCNN
from .resnet import ResBlock, from_vector, n_halvings, resnet, to_vector
from .sampling_cache import PixelCache, reference_sampling
from .weight_norm import data_dependent_init_, weight_norm_, weight_norm_masked_

__all__ = [
    "AutoregressiveFlowPrior",
    "EmbeddingNet",
    "IAFPosterior",
    "LocalPixelCNN",
    "data_dependent_init_",
    "weight_norm_",
    "MADE",
    "MaskedLinear",
    "GatedBlock",
    "GatedHead",
    "GatedPixelCNN",
    "HorizontalConv2d",
    "MNISTDecoder",
    "MNISTEncoder",
    "MaskedConv2d",
    "PixelCNNppNet",
    "PixelDecoder",
    "as_factory",
    "built",
    "factory_config",
    "network_config",
    "PixelDecoderFactory",
    "PixelEmbedding",
    "PlainPixelCNN",
    "ResBlock",
    "VerticalConv2d",
    "causal_mask",
    "from_vector",
    "gate",
    "he_init_",
    "n_halvings",
    "resnet",
    "to_vector",
    "weight_norm_masked_",
    "zero_init_",
    "PixelCache",
    "reference_sampling",
    "sample_autoregressive",
    "shift_down",
    "shrink_init_",
]
