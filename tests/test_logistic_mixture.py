"""DiscretizedLogisticMixture: normalization over every colour, agreement with a plain float64
evaluation, extremes, bf16 autocast, sampling (ordinary, variance-reduced, MAP), checks."""

import math

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from scipy.stats import chi2

from lightning_modules.backbone.autoregressive import sample_autoregressive
from lightning_modules.likelihoods import DiscretizedLogisticMixture


def random_params(seed, n_mix, channels, shape=(1, 1, 1), big=False):
    """(B, P, H, W) parameters in the documented layout: logits, means, log-scales, coeffs."""
    gen = torch.Generator().manual_seed(seed)
    b, h, w = shape

    def draw(count, low, high):
        return low + (high - low) * torch.rand(b, count, h, w, generator=gen)

    logits = torch.randn(b, n_mix, h, w, generator=gen) * (8.0 if big else 1.5)
    means = draw(channels * n_mix, *((-3.0, 3.0) if big else (-1.1, 1.1)))
    log_scales = draw(channels * n_mix, *((-9.0, 2.0) if big else (-4.0, 0.5)))
    groups = [logits, means, log_scales]
    if channels == 3:
        groups.append(torch.randn(b, 3 * n_mix, h, w, generator=gen) * (3.0 if big else 1.0))
    return torch.cat(groups, 1)


def pixel(logits, means, log_scales, coeffs=None):
    """One pixel's parameters from per-component lists (means etc. as [colour][component])."""
    groups = [logits, means, log_scales] + ([coeffs] if coeffs is not None else [])
    return torch.tensor([v for g in groups for v in torch.tensor(g).flatten().tolist()]).view(
        1, -1, 1, 1
    )


