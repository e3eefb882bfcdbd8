"""Output distributions, one place for all models.

Every likelihood turns a parameter map from a network into per-example log-probabilities
(summed over all dimensions, in nats), samples and, where defined, the mode. Parameters are
cast to float32 before any log/exp so that bf16-mixed training keeps exact likelihoods.

Sampling takes optional ``noise`` (from :meth:`noise`) so that a caller can hold the noise of
one level fixed while varying another (PixelVAE Fig. 6); given its noise a sample is a
deterministic function of the parameters.

Channel layout of a parameter map from a masked network: channel k belongs to colour
``k % n_colors`` (see backbone/masked_conv.py), so a per-colour likelihood with P parameters
per colour reads channel ``p * C + c`` as parameter p of colour c.
"""

import math

import torch
import torch.nn.functional as F
from einops import rearrange


def uniform_noise(shape: tuple[int, ...], generator: torch.Generator | None = None):
    return torch.rand(shape, generator=generator)


class Bernoulli:
    """Independent Bernoulli per dimension, parameterized by logits; support {0, 1}."""

    params_per_channel = 1

    @staticmethod
    def log_prob(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """log p(x) per example: (B, C, H, W) logits and 0/1 targets -> (B,)."""
        nll = F.binary_cross_entropy_with_logits(logits.float(), x.float(), reduction="none")
        return -nll.flatten(1).sum(1)

    @staticmethod
    def noise(shape: tuple[int, ...], generator: torch.Generator | None = None) -> torch.Tensor:
        """Uniform(0, 1) noise shaped like a sample."""
        return uniform_noise(shape, generator)

    @staticmethod
    def sample(logits: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        probs = torch.sigmoid(logits.float())
        if noise is None:
            return torch.bernoulli(probs)
        return (noise.to(probs.device) < probs).float()

    @staticmethod
    def mode(logits: torch.Tensor) -> torch.Tensor:
        return (logits.float() > 0).float()

    @staticmethod
    def mean(logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits.float())

    @staticmethod
    def network_input(x: torch.Tensor) -> torch.Tensor:
        """How the data is fed to a network: 0/1 as it is."""
        return x


class Categorical:
    """An n-way categorical (softmax) per channel over the values 0..n-1: the 256-way
    output of PixelCNN / PixelVAE on 8-bit images. Parameters: n logits per channel,
    channel ``v * C + c`` holding the logit of value v for colour c."""

    def __init__(self, n_values: int = 256) -> None:
        self.n_values = n_values
        self.params_per_channel = n_values

    def logits(self, params: torch.Tensor) -> torch.Tensor:
        """(B, n*C, H, W) parameters -> (B, C, H, W, n) float32 log-probabilities."""
        logits = rearrange(params.float(), "b (v c) h w -> b c h w v", v=self.n_values)
        return F.log_softmax(logits, dim=-1)

    def log_prob(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """log p(x) per example; x holds integer values 0..n-1 (any float or int dtype)."""
        index = x.long()
        if index.min() < 0 or index.max() >= self.n_values:
            raise ValueError(
                f"a {self.n_values}-way categorical needs integer values 0..{self.n_values - 1},"
                f" got values in [{float(x.min())}, {float(x.max())}]: is the data 8-bit and"
                " not normalized?"
            )
        logp = self.logits(params).gather(-1, index[..., None])[..., 0]
        return logp.flatten(1).sum(1)

    @staticmethod
    def noise(shape: tuple[int, ...], generator: torch.Generator | None = None) -> torch.Tensor:
        """Uniform(0, 1) noise shaped like a sample (inverse-CDF sampling)."""
        return uniform_noise(shape, generator)

    def sample(self, params: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Values 0..n-1 as float32, by inverting the CDF at uniform noise."""
        probs = self.logits(params).exp()
        if noise is None:
            noise = torch.rand(probs.shape[:-1], device=probs.device)
        cdf = probs.cumsum(-1)
        value = (cdf < noise.to(probs.device)[..., None]).sum(-1)
        return value.clamp(max=self.n_values - 1).float()

    def mode(self, params: torch.Tensor) -> torch.Tensor:
        return self.logits(params).argmax(-1).float()

    def network_input(self, x: torch.Tensor) -> torch.Tensor:
        """How the data is fed to a network without an embedding: scaled to [-1, 1]."""
        return x * (2.0 / (self.n_values - 1)) - 1.0


class DiagonalGaussian:
    """N(mean, exp(log_std)^2) per dimension; used for latents (posteriors and priors).

    As an output head (the PixelCNN priors over latent maps, PixelVAE §3.1) its parameters
    are 2 per channel: the first C channels the means, the last C the log-stds, so the
    dimensions within a spatial location are modelled independently, as the paper does.
    """

    params_per_channel = 2

    @staticmethod
    def split(params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 2C, ...) head output -> float32 (mean, log_std), each (B, C, ...)."""
        mean, log_std = params.float().chunk(2, dim=1)
        return mean, log_std

    @staticmethod
    def log_prob(mean: torch.Tensor, log_std: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """log density per example, summed over every dimension after the first."""
        mean, log_std, z = mean.float(), log_std.float(), z.float()
        logp = (
            -0.5 * ((z - mean) * torch.exp(-log_std)) ** 2 - log_std - 0.5 * math.log(2 * math.pi)
        )
        return logp.flatten(1).sum(1)

    @staticmethod
    def noise(shape: tuple[int, ...], generator: torch.Generator | None = None) -> torch.Tensor:
        """Standard-normal noise shaped like a sample."""
        return torch.randn(shape, generator=generator)

    @staticmethod
    def sample(mean: torch.Tensor, log_std: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Reparameterized sample mean + std * eps (eps ~ N(0, I) supplied by the caller)."""
        return mean.float() + torch.exp(log_std.float()) * eps.to(mean.device)

    @staticmethod
    def kl(
        mean_q: torch.Tensor,
        log_std_q: torch.Tensor,
        mean_p: torch.Tensor,
        log_std_p: torch.Tensor,
    ) -> torch.Tensor:
        """Analytic KL(N(mean_q, std_q^2) || N(mean_p, std_p^2)) per dimension."""
        mean_q, log_std_q = mean_q.float(), log_std_q.float()
        mean_p, log_std_p = mean_p.float(), log_std_p.float()
        var_ratio = torch.exp(2 * (log_std_q - log_std_p))
        mahalanobis = ((mean_q - mean_p) * torch.exp(-log_std_p)) ** 2
        return 0.5 * (var_ratio + mahalanobis - 1) - (log_std_q - log_std_p)

    @staticmethod
    def kl_standard_normal(mean: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
        """Analytic KL(N(mean, std^2) || N(0, I)) per dimension, same shape as mean."""
        zeros = torch.zeros_like(mean)
        return DiagonalGaussian.kl(mean, log_std, zeros, zeros)


BERNOULLI = Bernoulli()
CATEGORICAL_256 = Categorical(256)
LIKELIHOODS = {"binary": BERNOULLI, "8bit": CATEGORICAL_256}
"""The pixel likelihood of each kind of data (``ImageDataModule.data_kind``)."""


def bits_per_dim(nats: torch.Tensor, dims: int) -> torch.Tensor:
    """Nats per example -> bits per dimension: nats / (dims * ln 2), dims = C * H * W."""
    return nats / (dims * math.log(2))
