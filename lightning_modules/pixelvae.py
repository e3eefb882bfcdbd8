"""PixelVAE (Gulrajani et al., ICLR 2017) on 28x28 binary images: appendix E.1.

Conv encoder -> diagonal Gaussian q(z|x) -> decoder. The decoder is a few PixelCNN layers
conditioned on z either through the upsampled feature map of a transposed-conv decoder
("upsample", Table 1 "PixelVAE"/"Gated PixelVAE") or through a linear map of z into every
gate ("vector", "Gated PixelVAE without upsampling"). With ``pixelcnn: null`` it is the
plain convolutional VAE with a factorized Bernoulli output.
"""

from typing import Literal

import torch
from einops import rearrange, repeat
from torch import nn

from .backbone import (
    GatedPixelCNN,
    MNISTDecoder,
    MNISTEncoder,
    PixelDecoderFactory,
    he_init_,
    zero_init_,
)
from .base import ImageModel
from .likelihoods import DiagonalGaussian

Cond = tuple[torch.Tensor | None, torch.Tensor | None]  # (cond_vec, cond_map)


class PixelVAE(ImageModel):
    """Single-level PixelVAE with a standard-normal prior.

    Args:
        latent_dim: dimensionality of z.
        pixelcnn: the pixel network of p(x|z) by class_path and options (default: a gated
            PixelCNN, van den Oord 2016b, of 3 masked layers, 32 channels, filters 7 then 5;
            PlainPixelCNN is 2016a's); null = the factorized decoder.
        conditioning: "upsample" (feature map from transposed convs, added via 1x1 convs)
            or "vector" (z linearly into every gate; no upsampling decoder at all).
        **kwargs: the shared options of :class:`ImageModel` (lr, KL warm-up, free bits, IWAE).
    """

    def __init__(
        self,
        latent_dim: int = 16,
        pixelcnn: PixelDecoderFactory | None = GatedPixelCNN,
        conditioning: Literal["upsample", "vector"] = "upsample",
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if self.image_shape[1:] != (28, 28):
            raise ValueError(f"the appendix E.1 networks need 28x28 images, got {self.image_shape}")
        if conditioning == "vector" and pixelcnn is None:
            raise ValueError(
                'conditioning="vector" needs a pixelcnn: without PixelCNN layers there is'
                ' nothing for z to condition; use conditioning="upsample".'
            )
        c = self.image_shape[0]
        self.latent_dim = latent_dim
        self.latent_shapes = {"z": (latent_dim,)}
        self.conditioning = conditioning
        self.encoder = MNISTEncoder(latent_dim, c)
        self.decoder = MNISTDecoder(latent_dim) if conditioning == "upsample" else None
        cond_map_channels = MNISTDecoder.out_channels if conditioning == "upsample" else 0
        he_init_(self)  # the encoder and decoder; the pixel network initializes itself
        if pixelcnn is None:
            self.pixelcnn = None
            self.factorized_head = he_init_(
                nn.Conv2d(cond_map_channels, self.likelihood.num_params(c), 1)
            )
        else:
            self.pixelcnn = self.pixel_decoder(
                pixelcnn,
                cond_vec_dim=latent_dim if conditioning == "vector" else 0,
                cond_map_channels=cond_map_channels,
                runs_data_init=True,
            )
        zero_init_(self.encoder[-1])

    # ------------------------------------------------------------------ pieces
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-std of q(z|x), each (B, latent_dim), in float32."""
        mean, log_std = self.encoder(x).float().chunk(2, dim=1)
        return mean, log_std

    def condition(self, z: torch.Tensor) -> Cond:
        """What the pixel decoder sees of z: a global vector or an upsampled feature map."""
        if self.decoder is None:
            return z, None
        return None, self.decoder(z)

    def pixel_params(self, x: torch.Tensor, cond: Cond) -> torch.Tensor:
        """Likelihood parameters for every pixel of x given the conditioning."""
        if self.pixelcnn is None:
            return self.factorized_head(cond[1])
        return self.pixelcnn(self.likelihood.network_input(x), *cond)

    def data_dependent_init(self, x: torch.Tensor) -> None:
        """The pixel network's init (PixelCNN++) on x, conditioned on z = the posterior mean."""
        self.pixelcnn.init_from_data(
            self.likelihood.network_input(x), *self.condition(self.encode(x)[0])
        )

    # ---------------------------------------------------------------- contract
    def elbo_terms(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self.check_input(x)
        mean, log_std = self.encode(x)
        z = DiagonalGaussian.sample(mean, log_std, self.randn(x.shape[0], self.latent_dim))
        recon = -self.likelihood.log_prob(self.pixel_params(x, self.condition(z)), x)
        kl = DiagonalGaussian.kl_standard_normal(mean, log_std).sum(1)
        return {"recon": recon, "kl/z": kl}

    def posterior_mean(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"z": self.encode(x)[0]}

    def log_weights(self, x: torch.Tensor, q, eps: dict[str, torch.Tensor]) -> torch.Tensor:
        """log p(x|z_s) + log p(z_s) - log q(z_s|x) for z_s = mean + std * eps_s, (B, n)."""
        mean, log_std = q
        b, n = eps["z"].shape[:2]
        z = rearrange(
            DiagonalGaussian.sample(mean[:, None], log_std[:, None], eps["z"]), "b n d -> (b n) d"
        )
        xs = repeat(x, "b c h w -> (b n) c h w", n=n)
        log_px_z = self.likelihood.log_prob(self.pixel_params(xs, self.condition(z)), xs)
        zeros = torch.zeros_like(z)
        log_pz = DiagonalGaussian.log_prob(zeros, zeros, z)
        means, log_stds = (repeat(t, "b d -> (b n) d", n=n) for t in q)
        log_qz = DiagonalGaussian.log_prob(means, log_stds, z)
        return rearrange(log_px_z + log_pz - log_qz, "(b n) -> b n", b=b)

    @torch.no_grad()
    def decode(self, z: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Sample x ~ p(x|z): pixel by pixel, or in one pass for the factorized decoder."""
        vec, cmap = self.condition(z)
        shape = (z.shape[0], *self.image_shape)
        if self.pixelcnn is None:
            params = self.pixel_params(torch.zeros(shape, device=z.device), (vec, cmap))
            return self.likelihood.sample(params, noise)
        return self.sample_pixels(
            z.shape[0],
            lambda x, rows: self.pixel_params(x, (vec, None if cmap is None else cmap[:, :, rows])),
            self.pixelcnn.receptive_rows,
            noise,
            cache=lambda x: self.pixelcnn.sampling_cache(
                self.likelihood.network_input, x, vec, cmap
            ),
        )

    def sample_noise(self, n: int, generator: torch.Generator | None = None):
        return {
            "z": DiagonalGaussian.noise((n, self.latent_dim), generator),
            "x": self.likelihood.noise((n, *self.image_shape), generator),
        }

    def sample(self, n: int, noise: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        noise = self.sample_noise(n) if noise is None else noise
        return self.decode(noise["z"].to(self.device), noise["x"])

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """x -> z = mean of q(z|x) -> a sample of p(x|z) (appendix C's reconstructions)."""
        self.check_input(x)
        return self.decode(self.encode(x)[0])
