"""PixelCNN without latents: the exact-likelihood reference of every comparison."""

from typing import Literal

import torch

from .backbone import GatedPixelCNN, PlainPixelCNN, he_init_
from .base import ImageModel

PIXELCNNS = {"gated": GatedPixelCNN, "plain": PlainPixelCNN}


class PixelCNN(ImageModel):
    """Gated (van den Oord 2016b) or plain (2016a) PixelCNN; exact NLL, no latent.

    Args:
        n_layers: masked layers (the first k_first x k_first with mask A).
        channels: feature channels of every masked layer.
        first_kernel / kernel: filter sizes of the first and of later masked layers.
        kind: "gated" or "plain".
        **kwargs: the shared options of :class:`ImageModel`.
    """

    def __init__(
        self,
        n_layers: int = 12,
        channels: int = 32,
        first_kernel: int = 7,
        kernel: int = 5,
        kind: Literal["gated", "plain"] = "gated",
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        c = self.image_shape[0]
        self.net = PIXELCNNS[kind](
            c, c * self.likelihood.params_per_channel, n_layers, channels, first_kernel, kernel, c
        )
        he_init_(self)

    def elbo_terms(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self.check_input(x)
        return {"recon": -self.likelihood.log_prob(self.params(x), x)}

    def params(self, x: torch.Tensor) -> torch.Tensor:
        """Likelihood parameters of every pixel of x (causal in x)."""
        return self.net(self.likelihood.network_input(x))

    def sample_noise(self, n: int, generator: torch.Generator | None = None):
        return {"x": self.likelihood.noise((n, *self.image_shape), generator)}

    @torch.no_grad()
    def sample(self, n: int, noise: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        x_noise = None if noise is None else noise["x"]
        return self.sample_pixels(
            n, lambda x, rows: self.params(x), self.net.receptive_rows, x_noise
        )
