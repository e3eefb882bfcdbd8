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
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange

Bounds = Callable[[int, list[torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]
"""``bounds(c, drawn) -> (low, high)``: the levels colour c of a pixel may take given the
levels ``drawn`` of its earlier colours (see DiscretizedLogisticMixture.sample)."""


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
    Skipped inside torch.compile, where a data-dependent branch would break the graph, and
    for non-finite data, which the non-finite-step guard of training reports."""
    if torch.compiler.is_compiling() or x.numel() == 0:
        return
    x = x.detach()
    low, high = (float(v) for v in torch.aminmax(x))
    if not (math.isfinite(low) and math.isfinite(high)):
        return  # a NaN / inf makes the loss non-finite: the training guard skips that step
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


def log_bin_mass(
    lower: torch.Tensor,
    upper: torch.Tensor,
    mean: torch.Tensor,
    log_scale: torch.Tensor,
    first: torch.Tensor,
    last: torch.Tensor,
) -> torch.Tensor:
    """log P(lower < Y < upper) for Y ~ Logistic(mean, exp(log_scale)), exactly and stably
    (float32): the ``first`` bin reaches down to -inf, the ``last`` up to +inf, so the bins
    of a discretized logistic sum to one. An interior bin is computed as
    sigmoid(a) - sigmoid(b) = sigmoid(a) sigmoid(-b) (1 - exp(-(a - b))), a, b the standardized
    edges: ``logsigmoid(a) + logsigmoid(-b) + log1mexp(d)``, d = (upper - lower) / s, with a
    series for d < 1e-4 where exp(-d) rounds to 1 (see DiscretizedLogisticMixture)."""
    inv_s = torch.exp(-log_scale)
    log_cdf_upper = F.logsigmoid((upper - mean) * inv_s)  # all of the first bin's mass
    log_sf_lower = F.logsigmoid((mean - lower) * inv_s)  # all of the last bin's mass
    log_d = torch.log(upper - lower) - log_scale
    d = torch.exp(log_d)
    tiny = d < 1e-4
    d_safe = torch.where(tiny, 1.0, d)
    log1mexp = torch.where(
        d_safe > math.log(2), torch.log1p(-torch.exp(-d_safe)), torch.log(-torch.expm1(-d_safe))
    )
    log1mexp = torch.where(tiny, log_d - d / 2, log1mexp)
    interior = log_cdf_upper + log_sf_lower + log1mexp
    return torch.where(first, log_cdf_upper, torch.where(last, log_sf_lower, interior))


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


class DiscretizedLogisticMixture(Likelihood):
    """The discretized mixture of logistics of PixelCNN++ (Salimans et al. 2017, §2.1-2.2) on
    b = 2**bits levels (the b-level logistic of AGAVE eq. 8): one parameter set per pixel, the
    colours coupled linearly inside the likelihood (so ``sequential_channels = False``).

    Data: integers 0..K-1, K = 2**bits (any dtype), C = 1 (grey) or 3 (RGB), mapped to
    y = 2x/(K-1) - 1 in [-1, 1] (also the network input). Level x is the bin [y - h, y + h],
    h = 1/(K-1), except that level 0 reaches down to -inf and level K-1 up to +inf. With
    pi = softmax(logits), per component k and colour c a mean mu, a log-scale l (clamped
    below at ``log_scale_min``, s = exp(l)) and, for RGB, coefficients alpha, beta, gamma
    (tanh-squashed)::

        p(x) = sum_k pi_k prod_c [sigmoid((y_c + h - m_kc)/s_kc) - sigmoid((y_c - h - m_kc)/s_kc)]
        m_kR = mu_kR,  m_kG = mu_kG + alpha_k y_R,  m_kB = mu_kB + beta_k y_R + gamma_k y_G

    with the true y_R, y_G in :meth:`log_prob` and the drawn levels in :meth:`sample`. (AGAVE
    eq. 8 bins 8-bit intensities into [c j, c j + c), c = 256/b; here the b-level data itself
    is the integers 0..b-1, spread evenly over [-1, 1] like 8-bit data: the two agree for
    b = 256 up to a half-level shift of the mean.)

    Parameter layout per pixel (channel index), n = ``n_mix``, colour c = 0, 1, 2 (R, G, B),
    component k: logits ``k``; means ``n + c n + k``; log-scales ``(1 + C) n + c n + k``; for
    C = 3 the coefficients ``7 n + j n + k`` with j = 0, 1, 2 for alpha, beta, gamma. In all
    3n (C = 1) or 10n (C = 3) channels, grouped by parameter, not by colour.

    Numerics, all in float32 (parameters cast first): an interior bin is evaluated exactly
    through sigmoid(a) - sigmoid(b) = sigmoid(a) sigmoid(-b) (1 - exp(-(a - b))), so
    ``log P = logsigmoid(a) + logsigmoid(-b) + log1mexp(2h/s)`` (a - b = 2h/s, log1mexp with a
    series for 2h/s < 1e-4), and the edge bins drop the factor of the infinite edge: every
    term is stable, nothing underflows, and no density approximation is needed. PixelCNN++'s
    code subtracts the sigmoids and, where the difference is below 1e-5, falls back to the
    density at the bin centre times the bin width: that agrees with the exact mass to
    O((h/s)^2) in the tail of a broad component, but is off by nats for a narrow one
    (s ~ h) far from the bin (mean 0, l = -7, level 140: -105.36 for the exact -103.21), and
    its subtraction loses digits for differences just above 1e-5 (~1e-3 nats).

    Sampling (Kolesnikov & Lampert 2017, §4.2, Fig. 4), per pixel: a component by inverting
    the CDF of pi at one uniform, then the colours R, G, B in turn, each coupled to the levels
    already drawn: ``"ordinary"`` a logistic draw m + s (log u - log(1 - u)), clamped to
    [-1, 1] and rounded to the nearest level (exactly the discretized distribution);
    ``"variance_reduced"`` the same with every log-scale lowered by ``log_scale_shift``
    (s scaled by exp(-shift), a temperature); ``"map"`` the component's mode, its coupled mean
    rounded to the nearest level. The paper sweeps the reduction over 0.0, 0.1, ..., 1.0 in
    Fig. 4 without naming a best value; the default 0.5 is the middle of that sweep.
    :meth:`mode` is the MAP draw with the most probable component (argmax of the logits),
    the mode of that component, not necessarily of the mixture.
    """

    sequential_channels = False

    def __init__(
        self,
        n_mix: int = 10,
        bits: int = 8,
        log_scale_min: float = -7.0,
        sampling: Literal["ordinary", "variance_reduced", "map"] = "ordinary",
        log_scale_shift: float = 0.5,
    ) -> None:
        if n_mix < 1 or bits < 1:
            raise ValueError(f"need n_mix >= 1 and bits >= 1, got n_mix={n_mix}, bits={bits}")
        if sampling not in ("ordinary", "variance_reduced", "map"):
            raise ValueError(
                f"sampling must be 'ordinary', 'variance_reduced' or 'map', got {sampling!r}"
            )
        self.n_mix = n_mix
        self.bits = bits
        self.log_scale_min = log_scale_min
        self.sampling = sampling
        self.log_scale_shift = log_scale_shift

    @property
    def n_levels(self) -> int:
        return 2**self.bits

    def num_params(self, channels: int) -> int:
        if channels not in (1, 3):
            raise ValueError(
                "DiscretizedLogisticMixture models grayscale (C = 1) or RGB (C = 3) images,"
                f" got C = {channels}"
            )
        return self.n_mix * (10 if channels == 3 else 3)

    def network_input(self, x: torch.Tensor) -> torch.Tensor:
        """Levels 0..K-1 -> [-1, 1], the bin centres of :meth:`log_prob`."""
        return x * (2.0 / (self.n_levels - 1)) - 1.0

    def check(self, x: torch.Tensor) -> None:
        check_levels(x, self.n_levels, f"DiscretizedLogisticMixture(bits={self.bits})")

    def noise(self, shape: tuple[int, ...], generator: torch.Generator | None = None):
        """Uniform(0, 1) noise (B, C + 1, H, W) for images (B, C, H, W): channel 0 picks the
        component, channel 1 + c drives the logistic of colour c."""
        batch, channels, *rest = shape
        return uniform_noise((batch, channels + 1, *rest), generator)

    def split(self, params: torch.Tensor):
        """(B, P, H, W) -> float32 logits (B, n, H, W), means and clamped log-scales
        (B, C, n, H, W), tanh'd coefficients (B, 3, n, H, W) or None for C = 1."""
        n = self.n_mix
        channels = {3 * n: 1, 10 * n: 3}.get(params.shape[1])
        if channels is None:
            raise ValueError(
                f"expected {3 * n} (C = 1) or {10 * n} (C = 3) parameter channels for"
                f" n_mix={n}, got {params.shape[1]}"
            )
        params = params.float()
        logits = params[:, :n]
        groups = rearrange(params[:, n:], "b (g c k) h w -> g b c k h w", c=channels, k=n)
        means, log_scales = groups[0], groups[1].clamp(min=self.log_scale_min)
        coeffs = torch.tanh(groups[2]) if channels == 3 else None
        return logits, means, log_scales, coeffs

    def log_prob(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """log p(x) per example in nats: (B, P, H, W) parameters, (B, C, H, W) levels -> (B,).
        Parameters with batch 1 broadcast over the data's batch."""
        self.check(x)
        logits, means, log_scales, coeffs = self.split(params)
        if x.shape[1] != means.shape[1]:
            raise ValueError(f"parameters for C = {means.shape[1]}, data with C = {x.shape[1]}")
        level = x.float()[:, :, None]  # (B, C, 1, H, W) against (B, C, n, H, W)
        y = self.network_input(level)
        if coeffs is not None:  # the coupling, with the true R and G values
            mean_r, mean_g, mean_b = means.unbind(1)
            mean_g = mean_g + coeffs[:, 0] * y[:, 0]
            mean_b = mean_b + coeffs[:, 1] * y[:, 0] + coeffs[:, 2] * y[:, 1]
            means = torch.stack(torch.broadcast_tensors(mean_r, mean_g, mean_b), 1)

        h = 1.0 / (self.n_levels - 1)
        log_bin = log_bin_mass(
            y - h, y + h, means, log_scales, level == 0, level == self.n_levels - 1
        )
        log_mix = F.log_softmax(logits, dim=1) + log_bin.sum(1)  # (B, n, H, W)
        return torch.logsumexp(log_mix, dim=1).flatten(1).sum(1)

    def sample(
        self, params: torch.Tensor, noise: torch.Tensor | None = None, bounds: Bounds | None = None
    ) -> torch.Tensor:
        """A draw (B, C, H, W) of float32 levels 0..K-1 by ``self.sampling``; ``noise`` from
        :meth:`noise` (fresh when None), the sample a deterministic function of it.

        ``bounds(c, drawn)``, given the levels ``drawn`` of the colours before c, returns the
        lowest and highest level colour c may take (integer tensors broadcasting to
        (B, H, W)): each colour is then drawn from its component's logistic truncated to
        that range (inverse CDF on it; MAP: the mode clamped into it). A deterministic
        view of the image is kept this way (Kolesnikov & Lampert's colourizations)."""
        logits, means, log_scales, coeffs = self.split(params)
        batch, channels, _, height, width = means.shape
        if noise is None:
            noise = torch.rand(batch, channels + 1, height, width, device=logits.device)
        noise = noise.to(device=logits.device, dtype=torch.float32)
        cdf = F.softmax(logits, dim=1).cumsum(1)
        component = (cdf < noise[:, None, 0]).sum(1).clamp(max=self.n_mix - 1)
        if self.sampling == "map":
            return self._draw(component, means, log_scales, coeffs, None, bounds)
        if self.sampling == "variance_reduced":
            log_scales = log_scales - self.log_scale_shift
        return self._draw(component, means, log_scales, coeffs, noise[:, 1:], bounds)

    def mode(self, params: torch.Tensor) -> torch.Tensor:
        """The MAP draw of the most probable component (argmax of the logits)."""
        logits, means, log_scales, coeffs = self.split(params)
        return self._draw(logits.argmax(1), means, log_scales, coeffs, None)

    def _draw(self, component, means, log_scales, coeffs, noise, bounds=None):
        """Colours R, G, B of the chosen components in turn: the coupled mean, plus a logistic
        draw unless ``noise`` is None (MAP), clamped to [-1, 1] (to the ``bounds``) and
        rounded to a level."""
        index = component[:, None, None].expand(-1, means.shape[1], 1, -1, -1)
        mean, log_scale, coeff = (
            None if t is None else t.gather(2, index)[:, :, 0] for t in (means, log_scales, coeffs)
        )
        scale = self.n_levels - 1
        levels, ys = [], []
        for c in range(means.shape[1]):
            m = mean[:, c]
            if c == 1:
                m = m + coeff[:, 0] * ys[0]
            elif c == 2:
                m = m + coeff[:, 1] * ys[0] + coeff[:, 2] * ys[1]
            if bounds is None:
                if noise is not None:
                    m = m + torch.exp(log_scale[:, c]) * torch.logit(noise[:, c], eps=1e-7)
                level = ((m.clamp(-1.0, 1.0) + 1.0) * (scale / 2)).round()
            else:
                low, high = (b.to(m.device).float() for b in bounds(c, levels))
                if noise is not None:
                    m = self._truncated_draw(m, log_scale[:, c], noise[:, c], low, high)
                level = torch.minimum(torch.maximum(self._level(m), low), high)
            levels.append(level)
            ys.append(self.network_input(level))
        return torch.stack(levels, 1)

    def _level(self, y: torch.Tensor) -> torch.Tensor:
        """The nearest level of a value y on [-1, 1]."""
        return ((y.clamp(-1.0, 1.0) + 1.0) * ((self.n_levels - 1) / 2)).round()

    def _truncated_draw(self, mean, log_scale, u, low, high) -> torch.Tensor:
        """A logistic draw restricted to the bins of the levels low..high (the edge bins reach
        to -inf / +inf): u mapped into [F(lower edge), F(upper edge)] before the inverse CDF,
        so that rounding gives the truncated discretized distribution exactly (up to float32
        in far tails, where the clamp to [low, high] keeps the bounds). Scales above e^5
        (~150 times the whole range [-1, 1]: flat over it within 1%) are taken as e^5, so
        that the CDF keeps float32 resolution and s * logit(u) stays finite."""
        h = 1.0 / (self.n_levels - 1)
        log_scale = log_scale.clamp(max=5.0)
        inv_s = torch.exp(-log_scale)
        f_low = torch.where(
            low > 0, torch.sigmoid((self.network_input(low) - h - mean) * inv_s), 0.0
        )
        f_high = torch.where(
            high < self.n_levels - 1,
            torch.sigmoid((self.network_input(high) + h - mean) * inv_s),
            1.0,
        )
        u = f_low + u * (f_high - f_low)
        return mean + torch.exp(log_scale) * torch.logit(u, eps=1e-7)


class DiscretizedLogistic(Likelihood):
    """AGAVE's factorized output on b colour levels (eq. 8): every channel of every pixel an
    independent logistic, discretized into the b bins of its level; b divides 256.

    Level j of b-level data stands for the 8-bit values c j .. c j + c - 1 (c = 256 / b;
    ``views.Quantize`` makes such data): on PixelCNN++'s scale, 8-bit value v at
    y_v = 2 v / 255 - 1 with the bin [y_v - 1/255, y_v + 1/255], level j is the bin
    [y_cj - 1/255, y_(cj+c-1) + 1/255], the lowest reaching to -inf and the highest to +inf
    so that the b probabilities sum to one. The means live on that scale whatever b is, so a
    VAE's means f(z) read as an image the same way at every quantization (AGAVE: "the VAE
    decoder outputs the continuous means ... regardless of the quantization level"); eq. 8
    bins the 0..255 scale as [c j, c j + c), the same bins up to half an 8-bit value.

    Parameters (B, 2C, H, W): the C means, then the C log-scales (clamped below at
    ``log_scale_min``); AGAVE shares one learned scale per channel over all pixels, which its
    model broadcasts into the map.
    """

    params_per_channel = 2
    sequential_channels = False

    def __init__(self, levels: int = 256, log_scale_min: float = -7.0) -> None:
        if levels < 2 or 256 % levels:
            raise ValueError(f"levels must divide 256 (2, 4, ..., 256), got {levels}")
        self.levels = levels
        self.log_scale_min = log_scale_min

    @property
    def width(self) -> int:
        """8-bit values per level (c = 256 / b)."""
        return 256 // self.levels

    def edges(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The lower and upper edge of each level's bin on the [-1, 1] scale."""
        first = x.float() * self.width
        return (2 * first - 1) / 255 - 1, (2 * (first + self.width - 1) + 1) / 255 - 1

    def network_input(self, x: torch.Tensor) -> torch.Tensor:
        """Levels -> the centres of their bins on the [-1, 1] scale of 8-bit data."""
        return (2 * x * self.width + (self.width - 1)) / 255 - 1

    def check(self, x: torch.Tensor) -> None:
        check_levels(x, self.levels, f"DiscretizedLogistic(levels={self.levels})")

    def split(self, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, log_scale = DiagonalGaussian.split(params)
        return mean, log_scale.clamp(min=self.log_scale_min)

    def log_prob(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """log p(x) per example, nats: (B, 2C, H, W) parameters, (B, C, H, W) levels -> (B,)."""
        self.check(x)
        mean, log_scale = self.split(params)
        if mean.shape != x.shape:
            raise ValueError(f"parameters for {tuple(mean.shape)} images, data {tuple(x.shape)}")
        lower, upper = self.edges(x)
        log_p = log_bin_mass(lower, upper, mean, log_scale, x == 0, x == self.levels - 1)
        return log_p.flatten(1).sum(1)

    def _level(self, y: torch.Tensor) -> torch.Tensor:
        """The level whose bin holds y (on the [-1, 1] scale)."""
        value = ((y.clamp(-1.0, 1.0) + 1.0) * 127.5).round()  # the nearest 8-bit value
        return torch.div(value, self.width, rounding_mode="floor")

    def sample(self, params: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Levels drawn by inverting the logistic's CDF at uniform ``noise``, as float32."""
        mean, log_scale = self.split(params)
        u = torch.rand_like(mean) if noise is None else noise.to(mean.device, torch.float32)
        return self._level(mean + torch.exp(log_scale) * torch.logit(u, eps=1e-7))

    def mode(self, params: torch.Tensor) -> torch.Tensor:
        """The level holding the logistic's mode (its mean)."""
        return self._level(self.split(params)[0])


LIKELIHOODS = {"binary": Bernoulli(), "8bit": Categorical(256)}
"""The default pixel likelihood of each kind of data (``ImageDataModule.data_kind``), for a
model configured without one."""


def bits_per_dim(nats: torch.Tensor, dims: int) -> torch.Tensor:
    """Nats per example -> bits per dimension: nats / (dims * ln 2), dims = C * H * W."""
    return nats / (dims * math.log(2))
