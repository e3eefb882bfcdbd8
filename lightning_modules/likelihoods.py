"""Output distributions, one place for all models.

Every likelihood turns a parameter map from a network into per-example log-probabilities
(summed over all dimensions, in nats), samples and, where defined, the mode. Parameters are
cast to float32 before any log/exp so that bf16-mixed training keeps exact likelihoods.
"""

import math

import torch
import torch.nn.functional as F


class Bernoulli:
    """Independent Bernoulli per dimension, parameterized by logits; support {0, 1}."""

    params_per_channel = 1

    @staticmethod
    def log_prob(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """log p(x) per example: (B, C, H, W) logits and 0/1 targets -> (B,)."""
        nll = F.binary_cross_entropy_with_logits(logits.float(), x.float(), reduction="none")
        return -nll.flatten(1).sum(1)

    @staticmethod
    def sample(logits: torch.Tensor) -> torch.Tensor:
        return torch.bernoulli(torch.sigmoid(logits.float()))

    @staticmethod
    def mode(logits: torch.Tensor) -> torch.Tensor:
        return (logits.float() > 0).float()

    @staticmethod
    def mean(logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits.float())


class DiagonalGaussian:
    """N(mean, exp(log_std)^2) per dimension; used for latents (posteriors and priors)."""

    @staticmethod
    def log_prob(mean: torch.Tensor, log_std: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """log density per example, summed over every dimension after the first."""
        mean, log_std, z = mean.float(), log_std.float(), z.float()
        logp = (
            -0.5 * ((z - mean) * torch.exp(-log_std)) ** 2 - log_std - 0.5 * math.log(2 * math.pi)
        )
        return logp.flatten(1).sum(1)

    @staticmethod
    def sample(mean: torch.Tensor, log_std: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Reparameterized sample mean + std * eps (eps ~ N(0, I) supplied by the caller)."""
        return mean.float() + torch.exp(log_std.float()) * eps

    @staticmethod
    def kl_standard_normal(mean: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
        """Analytic KL(N(mean, std^2) || N(0, I)) per dimension, same shape as mean."""
        mean, log_std = mean.float(), log_std.float()
        return 0.5 * (mean**2 + torch.exp(2 * log_std) - 1) - log_std
