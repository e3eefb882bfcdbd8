"""The standard error logged with every test bound."""

import math

import numpy as np
import pytest
import torch
from test_models import binary_images, quiet_trainer, small_vae
from torch.utils.data import DataLoader, TensorDataset

from lightning_modules.metrics import StandardError


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
