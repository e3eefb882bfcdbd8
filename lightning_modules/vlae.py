"""Variational Lossy Autoencoder (Chen et al., ICLR 2017) on 28x28 binary images.

A ResNet VAE (weight norm with data-dependent init, ELU, no batch norm) whose decoder
outputs a 4-channel 28x28 map; the map is concatenated with the image and fed to a PixelCNN
that sees only a small window of earlier pixels (appendix A), so local statistics go to the
PixelCNN and only global structure to z: a lossy code. The prior over z is an
autoregressive flow (AF), which the paper shows equals an IAF posterior on the encoder path
but gives a deeper generative path (eqs. 12-14).

Switches for the paper's comparisons: ``prior`` "af" | "gaussian", ``posterior``
"gaussian" | "iaf", ``pixelcnn: null`` (a factorized decoder: Bernoulli per pixel from the
map) and ``latent: false`` (the PixelCNN alone, no latent: Tables 2-4 "Unconditional
Decoder").

KL: analytic for a Gaussian posterior and prior; with a flow on either side a single-sample
estimate log q(z|x) - log p(z) on the same z as the reconstruction term (the ELBO is
unbiased either way, and the IWAE bound uses exact log densities).
"""

from typing import Literal

import torch
from einops import rearrange, repeat
from einops.layers.torch import Rearrange
from torch import nn

from .backbone import (
    AutoregressiveFlowPrior,
    IAFPosterior,
    LocalPixelCNN,
    PixelDecoderFactory,
    data_dependent_init_,
    resnet,
    weight_norm_,
    zero_init_,
)
from .backbone.flows import standard_normal_log_prob
from .base import ImageModel
from .likelihoods import DiagonalGaussian

SIZE = 28  # image size; the ResNet halves it twice, to 7x7
BOTTOM = SIZE // 4


