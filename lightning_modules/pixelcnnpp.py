"""PixelCNN++ (Salimans et al., ICLR 2017) without latents: the exact NLL in bits/dim.

log p(x) = sum_i log p(x_i | x_<i), each pixel a discretized mixture of logistics whose
colours are coupled linearly inside the likelihood (``DiscretizedLogisticMixture``); the
network (``backbone.PixelCNNppNet``) gives one parameter set per pixel from the pixels
before it. The strongest no-latent baseline of the suite (CIFAR-10: 2.92 bits/dim) and the
decoder of the auxiliary-variable PixelCNNs and of AGAVE.
"""

import torch

from .backbone import PixelCNNppNet
from .base import ImageModel
from .likelihoods import DiscretizedLogisticMixture, Likelihood


class PixelCNNpp(ImageModel):
    """PixelCNN++ over 8-bit (or ``bits``-level) images.

    Args:
        nr_resnet: gated ResNet blocks per stage (paper: 5; 6 stages of the up and down pass).
        nr_filters: channels of every stream (paper: 160).
        nr_logistic_mix: mixture components of the default likelihood (paper: 10).
        dropout: dropout in every block (paper: 0.5).
        likelihood: the output distribution; None = ``DiscretizedLogisticMixture`` with
            ``nr_logistic_mix`` components. Any likelihood with one parameter set per pixel
            (``sequential_channels`` False) fits the network: it sees no part of the pixel it
            predicts.
        **kwargs: the shared options of :class:`ImageModel` (the paper: Adam, lr 1e-3,
            lr_decay 0.999995 per step).
    """

    def __init__(
        self,
        nr_resnet: int = 5,
        nr_filters: int = 160,
        nr_logistic_mix: int = 10,
        dropout: float = 0.5,
        likelihood: Likelihood | None = None,
        **kwargs,
    ) -> None:
        kwargs.setdefault("data_kind", "8bit")
        mixture = DiscretizedLogisticMixture(nr_logistic_mix) if likelihood is None else likelihood
        super().__init__(likelihood=mixture, **kwargs)
        if self.likelihood.sequential_channels:
            raise ValueError(
                f"PixelCNN++ gives one parameter set per pixel and sees no channel of it, so"
                f" {self.likelihood!r}, which draws a pixel's channels one after another from"
                " parameters that see the earlier ones, would model them independently. Use"
                " DiscretizedLogisticMixture (or a likelihood with sequential_channels False)."
            )
        c = self.image_shape[0]
        self.net = PixelCNNppNet(
            c, self.likelihood.num_params(c), nr_resnet, nr_filters, dropout=dropout
        )
        # set once the data-dependent init has run; saved in checkpoints so resuming skips it
        self.register_buffer("initialized", torch.tensor(False))

    def params(self, x: torch.Tensor) -> torch.Tensor:
        """Likelihood parameters of every pixel of x (pixel i's from the pixels before i)."""
        return self.net(self.likelihood.network_input(x))

    def elbo_terms(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self.check_input(x)
        return {"recon": -self.likelihood.log_prob(self.params(x), x)}

    def data_dependent_init(self, x: torch.Tensor) -> None:
        self.net.init_from_data(self.likelihood.network_input(x))

    def sample_noise(self, n: int, generator: torch.Generator | None = None):
        return {"x": self.likelihood.noise((n, *self.image_shape), generator)}

    @torch.no_grad()
    def sample(self, n: int, noise: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        x_noise = None if noise is None else noise["x"]
        return self.sample_pixels(n, lambda x, rows: self.params(x), None, x_noise)
