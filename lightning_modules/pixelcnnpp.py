"""PixelCNN++ (Salimans et al., ICLR 2017) without latents: the exact NLL in bits/dim.

log p(x) = sum_i log p(x_i | x_<i), each pixel a discretized mixture of logistics whose
colours are coupled linearly inside the likelihood (``DiscretizedLogisticMixture``); the
network (``backbone.PixelCNNppNet``) gives one parameter set per pixel from the pixels
before it. The strongest no-latent baseline of the suite (CIFAR-10: 2.92 bits/dim) and the
decoder of the auxiliary-variable PixelCNNs and of AGAVE.
"""

from .backbone import PixelCNNppNet, PixelDecoderFactory
from .likelihoods import DiscretizedLogisticMixture, Likelihood
from .pixelcnn import PixelCNN


class PixelCNNpp(PixelCNN):
    """:class:`PixelCNN` with the paper's parts as defaults: the PixelCNN++ network (its
    options ``nr_resnet``, ``channels``, ``dropout``) and, for ``likelihood`` None, a
    10-component ``DiscretizedLogisticMixture`` over 8-bit data. The network sees no channel
    of the pixel it predicts, so the likelihood must couple them (``sequential_channels``
    False); the paper's schedule (Adam, lr 1e-3, lr_decay 0.999995 per step) is in
    ``experiments/pixelcnnpp/cifar10.yaml``."""

    def __init__(
        self,
        pixelcnn: PixelDecoderFactory = PixelCNNppNet,
        likelihood: Likelihood | None = None,
        **kwargs,
    ) -> None:
        kwargs.setdefault("data_kind", "8bit")
        likelihood = DiscretizedLogisticMixture() if likelihood is None else likelihood
        super().__init__(pixelcnn=pixelcnn, likelihood=likelihood, **kwargs)
