"""The standard error logged with every test bound, and the active units of every latent."""

import math

import numpy as np
import pytest
import torch
from test_models import binary_images, quiet_trainer, small_vae
from torch.utils.data import DataLoader, TensorDataset

from lightning_modules.metrics import ActiveUnits, StandardError


def test_standard_error_matches_numpy_over_updates_and_merged_ranks():
    """Large per-image values (8-bit data: thousands of nats) with a small spread, fed in
    uneven batches and split over two metrics merged as DDP ranks' states are summed."""
    rng = np.random.default_rng(0)
    values = 6000.0 + rng.normal(0.0, 3.0, size=257)
    expected = values.std(ddof=1) / math.sqrt(len(values))
    one, rank0, rank1 = StandardError(), StandardError(), StandardError()
    for part in np.split(values, [5, 100, 101]):
        one.update(torch.tensor(part, dtype=torch.float32))
    rank0.update(torch.tensor(values[:130]))
    rank1.update(torch.tensor(values[130:]))
    rank0.merge_state(rank1)
    float32_values = values.astype(np.float32).astype(np.float64)  # what `one` was given
    assert float(one.compute()) == pytest.approx(float32_values.std(ddof=1) / math.sqrt(257))
    assert float(rank0.compute()) == pytest.approx(expected, rel=1e-9)


def test_standard_error_of_fewer_than_two_values_is_nan():
    metric = StandardError()
    metric.update(torch.tensor([80.0]))
    assert math.isnan(float(metric.compute()))


def test_test_bounds_come_with_the_standard_error_of_their_per_example_values(tmp_path):
    """test/<bound>_se is the standard error over examples, not over batch means: computed
    from each example's bound with that example's evaluation noise."""
    model = small_vae(iwae_k=3)
    x = binary_images(10)
    index = torch.arange(10)
    loader = DataLoader(TensorDataset(x, index), batch_size=4)
    metrics = quiet_trainer(tmp_path).test(model, loader, verbose=False)[0]
    with torch.no_grad(), model.per_example_noise(index):
        nelbo = model.nelbo(model.elbo_terms(x)).double()
    with torch.no_grad(), model.per_example_noise(index):
        model.elbo_terms(x)  # the test draws the ELBO's noise before the bound's
        nll = -model.log_likelihood_bound(x, 3).double()
    for key, per_example in (("nelbo", nelbo), ("nll_iwae", nll)):
        assert metrics[f"test/{key}"] == pytest.approx(float(per_example.mean()), rel=1e-5)
        se = float(per_example.std() / math.sqrt(10))
        assert se > 0.01 and metrics[f"test/{key}_se"] == pytest.approx(se, rel=1e-4), key


def test_active_units_count_the_units_whose_posterior_mean_varies_over_x():
    """Units with variance over x of 0, 0.005, 0.02 and 1 around a large offset: 2 are active
    (> 0.01), the same fed in uneven batches or split over two merged ranks."""
    rng = np.random.default_rng(0)
    std = np.sqrt([0.0, 0.005, 0.02, 1.0])
    means = 50.0 + rng.standard_normal((400, 4)) * std / rng.standard_normal((400, 4)).std(0)
    means = means.reshape(400, 2, 2)  # a latent map: units are the flattened positions
    variances = means.reshape(400, 4).var(0, ddof=1)
    one, rank0, rank1 = ActiveUnits(4), ActiveUnits(4), ActiveUnits(4)
    for part in np.split(means, [3, 200, 201]):
        one.update(torch.tensor(part))
    rank0.update(torch.tensor(means[:150]))
    rank1.update(torch.tensor(means[150:]))
    rank0.merge_state(rank1)
    for metric in (one, rank0):
        np.testing.assert_allclose(metric.variances().numpy(), variances, rtol=1e-6, atol=1e-9)
        assert float(metric.compute()) == (variances > 0.01).sum() == 2
    with pytest.raises(ValueError, match="expected 4 units, got 3"):
        one.update(torch.zeros(2, 3))


def test_active_units_of_a_collapsed_and_of_an_informative_encoder(tmp_path):
    """At initialization PixelVAE's encoder ignores x (its last layer is zero): 0 active
    units. With last-layer weights that move the means of units 0 and 1 with x (variance
    ~0.05) and those of units 2 and 3 barely (~0.0005), 2 are active, at validation and test
    alike, as the posterior means' own variance over the set says."""
    x, index = binary_images(24), torch.arange(24)
    loader = DataLoader(TensorDataset(x, index), batch_size=10)
    model = small_vae(iwae_k=1)
    tested = quiet_trainer(tmp_path).test(model, loader, verbose=False)[0]
    assert tested["test/active_units/z"] == 0
    torch.manual_seed(1)
    weight = model.encoder[-1].weight  # rows 0-3: the means of z's 4 units, then log-stds
    with torch.no_grad():
        weight[:4] = torch.randn_like(weight[:4]) * torch.tensor([0.1, 0.1, 0.01, 0.01])[:, None]
        variances = model.posterior_mean(x)["z"].double().var(0)
    assert (variances[:2] > 0.02).all() and (variances[2:] < 0.002).all()
    assert (
        quiet_trainer(tmp_path).validate(model, loader, verbose=False)[0]["val/active_units/z"] == 2
    )
    assert quiet_trainer(tmp_path).test(model, loader, verbose=False)[0]["test/active_units/z"] == 2
