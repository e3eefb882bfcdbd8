"""The PixelCNN++ model: causal likelihood, exact bound, sampling and training, end to end."""

import itertools

import lightning as L
import pytest
import torch
from decoders import pixelcnnpp
from test_cli import QUIET, REPO, arvae, ok, read_report

from lightning_modules import PixelCNNpp
from lightning_modules.likelihoods import Categorical, DiscretizedLogisticMixture


def small(image_shape=(3, 5, 7), **kwargs) -> PixelCNNpp:
    torch.manual_seed(0)
    options = dict(
        pixelcnn=pixelcnnpp(nr_resnet=1, channels=8, dropout=0.0),
        likelihood=DiscretizedLogisticMixture(n_mix=2),
    )
    return PixelCNNpp(image_shape=image_shape, **{**options, **kwargs})


def images(n: int, shape, seed: int = 0, levels: int = 256) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, levels, (n, *shape), generator=g).float()


def trained_a_little(model: PixelCNNpp, x: torch.Tensor) -> PixelCNNpp:
    """Data-dependent init, then random perturbations: weights away from any symmetric start."""
    model.data_dependent_init(x)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def pixel_log_probs(model: PixelCNNpp, x: torch.Tensor) -> torch.Tensor:
    """(B, H, W): log p(x_ij | x_<ij) of every pixel, each scored as its own 1x1 image."""
    params = model.params(x)
    _, _, height, width = x.shape
    out = torch.empty(x.shape[0], height, width)
    for i, j in itertools.product(range(height), range(width)):
        pixel = (..., slice(i, i + 1), slice(j, j + 1))
        out[:, i, j] = model.likelihood.log_prob(params[pixel], x[pixel])
    return out


@pytest.mark.parametrize("shape", [(3, 5, 7), (1, 6, 5)])
def test_each_pixels_likelihood_depends_only_on_the_pixels_before_it(shape):
    """Changing pixel (i, j), every channel of it, changes no pixel's log-probability before
    (i, j) and does change some after it; the sum is the model's log-likelihood."""
    x = images(2, shape)
    model = trained_a_little(small(shape), x)
    with torch.no_grad():
        base = pixel_log_probs(model, x)
        torch.testing.assert_close(base.flatten(1).sum(1), -model.elbo_terms(x)["recon"])
        _, height, width = shape
        for i, j in itertools.product(range(height), range(width)):
            moved = x.clone()
            moved[:, :, i, j] = (moved[:, :, i, j] + 128) % 256
            changed = (pixel_log_probs(model, moved) - base).abs().amax(0) > 0
            before = torch.zeros(height, width, dtype=torch.bool)
            before.view(-1)[: i * width + j] = True
            assert not changed[before].any(), f"a pixel before ({i}, {j}) sees it"
            assert changed[i, j], f"pixel ({i}, {j}) does not depend on its own value"
            if (i, j) != (height - 1, width - 1):
                assert changed[~before].sum() > 1, f"no later pixel sees ({i}, {j})"


def test_within_a_pixel_green_and_blue_follow_red_through_the_coupling():
    """With one component and strong coefficients, p(G | R) moves with R and p(R) does not
    move with G or B: R -> G -> B inside the mixture."""
    lik = DiscretizedLogisticMixture(n_mix=1)
    params = torch.zeros(1, 10, 1, 1)
    params[:, 4:7] = -3.0  # log-scales: narrow
    params[:, 7:10] = 5.0  # coefficients: tanh(5) ~ 1
    colours = torch.tensor([[r, g, b] for r in (20, 200) for g in (20, 200) for b in (20, 200)])
    x = colours.float().view(-1, 3, 1, 1)
    joint = lik.log_prob(params.expand(len(x), -1, -1, -1), x).view(2, 2, 2)
    # where G ~ R and B ~ R + G (clamped) the probability is highest
    assert joint[1, 1, 1] > joint[1, 0, 1] and joint[0, 0, 0] > joint[0, 1, 0]
    # p(R) alone: sum over all G and B, the same for every (G, B) it is summed over
    all_gb = torch.cartesian_prod(torch.arange(256.0), torch.arange(256.0))
    for r in (20.0, 200.0):
        x = torch.cat([torch.full((len(all_gb), 1), r), all_gb], 1).view(-1, 3, 1, 1)
        marginal = torch.logsumexp(lik.log_prob(params, x), 0)
        single = DiscretizedLogisticMixture(n_mix=1).log_prob(
            params[:, [0, 1, 4]], torch.full((1, 1, 1, 1), r)
        )
        torch.testing.assert_close(marginal, single[0], atol=1e-4, rtol=0)


