"""Hierarchical PixelVAE (§3.1, E.2): its bound, its KL estimator, sampling and options."""

import pytest
import torch
from decoders import gated

from lightning_modules import HierarchicalPixelVAE
from lightning_modules.hierarchical_pixelvae import last_layer
from lightning_modules.likelihoods import Categorical, DiagonalGaussian, GaussianOutput

TINY = dict(
    image_shape=(3, 8, 8),
    latent_channels=(2, 3),
    latent_sizes=(4, 1),
    pixel_widths=(6, 8),
    latent_width=8,
    embed_dim=2,
    pixelcnn=gated(n_layers=1, channels=6, first_kernel=3, kernel=3),
    n_prior_layers=1,
    prior_channels=4,
    iwae_batch=100_000,
)


def tiny_model(**kwargs) -> HierarchicalPixelVAE:
    torch.manual_seed(0)
    return HierarchicalPixelVAE(**{**TINY, **kwargs}).eval()


def colour_images(n: int, seed: int = 0) -> torch.Tensor:
    """8-bit images with structure: a bright square on a dark background, plus noise."""
    g = torch.Generator().manual_seed(seed)
    base = torch.full((n, 3, 8, 8), 40.0)
    base[:, 0, 2:6, 2:6] = 200.0
    return (base + torch.randint(-20, 21, base.shape, generator=g)).clamp(0, 255)


def move_posteriors_off_the_prior(model: HierarchicalPixelVAE) -> None:
    """Posterior means/stds away from N(0, I), so that the bounds differ by more than noise."""
    with torch.no_grad():
        for head in model.posteriors:
            bias = last_layer(head).bias
            half = bias.shape[0] // 2
            bias[:half] = 1.0
            bias[half:] = -1.0


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(prior="gaussian"),
        dict(latent_channels=(2,), latent_sizes=(4,)),
        dict(pixelcnn=None),
        dict(latent_channels=(2, 2, 3), latent_sizes=(8, 4, 1), pixel_widths=(6,)),
    ],
    ids=["two-level", "gaussian-prior", "one-level", "factorized-output", "three-level"],
)
def test_iwae_bound_is_above_elbo_and_tightens_with_k(kwargs):
    model = tiny_model(**kwargs)
    move_posteriors_off_the_prior(model)
    x = colour_images(4)
    index = torch.arange(4)
    with torch.no_grad(), model.per_example_noise(index):
        elbo = torch.stack([-model.nelbo(model.elbo_terms(x)) for _ in range(20)]).mean()
        bounds = [model.log_likelihood_bound(x, k).mean() for k in (1, 10, 100)]
    assert all(a <= b + 1e-2 for a, b in zip(bounds, bounds[1:], strict=False)), bounds
    assert bounds[-1] > elbo
    with torch.no_grad(), model.per_example_noise(index):
        l1 = torch.stack([model.log_likelihood_bound(x, 1) for _ in range(50)]).mean()
    # L_1 is an unbiased estimate of the ELBO
    assert abs(float(l1 - elbo)) < 0.01 * abs(float(elbo))


def test_kl_estimator_matches_monte_carlo_kl():
    """kl/z1 (per-dimension analytic KLs against the PixelCNN prior, fed one z1 ~ q) has the
    same expectation as the Monte-Carlo KL log q(z1|x) - log p(z1|z2) over (z1, z2) ~ q."""
    model = tiny_model()
    move_posteriors_off_the_prior(model)
    x = colour_images(1).expand(4000, 3, 8, 8)
    with torch.no_grad():
        posteriors = model.encode(x)
        (z1, z2), _ = model.sample_posteriors(posteriors)
        prior = model.prior_params(0, z1, z2)
        estimator = DiagonalGaussian.kl(*posteriors[0], *prior).flatten(1).sum(1)
        monte_carlo = DiagonalGaussian.log_prob(*posteriors[0], z1) - DiagonalGaussian.log_prob(
            *prior, z1
        )
        terms = model.elbo_terms(x[:500])
    # same mean within 4 standard errors of the (noisier) Monte-Carlo estimate
    stderr = float(monte_carlo.std()) / len(x) ** 0.5
    assert abs(float(estimator.mean() - monte_carlo.mean())) < 4 * stderr
    assert float(estimator.std()) < float(monte_carlo.std())  # and it has lower variance
    assert (
        abs(float(terms["kl/z1"].mean() - estimator.mean())) < 4 * float(estimator.std()) / 500**0.5
    )
    # the top level's KL is analytic against N(0, I)
    top = DiagonalGaussian.kl_standard_normal(*posteriors[1]).flatten(1).sum(1)
    torch.testing.assert_close(terms["kl/z2"], top[:500])


