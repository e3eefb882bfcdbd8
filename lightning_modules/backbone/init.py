"""He initialization for the ReLU/gated networks of the backbone.

PyTorch's default init (variance 1/(3 fan_in)) shrinks activations by a constant factor per
layer; through the ~10-layer encoder and decoder of PixelVAE that starves the latent path of
gradient and the VAE collapses to its prior early in training. He init (variance
2/fan_in, as the PixelVAE reference code uses) keeps the scale, counting only the taps a
mask leaves visible.
"""

import math

from torch import nn


def he_init_(module: nn.Module) -> nn.Module:
    """Re-initialize every conv / linear layer in place: N(0, 2/fan_in) weights, zero bias;
    a transposed convolution's fan-in counts the terms of one output pixel."""
    for m in module.modules():
        if not isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            continue
        if isinstance(m, nn.ConvTranspose2d):
            # PyTorch takes the output channels x taps as a transposed conv's fan-in; an
            # output pixel sums in_channels x taps / stride^2 terms: 4x smaller weights per
            # stride-2 layer otherwise, and the decoding of z fades to noise
            fan_in = m.in_channels * math.prod(m.kernel_size) / math.prod(m.stride)
            nn.init.normal_(m.weight, std=math.sqrt(2.0 / fan_in))
        else:
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        mask = getattr(m, "mask", None)
        if mask is not None:  # fan_in counts only the visible taps
            visible = max(float(mask.sum()) / mask.shape[0], 1.0)
            m.weight.data.mul_(math.sqrt(mask[0].numel() / visible))
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    return module


def zero_init_(layer: nn.Module) -> nn.Module:
    """Zero weights and bias: an encoder output layer then starts with the posterior equal to
    the prior (KL = 0). Not for likelihood heads: a zero head makes the optimizer inflate the
    decoder's features instead of the head's bias, which saturates the PixelCNN gates."""
    nn.init.zeros_(layer.weight)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


def shrink_init_(layer: nn.Module, factor: float = 1e-2) -> nn.Module:
    """Scale the weights down and zero the bias: a Gaussian head then starts at about N(0, I)
    (mean ~ 0, log-std ~ 0) but, unlike a zero layer, can still be weight-normalized."""
    layer.weight.data.mul_(factor)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer
