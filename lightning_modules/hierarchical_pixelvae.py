"""Hierarchical PixelVAE (Gulrajani et al., ICLR 2017, §3.1, §4.2-4.3, appendix E.2).

L latent levels z_1 (bottom) .. z_L (top), each a (C_i, S_i, S_i) map; S_L = 1 makes the
top a vector (the paper's 1x1 level).

- Inference, bottom-up: h_1 = f_1(x), h_i = f_i(h_{i-1}); q(z_i|x) = N(mu_i(h_i), sigma_i(h_i)),
  so q(z_1..z_L|x) = prod_i q(z_i|x).
- Generation, top-down: p(z_L) = N(0, I); p(z_i|z_{i+1}) a PixelCNN over the map z_i with a
  diagonal-Gaussian output (channels of a location independent), conditioned on a ResNet
  decoding of z_{i+1}; p(x|z_1) a PixelCNN with a 256-way softmax per channel (R -> G -> B)
  conditioned on the upsampled decoding of z_1.
- Loss (§3.1): -E_q log p(x|z_1) + sum_i E_{z_{i+1}~q} KL(q(z_i|x) || p(z_i|z_{i+1})). With an
  autoregressive p and a factorized q the KL is the sum over dimensions j of
  E_{z_<j ~ q} KL(q_j || p_j(.|z_<j)): one z_i ~ q fed to the masked prior gives every p_j,
  and the per-dimension KLs are analytic. That is the estimator used here, as in the
  authors' code; ``tests/test_hierarchical.py`` checks it against the Monte-Carlo KL.

Ablations of §4.2 as switches: ``prior: gaussian`` (a factorized Gaussian decoder at the
higher levels), one level only (``latent_channels: [C]``), and ``pixelcnn: null`` (a
factorized 256-way output: the "convolutional VAE" baselines).
"""

from itertools import pairwise
from typing import Literal

import torch
from einops import rearrange, repeat
from torch import nn

from .backbone import (
    GatedPixelCNN,
    PixelDecoderFactory,
    PixelEmbedding,
    from_vector,
    he_init_,
    n_halvings,
    resnet,
    sample_autoregressive,
    shrink_init_,
    to_vector,
    weight_norm_masked_,
    zero_init_,
)
from .base import ImageModel
from .likelihoods import DiagonalGaussian, GaussianOutput

Gaussian = tuple[torch.Tensor, torch.Tensor]  # (mean, log_std)
VECTOR_FROM = 4  # a 1x1 (vector) level is reached from / decoded to 4x4 feature maps


def normalized(channels: int) -> list[nn.Module]:
    """BN -> ELU closing a pre-activation ResNet: its raw output grows with depth, and fed
    unnormalized into the PixelCNN gates it saturates them (the decoder then stops learning)."""
    return [nn.BatchNorm2d(channels), nn.ELU()]


def pre_activation_head(in_channels: int, out_channels: int) -> nn.Sequential:
    """BN -> ELU -> 1x1 conv: distribution parameters from a pre-activation ResNet's output."""
    return nn.Sequential(*normalized(in_channels), nn.Conv2d(in_channels, out_channels, 1))


def last_layer(module: nn.Module) -> nn.Module:
    """The last convolution or linear layer of a network (its output layer)."""
    return [m for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))][-1]


class HierarchicalPixelVAE(ImageModel):
    """PixelVAE with a hierarchy of latent maps and PixelCNN priors.

    Args:
        latent_channels: channels of each latent level, bottom (z1) first.
        latent_sizes: spatial size of each level (powers of two, decreasing; 1 = a vector,
            allowed for the top level only). The paper: z1 8x8, z2 1x1.
        pixel_widths: widths of the bottom encoder / decoder: full resolution first, then one
            width per 2x resolution change down to z1's size (E.2: 192, 256, 512).
        latent_width: width of the higher-level encoders and decoders (E.2: 512).
        blocks: plain residual blocks per resolution stage, after the resampling block.
        embed_dim: size of the pixel embedding per colour channel (E.2: 48 = 3 x 16).
        pixelcnn: the pixel network of p(x|z1) by class_path and options (null = factorized
            output); it reads the pixel embedding and is conditioned on z1's decoded map.
            E.2 has 3 gated residual blocks of two masked 3x3 convolutions each, 384 wide: a
            GatedPixelCNN with n_layers 6, channels 384 (a multiple of the colours), kernel
            and first_kernel 3, as in the shipped configs. Networks with a data-dependent
            init (PixelCNN++) are not supported here yet.
        prior: "pixelcnn" (autoregressive p(z_i|z_{i+1})) or "gaussian" (factorized).
        n_prior_layers / prior_channels / prior_kernel / prior_first_kernel: the latent
            PixelCNNs (E.2: a 5x5 masked layer, then 3 gated blocks of two 3x3 layers, 512
            channels: 7 masked layers here).
        **kwargs: the shared options of :class:`ImageModel` (lr, KL warm-up, free bits, IWAE).
    """

    def __init__(
        self,
        latent_channels: tuple[int, ...] = (64, 512),
        latent_sizes: tuple[int, ...] = (8, 1),
        pixel_widths: tuple[int, ...] = (192, 256, 512),
        latent_width: int = 512,
        blocks: int = 2,
        embed_dim: int = 16,
        pixelcnn: PixelDecoderFactory | None = GatedPixelCNN,
        prior: Literal["pixelcnn", "gaussian"] = "pixelcnn",
        n_prior_layers: int = 7,
        prior_channels: int = 512,
        prior_kernel: int = 3,
        prior_first_kernel: int = 5,
        **kwargs,
    ) -> None:
        kwargs.setdefault("data_kind", "8bit")
        super().__init__(**kwargs)
        colours, height, width = self.image_shape
        sizes, channels = list(latent_sizes), list(latent_channels)
        self._check_levels(height, width, sizes, channels, pixel_widths)
        self.levels = [f"z{i + 1}" for i in range(len(sizes))]
        self.latent_shapes = {
            n: (c, s, s) for n, c, s in zip(self.levels, channels, sizes, strict=True)
        }
        self.prior_kind = prior
        # the model's second likelihood: p(z_i | z_{i+1}) over each latent map, as the pixel
        # likelihood is p(x | z_1)
        self.latent_likelihood = GaussianOutput()
        n_values = getattr(self.likelihood, "n_values", 2)

        # inference: x -> h_1 -> ... -> h_L, q(z_i|x) from h_i
        self.enc_embed = PixelEmbedding(n_values, embed_dim)
        self.enc_stem = nn.Conv2d(embed_dim * colours, pixel_widths[0], 1)
        self.encoders = nn.ModuleList([resnet(list(pixel_widths), pixel_widths[0], "down", blocks)])
        self.posteriors = nn.ModuleList([pre_activation_head(pixel_widths[-1], 2 * channels[0])])
        prev_width, prev_size = pixel_widths[-1], sizes[0]
        for c, size in zip(channels[1:], sizes[1:], strict=True):
            target = VECTOR_FROM if size == 1 else size
            stages = [latent_width] * (n_halvings(prev_size, target) + 1)
            self.encoders.append(resnet(stages, prev_width, "down", blocks))
            head = to_vector(latent_width, VECTOR_FROM, 2 * c) if size == 1 else None
            self.posteriors.append(head or pre_activation_head(latent_width, 2 * c))
            prev_width, prev_size = latent_width, size

        # generation: z_1 -> map at full resolution -> PixelCNN over x
        self.decoders = nn.ModuleList(
            [
                nn.Sequential(
                    nn.Conv2d(channels[0], pixel_widths[-1], 1),
                    resnet(list(reversed(pixel_widths)), pixel_widths[-1], "up", blocks),
                    *normalized(pixel_widths[0]),
                )
            ]
        )
        if pixelcnn is None:
            self.pixelcnn = None
            self.factorized_head = pre_activation_head(
                pixel_widths[0], self.likelihood.num_params(colours)
            )
        else:
            self.dec_embed = PixelEmbedding(n_values, embed_dim)
            self.pixelcnn = self.pixel_decoder(
                pixelcnn, in_channels=embed_dim * colours, cond_map_channels=pixel_widths[0]
            )
        # z_{i+1} -> map at z_i's size -> p(z_i|z_{i+1})
        self.priors = nn.ModuleList()
        for i in range(1, len(sizes)):
            below, c_below = sizes[i - 1], channels[i - 1]
            start = VECTOR_FROM if sizes[i] == 1 else sizes[i]
            stem = (
                from_vector(channels[i], latent_width, VECTOR_FROM)
                if sizes[i] == 1
                else nn.Conv2d(channels[i], latent_width, 1)
            )
            stages = [latent_width] * (n_halvings(start, below) + 1)
            self.decoders.append(
                nn.Sequential(
                    stem, resnet(stages, latent_width, "up", blocks), *normalized(latent_width)
                )
            )
            if prior == "pixelcnn":
                self.priors.append(
                    GatedPixelCNN(
                        c_below,
                        self.latent_likelihood.num_params(c_below),
                        cond_map_channels=latent_width,
                        n_layers=n_prior_layers,
                        channels=prior_channels,
                        first_kernel=prior_first_kernel,
                        kernel=prior_kernel,
                    )
                )
            else:
                self.priors.append(
                    pre_activation_head(latent_width, self.latent_likelihood.num_params(c_below))
                )
        he_init_(self)
        # start with q = p = N(0, I) at every level (masked prior heads get weight norm: a
        # zero weight would have no direction, so they are shrunk instead)
        for head in self.posteriors:
            zero_init_(last_layer(head))
        for head in self.priors:
            shrink_init_(last_layer(head))
        weight_norm_masked_(self)

    @staticmethod
    def _check_levels(height, width, sizes, channels, pixel_widths) -> None:
        if len(sizes) != len(channels) or not sizes:
            raise ValueError(
                f"latent_sizes {sizes} and latent_channels {channels} need one entry per level"
            )
        if height != width:
            raise ValueError(f"square images only, got {height}x{width}")
        if any(s == 1 for s in sizes[:-1]) or any(a <= b for a, b in pairwise(sizes)):
            raise ValueError(
                f"latent_sizes {sizes} must decrease from level to level and only the top"
                " level may be 1 (a vector)"
            )
        if sizes[0] < VECTOR_FROM or any(1 < s < VECTOR_FROM for s in sizes):
            raise ValueError(f"latent map sizes must be >= {VECTOR_FROM} (or 1 at the top)")
        if (n := n_halvings(height, sizes[0])) != len(pixel_widths) - 1:
            raise ValueError(
                f"{height}x{height} images to {sizes[0]}x{sizes[0]} latents take {n} halvings,"
                f" so pixel_widths needs {n + 1} entries, got {list(pixel_widths)}"
            )

    # ------------------------------------------------------------------ pieces
    def encode(self, x: torch.Tensor) -> list[Gaussian]:
        """(mean, log_std) of q(z_i|x) for every level, bottom first, each (B, C_i, S_i, S_i)."""
        h = self.enc_stem(self.enc_embed(x))
        posteriors = []
        for encoder, head in zip(self.encoders, self.posteriors, strict=True):
            h = encoder(h)
            posteriors.append(DiagonalGaussian.split(head(h)))
        return posteriors

    def prior_output(self, i: int, z_i: torch.Tensor, z_above: torch.Tensor) -> torch.Tensor:
        """The latent likelihood's parameters of p(z_i | z_{i+1}) at every position of z_i
        (0-based level i < L-1); with the PixelCNN prior, position j's depend on z_i only
        before j."""
        cond = self.decoders[i + 1](z_above)
        if self.prior_kind == "pixelcnn":
            return self.priors[i](z_i, None, cond)
        return self.priors[i](cond)

    def prior_params(self, i: int, z_i: torch.Tensor, z_above: torch.Tensor) -> Gaussian:
        """(mean, log_std) of p(z_i | z_{i+1}), for the analytic KL."""
        return DiagonalGaussian.split(self.prior_output(i, z_i, z_above))

    def pixel_params(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Likelihood parameters of every pixel of x given the decoding of z_1."""
        if self.pixelcnn is None:
            return self.factorized_head(cond)
        return self.pixelcnn(self.dec_embed(x), None, cond)

    def sample_posteriors(
        self, posteriors: list[Gaussian], eps: dict[str, torch.Tensor] | None = None
    ):
        """One z_i ~ q(z_i|x) per level (or, given importance noise ``eps[level]`` shaped
        (B, n, ...), n per example flattened to (B*n, ...)) and the summed log q of the draw."""
        zs, log_q = [], 0.0
        for name, (mean, log_std) in zip(self.levels, posteriors, strict=True):
            if eps is None:
                z = DiagonalGaussian.sample(mean, log_std, self.randn(*mean.shape))
            else:
                n = eps[name].shape[1]
                mean, log_std = (repeat(t, "b ... -> (b n) ...", n=n) for t in (mean, log_std))
                noise = rearrange(eps[name], "b n ... -> (b n) ...")
                z = DiagonalGaussian.sample(mean, log_std, noise)
            log_q = log_q + DiagonalGaussian.log_prob(mean, log_std, z)
            zs.append(z)
        return zs, log_q

    # ---------------------------------------------------------------- contract
    def elbo_terms(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self.check_input(x)
        posteriors = self.encode(x)
        zs, _ = self.sample_posteriors(posteriors)
        recon = -self.likelihood.log_prob(self.pixel_params(x, self.decoders[0](zs[0])), x)
        terms = {"recon": recon}
        for i, (name, (mean, log_std)) in enumerate(zip(self.levels, posteriors, strict=True)):
            if i == len(self.levels) - 1:
                kl = DiagonalGaussian.kl_standard_normal(mean, log_std)
            else:
                kl = DiagonalGaussian.kl(mean, log_std, *self.prior_params(i, zs[i], zs[i + 1]))
            terms[f"kl/{name}"] = kl.flatten(1).sum(1)
        return terms

    def posterior_mean(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: mean for name, (mean, _) in zip(self.levels, self.encode(x), strict=True)}

    def log_weights(self, x: torch.Tensor, q, eps: dict[str, torch.Tensor]) -> torch.Tensor:
        """log p(x, z^s) - log q(z^s|x), (B, n), with z^s_i ~ q(z_i|x) at every level."""
        b, n = x.shape[0], eps[self.levels[0]].shape[1]
        zs, log_q = self.sample_posteriors(q, eps)
        xs = repeat(x, "b c h w -> (b n) c h w", n=n)
        log_p = self.likelihood.log_prob(self.pixel_params(xs, self.decoders[0](zs[0])), xs)
        for i in range(len(zs) - 1):
            log_p = log_p + self.latent_likelihood.log_prob(
                self.prior_output(i, zs[i], zs[i + 1]), zs[i]
            )
        top = torch.zeros_like(zs[-1])
        log_p = log_p + DiagonalGaussian.log_prob(top, top, zs[-1])
        return rearrange(log_p - log_q, "(b n) -> b n", b=b)

    def sample_noise(self, n: int, generator: torch.Generator | None = None):
        noise = {
            name: DiagonalGaussian.noise((n, *self.latent_shapes[name]), generator)
            for name in reversed(self.levels)
        }
        noise["x"] = self.likelihood.noise((n, *self.image_shape), generator)
        return noise

    @torch.no_grad()
    def sample(self, n: int, noise: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        noise = self.sample_noise(n) if noise is None else noise
        top = len(self.levels) - 1
        return self.generate(top, noise[self.levels[top]].to(self.device), noise)

    @torch.no_grad()
    def generate(self, level: int, z: torch.Tensor, noise: dict[str, torch.Tensor]):
        """Top-down from a given z at 0-based ``level``: every lower level, then x, each with
        its entry of ``noise``."""
        for i in range(level - 1, -1, -1):
            z = self.sample_latent(i, z, noise[self.levels[i]])
        return self.decode(z, noise["x"])

    @torch.no_grad()
    def sample_latent(self, i: int, z_above: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """z_i ~ p(z_i | z_{i+1}) with standard-normal noise eps, position by position."""
        cond = self.decoders[i + 1](z_above)
        draw = self.latent_likelihood.sample
        if self.prior_kind == "gaussian":
            return draw(self.priors[i](cond), eps)
        prior = self.priors[i]
        return sample_autoregressive(
            lambda z, rows: prior(z, None, cond[:, :, rows]),
            draw,
            (z_above.shape[0], *self.latent_shapes[self.levels[i]]),
            self.device,
            noise=eps,
            sequential_channels=self.latent_likelihood.sequential_channels,
            context_rows=prior.receptive_rows,
            cache=lambda z: prior.sampling_cache(lambda v: v, z, None, cond),
        )

    @torch.no_grad()
    def decode(self, z1: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """x ~ p(x | z_1): pixel by pixel, R -> G -> B, or in one pass when factorized."""
        cond = self.decoders[0](z1)
        if self.pixelcnn is None:
            return self.likelihood.sample(self.factorized_head(cond), noise)
        return self.sample_pixels(
            z1.shape[0],
            lambda x, rows: self.pixel_params(x, cond[:, :, rows]),
            self.pixelcnn.receptive_rows,
            noise,
            cache=lambda x: self.pixelcnn.sampling_cache(self.dec_embed, x, None, cond),
        )

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, level: str = "z1") -> torch.Tensor:
        """Encode x, keep the mean of q(z_level|x) and generate everything below it afresh
        (appendix A: from the top level, the 'top-down generations' of Fig. 8)."""
        self.check_input(x)
        i = self.levels.index(level)
        mean = self.encode(x)[i][0]
        return self.generate(i, mean, self.sample_noise(x.shape[0]))
