"""PixelCNN without latents: the exact-likelihood reference of every comparison.

log p(x) = sum_i log p(x_i | x_<i) with any pixel network of the backbone (``pixelcnn``:
gated by default, plain, VLAE's local one or PixelCNN++) and any likelihood.
"""

import torch

from .backbone import GatedPixelCNN, PixelDecoderFactory
from .base import ImageModel


class PixelCNN(ImageModel):
    """An autoregressive image model with no latent; exact NLL.

    Args:
        pixelcnn: the pixel network (``lightning_modules.backbone.PixelDecoder``) by
            class_path with its options, e.g. GatedPixelCNN (van den Oord 2016b),
            PlainPixelCNN (2016a), PixelCNNppNet.
        **kwargs: the shared options of :class:`ImageModel`.
    """

    def __init__(self, pixelcnn: PixelDecoderFactory = GatedPixelCNN, **kwargs) -> None:
        super().__init__(**kwargs)
        self.net = self.pixel_decoder(pixelcnn, runs_data_init=True)

    def elbo_terms(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self.check_input(x)
        return {"recon": -self.likelihood.log_prob(self.params(x), x)}

    def params(self, x: torch.Tensor) -> torch.Tensor:
        """Likelihood parameters of every pixel of x (causal in x)."""
        return self.net(self.likelihood.network_input(x))

    def data_dependent_init(self, x: torch.Tensor) -> None:
        self.net.init_from_data(self.likelihood.network_input(x))

    def sample_noise(self, n: int, generator: torch.Generator | None = None):
        return {"x": self.likelihood.noise((n, *self.image_shape), generator)}

    @torch.no_grad()
    def sample(self, n: int, noise: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        x_noise = None if noise is None else noise["x"]
        return self.sample_pixels(
            n,
            lambda x, rows: self.params(x),
            self.net.receptive_rows,
            x_noise,
            cache=lambda x: self.net.sampling_cache(self.likelihood.network_input, x),
        )
