"""Output distributions: one interface, one place for all models.

Every likelihood is a :class:`Likelihood`: it says how many parameters a network must emit
per pixel for C channels (:meth:`~Likelihood.num_params`), turns such a parameter map into
per-example log-probabilities (summed over all dimensions, in nats), draws samples from
given noise and, where defined, the mode; it owns the transform of data into network input
and the check that data is of its kind. Parameters are cast to float32 before any log/exp
so that bf16-mixed training keeps exact likelihoods. A model is configured with its
likelihood (``likelihood: {class_path: lightning_modules.likelihoods.Categorical, ...}``);
without one, the datamodule's ``data_kind`` picks it (:data:`LIKELIHOODS`).

Sampling takes optional ``noise`` (from :meth:`~Likelihood.noise`) so that a caller can hold
the noise of one level fixed while varying another (PixelVAE Fig. 6); given its noise a
sample is a deterministic function of the parameters.

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


class Likelihood:
    """The interface of an output distribution over images (B, C, H, W).

    ``sequential_channels``: True when a pixel's channels are drawn one after another, each
    from parameters recomputed with the earlier ones filled in (a masked network that splits
    colours, R -> G -> B); False when one set of parameters gives the whole pixel (the
    channels are independent, or coupled inside the likelihood as in the logistic mixture).
    """

    params_per_channel: int = 1
    sequential_channels: bool = True

    def num_params(self, channels: int) -> int:
        """Parameters per pixel the network must output for images with ``channels``."""
        return channels * self.params_per_channel

    def log_prob(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """log p(x) per example: (B, P, H, W) parameters and (B, C, H, W) data -> (B,)."""
        raise NotImplementedError

    def noise(self, shape: tuple[int, ...], generator: torch.Generator | None = None):
        """The noise one sample shaped ``shape`` consumes (default: Uniform(0, 1))."""
        return uniform_noise(shape, generator)

    def sample(self, params: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def mode(self, params: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no mode")

    def network_input(self, x: torch.Tensor) -> torch.Tensor:
        """How data of this kind is fed to a network without an embedding."""
        return x

    def check(self, x: torch.Tensor) -> None:
        """Raise ValueError when x is not data of this likelihood's kind (cheap: one pass)."""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if k != "params_per_channel")
        return f"{type(self).__name__}({args})"


def check_levels(x: torch.Tensor, n_values: int, name: str) -> None:
    """x must hold integers 0..n_values-1 (any dtype): one min/max and one integrality pass.
    Skipped inside torch.compile, where a data-dependent branch would break the graph."""
    if torch.compiler.is_compiling() or x.numel() == 0:
        return
    x = x.detach()
    low, high = (float(v) for v in torch.aminmax(x))
    integral = not x.is_floating_point() or bool((x == x.round()).all())
    if low >= 0 and high <= n_values - 1 and integral:
        return
    kind = "binary" if n_values == 2 else f"{n_values}-level"
    raise ValueError(
        f"{name} models {kind} data, integers 0..{n_values - 1}, but got"
        f" {'' if integral else 'non-integer '}values in [{low:g}, {high:g}]. Feed it the"
        " datamodule's raw values (not normalized images), or configure the model with the"
        " likelihood of this data: Bernoulli for binary images, Categorical(256) or"
        " DiscretizedLogisticMixture for 8-bit ones."
    )


class Bernoulli(Likelihood):
    """Independent Bernoulli per dimension, parameterized by logits; support {0, 1}."""

    params_per_channel = 1

    @staticmethod
    def log_prob(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """log p(x) per example: (B, C, H, W) logits and 0/1 targets -> (B,)."""
        check_levels(x, 2, "Bernoulli")
        nll = F.binary_cross_entropy_with_logits(logits.float(), x.float(), reduction="none")
        return -nll.flatten(1).sum(1)

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


class Categorical(Likelihood):
    """An n-way categorical (softmax) per channel over the values 0..n-1: the 256-way
    output of PixelCNN / PixelVAE on 8-bit images, the 16-way one of a 4-bit view.
    Parameters: n logits per channel, channel ``v * C + c`` holding the logit of value v for
    colour c (the colour-grouped layout of a masked network's output)."""

    def __init__(self, n_values: int = 256) -> None:
        if n_values < 2:
            raise ValueError(f"a categorical needs n_values >= 2, got {n_values}")
        self.n_values = n_values
        self.params_per_channel = n_values

    def logits(self, params: torch.Tensor) -> torch.Tensor:
        """(B, n*C, H, W) parameters -> (B, C, H, W, n) float32 log-probabilities."""
        logits = rearrange(params.float(), "b (v c) h w -> b c h w v", v=self.n_values)
        return F.log_softmax(logits, dim=-1)

    def log_prob(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """log p(x) per example; x holds integer values 0..n-1 (any float or int dtype)."""
        self.check(x)
        logp = self.logits(params).gather(-1, x.long()[..., None])[..., 0]
        return logp.flatten(1).sum(1)

    def check(self, x: torch.Tensor) -> None:
        check_levels(x, self.n_values, f"a {self.n_values}-way categorical")

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
    """N(mean, exp(log_std)^2) per dimension: the latents' posteriors and priors.

    Static helpers on (mean, log_std) pairs; :class:`GaussianOutput` is the same density as
    an output head of the :class:`Likelihood` interface.
    """

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


class GaussianOutput(Likelihood):
    """The diagonal Gaussian as an output head: the PixelCNN priors over latent maps
    (PixelVAE §3.1). Parameters 2 per channel: the first C channels the means, the last C
    the log-stds; the channels of a location are independent given the earlier locations,
    as in the paper, so a location is drawn in one step. A density, not a discrete
    likelihood: it models latents, never pixels."""

    params_per_channel = 2
    sequential_channels = False

    def log_prob(self, params: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return DiagonalGaussian.log_prob(*DiagonalGaussian.split(params), z)

    def noise(self, shape: tuple[int, ...], generator: torch.Generator | None = None):
        return DiagonalGaussian.noise(shape, generator)

    def sample(self, params: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        mean, log_std = DiagonalGaussian.split(params)
        eps = torch.randn_like(mean) if noise is None else noise
        return DiagonalGaussian.sample(mean, log_std, eps)

    def mode(self, params: torch.Tensor) -> torch.Tensor:
        return DiagonalGaussian.split(params)[0]


LIKELIHOODS = {"binary": Bernoulli(), "8bit": Categorical(256)}
"""The default pixel likelihood of each kind of data (``ImageDataModule.data_kind``), for a
model configured without one."""


def bits_per_dim(nats: torch.Tensor, dims: int) -> torch.Tensor:
    """Nats per example -> bits per dimension: nats / (dims * ln 2), dims = C * H * W."""
    return nats / (dims * math.log(2))