def all_colours(levels, channels, start=0, stop=None):
    """Every colour (levels**channels of them, or the slice start:stop) as (N, C, 1, 1)."""
    idx = torch.arange(start, levels**channels if stop is None else stop)
    digits = [(idx // levels**p) % levels for p in reversed(range(channels))]
    return torch.stack(digits, 1)[:, :, None, None]


def total_probability(lik, params, channels, chunk=2**17):
    """sum_x p(x) over every colour of one pixel, with the class's log_prob, in float64."""
    n = lik.n_levels**channels
    total = 0.0
    with torch.no_grad():
        for start in range(0, n, chunk):
            x = all_colours(lik.n_levels, channels, start, min(n, start + chunk))
            total += lik.log_prob(params, x).double().exp().sum().item()
    return total


def reference_log_prob(params, x, n_mix, bits, log_scale_min=-7.0):
    """The formula written out plainly in float64: CDF differences of sigmoids (taken on the
    side of the mean where they do not cancel), the RGB coupling, a logsumexp."""
    p, x = params.double(), x.double()
    b, c, h, w = x.shape
    k = 2**bits
    half = 1.0 / (k - 1)
    logits = p[:, :n_mix]
    means = p[:, n_mix : (1 + c) * n_mix].reshape(b, c, n_mix, h, w).clone()
    log_scales = p[:, (1 + c) * n_mix : (1 + 2 * c) * n_mix].reshape(b, c, n_mix, h, w)
    scales = log_scales.clamp(min=log_scale_min).exp()
    y = (2 * x / (k - 1) - 1)[:, :, None]
    if c == 3:
        coeffs = torch.tanh(p[:, 7 * n_mix :].reshape(b, 3, n_mix, h, w))
        means[:, 1] += coeffs[:, 0] * y[:, 0]
        means[:, 2] += coeffs[:, 1] * y[:, 0] + coeffs[:, 2] * y[:, 1]
    upper, lower = (y + half - means) / scales, (y - half - means) / scales
    bottom, top = (x == 0)[:, :, None], (x == k - 1)[:, :, None]
    cdf_upper = torch.where(top, 1.0, torch.sigmoid(upper))
    cdf_lower = torch.where(bottom, 0.0, torch.sigmoid(lower))
    sf_lower = torch.where(bottom, 1.0, torch.sigmoid(-lower))
    sf_upper = torch.where(top, 0.0, torch.sigmoid(-upper))
    mass = torch.where(y > means, sf_lower - sf_upper, cdf_upper - cdf_lower)
    log_components = F.log_softmax(logits, 1) + mass.log().sum(1)
    return torch.logsumexp(log_components, 1).sum((1, 2))


# 1. normalization


def test_every_8bit_colour_sums_to_one():
    """All 256^3 colours (a minute per mixture size on a CPU core: 3 logistics here; the
    quantized sums below take 7 and 10 over every colour at 3 to 5 bits)."""
    lik = DiscretizedLogisticMixture(n_mix=3)
    params = random_params(1, 3, 3, big=True)
    assert abs(total_probability(lik, params, 3) - 1) < 1e-5


@pytest.mark.parametrize("bits", [3, 4, 5])
@pytest.mark.parametrize("seed, n_mix, big", [(0, 3, False), (1, 7, True), (2, 10, True)])
def test_every_quantized_colour_sums_to_one(bits, seed, n_mix, big):
    lik = DiscretizedLogisticMixture(n_mix=n_mix, bits=bits)
    params = random_params(seed, n_mix, 3, big=big)
    assert abs(total_probability(lik, params, 3) - 1) < 1e-5


@pytest.mark.parametrize("seed", range(10))
def test_every_grey_level_sums_to_one(seed):
    n_mix = 3 + seed % 8
    lik = DiscretizedLogisticMixture(n_mix=n_mix)
    assert (
        abs(total_probability(lik, random_params(seed, n_mix, 1, big=seed % 2 == 1), 1) - 1) < 1e-5
    )


@pytest.mark.parametrize("bits", [1, 3, 8])
def test_one_logistic_normalizes_for_extreme_means_and_scales(bits):
    """The per-colour factor every RGB sum rests on, over a grid far beyond the usual range."""
    lik = DiscretizedLogisticMixture(n_mix=1, bits=bits)
    means, log_scales = torch.meshgrid(
        torch.tensor([-60.0, -5, -1, -0.3, 0, 0.77, 1, 1.01, 5, 60]),
        torch.tensor([-30.0, -7, -5, -2, 0, 3, 10, 40, 100]),
        indexing="ij",
    )
    m = means.numel()
    params = torch.stack([torch.zeros(m), means.flatten(), log_scales.flatten()], 1)
    levels = torch.arange(lik.n_levels)
    log_p = lik.log_prob(
        params.repeat(lik.n_levels, 1)[:, :, None, None],
        levels.repeat_interleave(m)[:, None, None, None],
    )
    totals = log_p.view(lik.n_levels, m).double().exp().sum(0)
    assert torch.allclose(totals, torch.ones(m, dtype=torch.float64), atol=1e-5)


# 2. against the plain float64 formula


@pytest.mark.parametrize("channels, n_mix, bits", [(3, 5, 8), (3, 10, 4), (1, 4, 8), (1, 2, 5)])
def test_matches_float64_reference(channels, n_mix, bits):
    lik = DiscretizedLogisticMixture(n_mix=n_mix, bits=bits)
    params = random_params(7 * n_mix + bits, n_mix, channels, shape=(4, 5, 6))
    x = torch.randint(0, 2**bits, (4, channels, 5, 6), generator=torch.Generator().manual_seed(3))
    x[0, :, 0] = 0  # both edge levels present
    x[0, :, 1] = 2**bits - 1
    got, want = lik.log_prob(params, x), reference_log_prob(params, x, n_mix, bits)
    assert got.dtype == torch.float32 and got.shape == (4,)
    # float32 limits both: an image's total of hundreds of nats has an ulp of 3e-5, and a
    # pixel's value carries the rounding of standardized values (y - m) / s of size 10..60
    torch.testing.assert_close(got.double(), want, rtol=5e-7, atol=1e-5)
    pixels = rearrange(params, "b p h w -> (b h w) p 1 1")
    values = rearrange(x, "b c h w -> (b h w) c 1 1")
    got_px, want_px = lik.log_prob(pixels, values), reference_log_prob(pixels, values, n_mix, bits)
    error = (got_px.double() - want_px).abs()
    assert (error <= 1e-5 + 1e-6 * want_px.abs()).all() and error.mean() < 2e-6


# 3. extremes


def test_extreme_parameters_give_finite_values_and_gradients():
    lik = DiscretizedLogisticMixture(n_mix=4)
    params = pixel(
        logits=[1e4, -1e4, 0.0, 30.0],
        means=[[50.0, -50.0, 0.3, 1.0], [-50.0, 50.0, -1.0, 0.0], [0.0, 2.0, -2.0, 50.0]],
        log_scales=[[-7.0, -20.0, 10.0, 100.0], [-20.0, 10.0, -7.0, -7.0], [10.0, -7.0, -20, 0]],
        coeffs=[[40.0, -40.0, 0.0, 1.0]] * 3,
    ).repeat(6, 1, 1, 1)
    params.requires_grad_(True)
    x = torch.tensor([[0, 0, 0], [255, 255, 255], [255, 0, 128], [0, 255, 0], [1, 254, 7], [0] * 3])
    log_p = lik.log_prob(params, x[:, :, None, None])
    assert torch.isfinite(log_p).all()
    (-log_p.sum()).backward()
    assert torch.isfinite(params.grad).all()
    grey = DiscretizedLogisticMixture(n_mix=1)
    for m, log_s in [(50.0, -7.0), (-50.0, -20.0), (50.0, 10.0), (0.0, 100.0), (3.0, -100.0)]:
        p = pixel([0.0], [m], [log_s]).repeat(256, 1, 1, 1).requires_grad_(True)
        log_p = grey.log_prob(p, torch.arange(256.0)[:, None, None, None])
        log_p.sum().backward()
        assert torch.isfinite(log_p).all() and torch.isfinite(p.grad).all()


def test_extreme_parameters_give_sensible_probabilities():
    grey = DiscretizedLogisticMixture(n_mix=1)

    def log_p(m, log_s, value):
        x = torch.tensor([[[[float(value)]]]])
        return grey.log_prob(pixel([0.0], [m], [log_s]), x).item()

    assert log_p(50.0, -7.0, 255) > -1e-6 and log_p(50.0, -7.0, 0) < -1e4  # all mass on 255
    assert log_p(-50.0, 0.0, 0) > -1e-6 and log_p(-50.0, 0.0, 255) < -40
    assert log_p(50.0, 10.0, 255) > log_p(50.0, 10.0, 0)
    # below log_scale_min the scale is clamped: the same as at the minimum
    assert log_p(0.2, -20.0, 153) == log_p(0.2, -7.0, 153)
    # a very broad logistic: half the mass in each edge, interior bins of mass 2h / (4 s)
    for log_s in (10.0, 40.0, 100.0):
        assert log_p(0.0, log_s, 0) == pytest.approx(math.log(0.5), abs=1e-3)
        assert log_p(0.0, log_s, 255) == pytest.approx(math.log(0.5), abs=1e-3)
        want = math.log(2 / 255 / 4) - log_s
        assert log_p(0.0, log_s, 128) == pytest.approx(want, rel=1e-5, abs=1e-4)
    # far in the tail of a narrow logistic: the exact bin mass, not the density at the centre
    # (about -103.21 nats; PixelCNN++'s approximation gives -105.36)
    assert log_p(0.0, -7.0, 140) == pytest.approx(-103.2127, abs=1e-3)
    # a mixture with one dominant logit is that component
    lik = DiscretizedLogisticMixture(n_mix=2)
    two = pixel([1e4, -1e4], [-0.5, 0.5], [-3.0, -3.0])
    one = pixel([0.0], [-0.5], [-3.0])
    x = torch.tensor([[[[64.0]]]])
    assert lik.log_prob(two, x).item() == pytest.approx(grey.log_prob(one, x).item(), abs=1e-6)


# 4. bf16 autocast


def test_bf16_autocast_keeps_a_float32_likelihood():
    lik = DiscretizedLogisticMixture(n_mix=5)
    params = random_params(11, 5, 3, shape=(2, 4, 4)).bfloat16()
    x = torch.randint(0, 256, (2, 3, 4, 4), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = lik.log_prob(params, x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, lik.log_prob(params.float(), x), rtol=0, atol=0)


# 5. sampling


def empirical_matches(lik, params, draws, seed, channels):
    """Chi-square of ``draws`` ordinary samples of one pixel against its log_prob."""
    n_colours = lik.n_levels**channels
    colours = all_colours(lik.n_levels, channels)
    probs = lik.log_prob(params, colours).double().exp()
    noise = lik.noise((draws, channels, 1, 1), torch.Generator().manual_seed(seed))
    samples = lik.sample(params.expand(draws, -1, -1, -1), noise)[:, :, 0, 0].long()
    code = sum(samples[:, c] * lik.n_levels ** (channels - 1 - c) for c in range(channels))
    counts = torch.bincount(code, minlength=n_colours).double()
    expected = probs * draws
    big = expected >= 5  # lump the rare cells together
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    keep = exp > 0
    stat = (((obs - exp) ** 2)[keep] / exp[keep]).sum().item()
    return stat < chi2.ppf(0.999, int(keep.sum()) - 1)


def test_ordinary_samples_follow_the_probabilities():
    grey = DiscretizedLogisticMixture(n_mix=3, bits=3)
    params = pixel([0.5, -0.3, 1.0], [-0.6, 0.1, 0.9], [-1.5, -2.5, -1.0])
    assert empirical_matches(grey, params, 20000, seed=0, channels=1)
    # the RGB joint, coupling included: the draws condition on the levels already drawn
    rgb = DiscretizedLogisticMixture(n_mix=2, bits=2)
    params = pixel(
        [0.3, -0.2],
        [[-0.3, 0.4], [0.0, -0.5], [0.2, 0.1]],
        [[-1.0, -1.5], [-1.2, -0.8], [-1.5, -1.0]],
        [[1.5, -0.8], [-1.0, 0.5], [0.7, 2.0]],
    )
    assert empirical_matches(rgb, params, 20000, seed=1, channels=3)


@pytest.mark.parametrize("sampling", ["ordinary", "variance_reduced", "map"])
def test_samples_are_deterministic_given_noise_and_integer_levels(sampling):
    lik = DiscretizedLogisticMixture(n_mix=4, bits=5, sampling=sampling)
    params = random_params(5, 4, 3, shape=(3, 4, 5), big=True)
    noise = lik.noise((3, 3, 4, 5), torch.Generator().manual_seed(0))
    assert noise.shape == (3, 4, 4, 5) and 0 <= noise.min() and noise.max() < 1
    first, second = lik.sample(params, noise), lik.sample(params, noise.clone())
    assert torch.equal(first, second)
    fresh = lik.sample(params)
    for s in (first, fresh, lik.mode(params)):
        assert s.shape == (3, 3, 4, 5) and s.dtype == torch.float32
        assert torch.equal(s, s.round()) and s.min() >= 0 and s.max() <= 31


def test_map_sampling_takes_the_coupled_rounded_mean_of_the_drawn_component():
    logits = [0.2, 1.0, -0.5]
    means = [[-0.5, 0.31, 0.9], [0.1, -0.2, 0.4], [-0.3, 0.6, 2.0]]
    coeffs = [[0.4, -1.2, 0.0], [0.9, 0.3, -0.4], [-0.6, 2.5, 1.1]]
    params = pixel(logits, means, [[-2.0] * 3] * 3, coeffs)
    lik = DiscretizedLogisticMixture(n_mix=3, sampling="map")
    cdf = torch.tensor(logits).softmax(0).cumsum(0).tolist()
    edges = [0.0, *cdf]

    def expected(k):
        a, b, g = (math.tanh(coeffs[j][k]) for j in range(3))

        def level(m):
            return round((min(max(m, -1.0), 1.0) + 1) * 127.5)

        r = level(means[0][k])
        y_r = 2 * r / 255 - 1
        gr = level(means[1][k] + a * y_r)
        y_g = 2 * gr / 255 - 1
        return [r, gr, level(means[2][k] + b * y_r + g * y_g)]

    for k in range(3):
        noise = torch.rand(1, 4, 1, 1)
        noise[0, 0] = (edges[k] + edges[k + 1]) / 2  # picks component k
        assert lik.sample(params, noise)[0, :, 0, 0].tolist() == expected(k)
    assert lik.mode(params)[0, :, 0, 0].tolist() == expected(1)  # the largest logit


def test_variance_reduced_sampling_lowers_the_variance():
    n = 20000
    noise = DiscretizedLogisticMixture().noise((n, 1, 1, 1), torch.Generator().manual_seed(2))

    def variance(params, **kwargs):
        lik = DiscretizedLogisticMixture(n_mix=params.shape[1] // 3, **kwargs)
        return lik.sample(params.expand(n, -1, -1, -1), noise).var().item()

    single = pixel([0.0], [0.0], [-2.5])
    mixture = pixel([0.0, 0.5, -1.0], [-0.4, 0.1, 0.5], [-2.0, -1.5, -3.0])
    for params in (single, mixture):
        assert variance(params, sampling="variance_reduced") < variance(params)
    # one logistic: the same noise scales the draws by exp(-shift), the variance by exp(-2 shift)
    ratio = variance(single, sampling="variance_reduced", log_scale_shift=0.5) / variance(single)
    assert ratio == pytest.approx(math.exp(-1.0), rel=0.03)
    assert variance(mixture, sampling="variance_reduced", log_scale_shift=0.0) == variance(mixture)


def test_rgb_coupling_shows_in_the_samples():
    n = 5000
    lik = DiscretizedLogisticMixture(n_mix=1)
    noise = lik.noise((n, 3, 1, 1), torch.Generator().manual_seed(4))
    correlations = {}
    for c0 in (20.0, 0.0):  # tanh(20) = 1: G's mean follows R
        params = pixel([0.0], [[0.0], [0.0], [0.0]], [[-1.5], [-5.0], [-5.0]], [[c0], [0], [0]])
        s = lik.sample(params.expand(n, -1, -1, -1), noise)[:, :, 0, 0]
        correlations[c0] = torch.corrcoef(s[:, :2].T)[0, 1].item()
    assert correlations[20.0] > 0.99 and abs(correlations[0.0]) < 0.05


def test_autoregressive_sampling_with_per_position_noise():
    lik = DiscretizedLogisticMixture(n_mix=3, bits=4)
    params = random_params(9, 3, 3)

    def params_fn(x, rows):
        return params.expand(x.shape[0], -1, x.shape[2], x.shape[3])

    shape = (2, 3, 3, 4)
    noise = lik.noise(shape, torch.Generator().manual_seed(0))
    kwargs = dict(noise=noise, sequential_channels=lik.sequential_channels)
    first = sample_autoregressive(params_fn, lik.sample, shape, **kwargs)
    assert torch.equal(first, sample_autoregressive(params_fn, lik.sample, shape, **kwargs))
    assert torch.equal(first, lik.sample(params.expand(2, -1, 3, 4), noise))
    assert first.min() >= 0 and first.max() <= 15


# 6. checks and layout


def test_check_rejects_data_of_another_kind():
    lik = DiscretizedLogisticMixture(n_mix=2)
    params = random_params(0, 2, 3, shape=(2, 2, 2))
    with pytest.raises(ValueError, match="non-integer"):
        lik.log_prob(params, torch.rand(2, 3, 2, 2))
    with pytest.raises(ValueError, match=r"0\.\.255.*\[0, 256\]"):
        lik.check(torch.tensor([0, 17, 256]).view(1, 3, 1, 1))
    with pytest.raises(ValueError, match=r"0\.\.255"):
        lik.check(torch.full((1, 3, 1, 1), -1.0))
    with pytest.raises(ValueError, match=r"0\.\.7"):
        DiscretizedLogisticMixture(bits=3).check(torch.full((1, 1, 1, 1), 8))
    lik.check(torch.randint(0, 256, (2, 3, 2, 2), dtype=torch.uint8))
    with pytest.raises(ValueError, match="C = 3.*C = 1"):
        lik.log_prob(params, torch.zeros(2, 1, 2, 2))


def test_num_params_network_input_and_arguments():
    lik = DiscretizedLogisticMixture(n_mix=10)
    assert lik.num_params(3) == 100 and lik.num_params(1) == 30
    assert DiscretizedLogisticMixture(n_mix=4).num_params(3) == 40
    with pytest.raises(ValueError, match="C = 2"):
        lik.num_params(2)
    with pytest.raises(ValueError, match="parameter channels"):
        lik.log_prob(torch.zeros(1, 20, 1, 1), torch.zeros(1, 1, 1, 1))
    assert lik.sequential_channels is False
    x = torch.tensor([0, 51, 255], dtype=torch.uint8)
    assert lik.network_input(x).tolist() == pytest.approx([-1.0, -0.6, 1.0])
    with pytest.raises(ValueError, match="sampling"):
        DiscretizedLogisticMixture(sampling="greedy")
    assert "n_mix=10" in repr(lik)