class VLAE(ImageModel):
    """VLAE and its ablations (appendix A sizes are the defaults).

    Args:
        latent_dim: dimension of z (64).
        prior: "af" (autoregressive flow over N(0, I)) or "gaussian".
        posterior: "gaussian" (diagonal q(z|x)) or "iaf" (IAF on it, conditioned on a
            context vector from the encoder).
        pixelcnn: the pixel network by class_path and options (default: the local
            PixelCNN of appendix A, 12 filters, 6 masked 3x3 layers, 4 1x1 blocks, tied;
            see LocalPixelCNN); null = the factorized decoder.
        latent: false = no VAE, the pixel network alone ("Unconditional Decoder").
        width / blocks: channels of the ResNet VAE and residual blocks per resolution
            (28, 14, 7) after each resampling block.
        cond_channels: channels of the decoder map given to the PixelCNN (4).
        flow_steps / flow_hidden / flow_hidden_layers / flow_mean_only: the AF prior or IAF
            posterior: 4 steps of a MADE with two hidden layers of 640 ReLUs, mean-only.
        context_dim: size of the IAF context vector from the encoder.
        weight_norm: weight-normalize the VAE and PixelCNN layers and initialize them from the
            first training batch (Salimans & Kingma 2016). The flows keep their own
            near-identity initialization.
        **kwargs: the shared options of :class:`ImageModel` (VLAE: optimizer "adamax", lr
            2e-3, free_bits 0.01 with free_bits_unit "data_dim", iwae_k 4096).
    """

    def __init__(
        self,
        latent_dim: int = 64,
        prior: Literal["af", "gaussian"] = "af",
        posterior: Literal["gaussian", "iaf"] = "gaussian",
        pixelcnn: PixelDecoderFactory | None = LocalPixelCNN,
        latent: bool = True,
        width: int = 64,
        blocks: int = 2,
        cond_channels: int = 4,
        flow_steps: int = 4,
        flow_hidden: int = 640,
        flow_hidden_layers: int = 2,
        flow_mean_only: bool = True,
        context_dim: int = 64,
        weight_norm: bool = True,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if self.image_shape != (1, SIZE, SIZE) or self.data_kind != "binary":
            raise ValueError(
                f"VLAE models 1x{SIZE}x{SIZE} binary images (appendix A), got"
                f" {self.image_shape} {self.data_kind} data"
            )
        self.latent_dim = latent_dim
        if not latent and pixelcnn is None:
            raise ValueError("latent: false needs a pixelcnn: there would be no model left")
        self.has_latent = latent
        self.latent_shapes = {"z": (latent_dim,)} if self.has_latent else {}
        self.context_dim = context_dim if posterior == "iaf" else 0
        self.encoder = self.decoder = self.prior_flow = self.posterior_flow = None
        self.pixelcnn = None
        skip: list[nn.Module] = []
        if self.has_latent:
            head = zero_init_(nn.Linear(width * BOTTOM**2, 2 * latent_dim + self.context_dim))
            self.encoder = nn.Sequential(
                nn.Conv2d(1, width, 3, padding=1),
                resnet([width] * 3, width, "down", blocks, batch_norm=False),
                nn.ELU(),
                Rearrange("b c h w -> b (c h w)"),
                head,
            )
            out = cond_channels if pixelcnn is not None else 1
            self.decoder = nn.Sequential(
                nn.Linear(latent_dim, width * BOTTOM**2),
                Rearrange("b (c h w) -> b c h w", h=BOTTOM, w=BOTTOM),
                resnet([width] * 3, width, "up", blocks, batch_norm=False),
                nn.ELU(),
                nn.Conv2d(width, out, 3, padding=1),
            )
            flow = dict(steps=flow_steps, hidden=flow_hidden, n_hidden_layers=flow_hidden_layers)
            if prior == "af":
                self.prior_flow = AutoregressiveFlowPrior(
                    latent_dim, mean_only=flow_mean_only, **flow
                )
            if posterior == "iaf":
                self.posterior_flow = IAFPosterior(
                    latent_dim, context_dim, mean_only=flow_mean_only, **flow
                )
            skip = [head, *filter(None, (self.prior_flow, self.posterior_flow))]
        if pixelcnn is not None:
            self.pixelcnn = self.pixel_decoder(
                pixelcnn, cond_map_channels=cond_channels if self.has_latent else 0
            )
        self.weight_norm = weight_norm
        if weight_norm:
            weight_norm_(self, skip=tuple(skip))
        # set once the data-dependent init has run; saved in checkpoints so resuming skips it
        self.register_buffer("initialized", torch.tensor(not weight_norm))

    # ------------------------------------------------------------------ pieces
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean and log-std of the diagonal Gaussian q(y|x) and the IAF context, in float32."""
        out = self.encoder(x).float()
        d = self.latent_dim
        return out[:, :d], out[:, d : 2 * d], out[:, 2 * d :]

    def posterior_sample(
        self, mean: torch.Tensor, log_std: torch.Tensor, context: torch.Tensor, eps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """z ~ q(z|x) from standard-normal eps, and log q(z|x) (exact, flow included)."""
        y = DiagonalGaussian.sample(mean, log_std, eps)
        log_q = DiagonalGaussian.log_prob(mean, log_std, y)
        if self.posterior_flow is None:
            return y, log_q
        z, log_det = self.posterior_flow(y, context)
        return z, log_q - log_det

    def log_prior(self, z: torch.Tensor) -> torch.Tensor:
        """log p(z): the AF prior's change of variables, or log N(z; 0, I)."""
        if self.prior_flow is None:
            return standard_normal_log_prob(z)
        return self.prior_flow.log_prob(z)

    def pixel_params(self, x: torch.Tensor, cond_map: torch.Tensor | None) -> torch.Tensor:
        """Bernoulli logits of every pixel of x given the decoder map (None: unconditional)."""
        if self.pixelcnn is None:
            return cond_map
        return self.pixelcnn(self.likelihood.network_input(x), None, cond_map)

    def log_px_z(self, x: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
        cond_map = None if z is None else self.decoder(z)
        return self.likelihood.log_prob(self.pixel_params(x, cond_map), x)

    # ---------------------------------------------------------------- contract
    def elbo_terms(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self.check_input(x)
        if not self.has_latent:
            return {"recon": -self.log_px_z(x, None)}
        mean, log_std, context = self.encode(x)
        eps = self.randn(x.shape[0], self.latent_dim)
        z, log_q = self.posterior_sample(mean, log_std, context, eps)
        if self.prior_flow is None and self.posterior_flow is None:
            kl = DiagonalGaussian.kl_standard_normal(mean, log_std).sum(1)
        else:
            kl = log_q - self.log_prior(z)
        return {"recon": -self.log_px_z(x, z), "kl/z": kl}

    def posterior_mean(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The mean of the Gaussian q(y|x), through the IAF when there is one: the flow's
        image of the mean, not exactly E_q[z] under a nonlinear flow, but what moves with x."""
        mean, _, context = self.encode(x)
        if self.posterior_flow is None:
            return {"z": mean}
        return {"z": self.posterior_flow(mean, context)[0]}

    def log_weights(self, x: torch.Tensor, q, eps: dict[str, torch.Tensor]) -> torch.Tensor:
        """log p(x|z_s) + log p(z_s) - log q(z_s|x), (B, n): exact log densities, the flows'
        log-determinants included."""
        b, n = eps["z"].shape[:2]
        mean, log_std, context = (repeat(t, "b d -> (b n) d", n=n) for t in q)
        z, log_q = self.posterior_sample(
            mean, log_std, context, rearrange(eps["z"], "b n d -> (b n) d")
        )
        xs = repeat(x, "b c h w -> (b n) c h w", n=n)
        w = self.log_px_z(xs, z) + self.log_prior(z) - log_q
        return rearrange(w, "(b n) -> b n", b=b)

    @torch.no_grad()
    def decode(self, z: torch.Tensor | None, n: int, noise: torch.Tensor | None = None):
        """x ~ p(x|z) (z None: the unconditional PixelCNN), pixel by pixel in a window of
        the PixelCNN's receptive field, or in one pass for the factorized decoder."""
        cond_map = None if z is None else self.decoder(z)
        if self.pixelcnn is None:
            return self.likelihood.sample(cond_map, noise)
        return self.sample_pixels(
            n,
            lambda x, rows: self.pixel_params(
                x, None if cond_map is None else cond_map[:, :, rows]
            ),
            self.pixelcnn.receptive_rows,
            noise,
            cache=lambda x: self.pixelcnn.sampling_cache(
                self.likelihood.network_input, x, None, cond_map
            ),
        )

    def sample_noise(self, n: int, generator: torch.Generator | None = None):
        noise = {"x": self.likelihood.noise((n, *self.image_shape), generator)}
        if self.has_latent:
            noise = {"z": DiagonalGaussian.noise((n, self.latent_dim), generator), **noise}
        return noise

    @torch.no_grad()
    def sample(self, n: int, noise: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """z = f(eps) (the AF prior maps N(0, I) noise; identity for a Gaussian prior), then
        x ~ p(x|z)."""
        noise = self.sample_noise(n) if noise is None else noise
        z = None
        if self.has_latent:
            z = noise["z"].to(self.device)
            z = z if self.prior_flow is None else self.prior_flow(z)
        return self.decode(z, n, noise["x"])

    @torch.no_grad()
    def decompress(self, x: torch.Tensor, generator: torch.Generator | None = None):
        """The lossy code at work (Fig. 1a/2a): z ~ q(z|x), then x' ~ p(x|z). What survives in
        x' is what z encodes; what changes is left to the PixelCNN."""
        self.check_input(x)
        if not self.has_latent:
            raise ValueError("latent: false has no latent code to decompress from")
        eps = DiagonalGaussian.noise((x.shape[0], self.latent_dim), generator).to(self.device)
        z, _ = self.posterior_sample(*self.encode(x), eps)
        noise = self.likelihood.noise(tuple(x.shape), generator)
        return self.decode(z, x.shape[0], noise)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstructions for the sample grids: a decompression (z sampled, not its mean)."""
        return self.decompress(x)

    def data_dependent_init(self, x: torch.Tensor) -> None:
        """Weight-normalized layers initialized from one training batch (see the base)."""
        data_dependent_init_(self, lambda: self.elbo_terms(x))