def test_the_bound_is_the_exact_likelihood_and_sums_to_one():
    """No latent: log_likelihood_bound is log p(x) for any k, and over all 2^4 images of a
    2x2 model with 1-bit levels the probabilities sum to one."""
    torch.manual_seed(0)
    model = PixelCNNpp(
        image_shape=(1, 2, 2),
        likelihood=DiscretizedLogisticMixture(n_mix=3, bits=1),
        pixelcnn=pixelcnnpp(nr_resnet=1, channels=8, dropout=0.0),
    )
    x = torch.cartesian_prod(*[torch.arange(2.0)] * 4).view(16, 1, 2, 2)
    model = trained_a_little(model, x)
    with torch.no_grad():
        log_p = model.log_likelihood_bound(x, 7)
        torch.testing.assert_close(log_p, -model.elbo_terms(x)["recon"])
    assert float(log_p.double().exp().sum()) == pytest.approx(1.0, abs=1e-5)


def test_sampling_fills_the_canvas_and_is_a_function_of_its_noise():
    x = images(4, (3, 5, 7))
    model = trained_a_little(small(), x)
    noise = model.sample_noise(3, torch.Generator().manual_seed(5))
    a, b = model.sample(3, noise), model.sample(3, noise)
    assert a.shape == (3, 3, 5, 7) and torch.equal(a, b)
    assert a.min() >= 0 and a.max() <= 255 and torch.equal(a, a.round())
    assert not torch.equal(a, model.sample(3))


def test_a_likelihood_that_draws_channels_in_turn_is_refused():
    with pytest.raises(ValueError, match="one parameter set per pixel"):
        small(likelihood=Categorical(256))


def test_data_dependent_init_runs_on_the_first_batch_only_and_training_lowers_the_loss(tmp_path):
    """Through a Trainer: the first batch initializes the weights (the flag is saved), every
    later step trains, lr decays per step, and the loss falls."""
    from tiny_data import TinyColour

    model = small((3, 8, 8), lr=3e-3, lr_decay=0.99)
    trainer = L.Trainer(
        max_steps=30,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    data = TinyColour(n_train=32, batch_size=8)
    trainer.fit(model, data)
    assert bool(model.initialized)
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(3e-3 * 0.99**30)
    x = next(iter(data.train_dataloader()))[0]
    with torch.no_grad():
        trained = model.elbo_terms(x)["recon"].mean()
        fresh = small((3, 8, 8))
        fresh.data_dependent_init(x)
        assert trained < 0.9 * fresh.elbo_terms(x)["recon"].mean()


def test_smoke_config_fits_and_tests_on_the_shipped_sample(tmp_path):
    """The CPU smoke config, shortened, through the CLI: fit, then test with exact bits/dim
    (the bound equals the ELBO: no latent) and a sample grid written to disk."""
    configs = REPO / "experiments" / "pixelcnnpp"
    run = arvae(
        "fit", "-c", str(configs / "cifar10.yaml"), "-c", str(configs / "cifar10_smoke.yaml"),
        *QUIET,
        "--trainer.max_epochs", "1",
        "--trainer.limit_train_batches", "3",
        "--trainer.limit_val_batches", "1",
        "--trainer.limit_test_batches", "2",
        "--data.init_args.eval_batch_size", "10",
        "--model.init_args.pixelcnn.init_args.channels", "8",
        cwd=tmp_path,
    )  # fmt: skip
    ok(run)
    run_dir = tmp_path / "runs" / "pixelcnnpp_cifar10_smoke" / "version_0"
    report = read_report(run_dir)
    metrics = report["metrics"]
    assert report["n_test_examples"] == 20
    assert metrics["test/bpd"] == pytest.approx(metrics["test/bpd_iwae"], rel=1e-6)
    # three steps from the data-dependent init (unit-variance mixture parameters): near the
    # 8 bits/dim of a uniform model, far from a broken one's
    assert 3.0 < metrics["test/bpd"] < 12.0
    assert sorted(p.name for p in (run_dir / "samples").glob("*.png"))