def test_terms_levels_and_free_bits_dimensions():
    model = tiny_model()
    assert model.levels == ["z1", "z2"]
    assert model.latent_dims == {"z1": 2 * 4 * 4, "z2": 3}
    terms = model.elbo_terms(colour_images(2))
    assert set(terms) == {"recon", "kl/z1", "kl/z2"}
    assert all(v.shape == (2,) for v in terms.values())


def test_training_steps_lower_the_loss():
    model = tiny_model().train()
    x = colour_images(16)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        loss = model.loss(model.elbo_terms(x))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.85 * sum(losses[:5]) / 5


def test_fixed_noise_makes_sampling_deterministic_and_each_level_matters():
    model = tiny_model()
    noise = model.sample_noise(3, torch.Generator().manual_seed(0))
    assert list(noise) == ["z2", "z1", "x"]
    first = model.sample(3, noise)
    assert first.shape == (3, 3, 8, 8) and torch.equal(first, first.round())
    assert 0 <= first.min() and first.max() <= 255
    torch.testing.assert_close(model.sample(3, noise), first)
    fresh = model.sample_noise(3, torch.Generator().manual_seed(1))
    for level in noise:
        changed = model.sample(3, {**noise, level: fresh[level]})
        assert not torch.equal(changed, first), f"noise of {level} has no effect"


def test_reconstructions_from_every_level():
    model = tiny_model()
    x = colour_images(2)
    for level in model.levels:
        out = model.reconstruct(x, level)
        assert out.shape == x.shape and torch.equal(out, out.round())


def test_invalid_level_layouts_are_rejected():
    with pytest.raises(ValueError, match="pixel_widths needs 2 entries"):
        HierarchicalPixelVAE(**{**TINY, "pixel_widths": (6, 8, 10)})
    with pytest.raises(ValueError, match="must decrease"):
        HierarchicalPixelVAE(**{**TINY, "latent_sizes": (4, 8)})
    with pytest.raises(ValueError, match="one entry per level"):
        HierarchicalPixelVAE(**{**TINY, "latent_channels": (2,)})
    with pytest.raises(ValueError, match="multiple of n_colors"):
        HierarchicalPixelVAE(**{**TINY, "pixelcnn": gated(n_layers=1, channels=4)})
    with pytest.raises(ValueError, match=r"expects images shaped \(B, 3, 8, 8\)"):
        tiny_model().elbo_terms(torch.zeros(2, 1, 8, 8))


def test_the_model_holds_two_likelihoods_pixels_and_latent_maps():
    """p(x | z1) is the pixel likelihood, p(z_i | z_{i+1}) the latent one (a diagonal
    Gaussian output head): the prior networks emit its parameters, and the bound scores the
    latent maps through its log_prob (equal to the analytic Gaussian density)."""
    model = tiny_model()
    assert isinstance(model.likelihood, Categorical)
    assert isinstance(model.latent_likelihood, GaussianOutput)
    c1 = model.latent_shapes["z1"][0]
    assert model.priors[0].head.out.out_channels == model.latent_likelihood.num_params(c1)
    z1, z2 = torch.randn(2, *model.latent_shapes["z1"]), torch.randn(2, *model.latent_shapes["z2"])
    with torch.no_grad():
        params = model.prior_output(0, z1, z2)
        mean, log_std = model.prior_params(0, z1, z2)
        torch.testing.assert_close(
            model.latent_likelihood.log_prob(params, z1),
            DiagonalGaussian.log_prob(mean, log_std, z1),
        )
