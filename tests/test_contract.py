"""The model contract of base.py: declared terms, the one importance-weighting path and
configurable likelihoods."""

from pathlib import Path

import pytest
import torch
from decoders import gated
from test_cli import QUIET, arvae, ok, read_report

from lightning_modules import VLAE, HierarchicalPixelVAE, PixelCNN, PixelVAE
from lightning_modules.likelihoods import Bernoulli, Categorical


def binary_images(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.bernoulli(torch.full((n, 1, 28, 28), 0.3), generator=g)


def colour_images(n: int, size: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g).float()


def moved_off_start(model: torch.nn.Module) -> torch.nn.Module:
    """Random weights, so that importance samples give visibly different log weights."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


# odd latent sizes: CPU torch.randn draws vectors of fewer than 16 numbers, and blocks that
# are no multiple of 16, differently from one larger draw of the same numbers
LATENT_MODELS = {
    "PixelVAE": lambda: PixelVAE(latent_dim=5, pixelcnn=gated(n_layers=1, channels=8)),
    "VLAE-iaf": lambda: VLAE(
        latent_dim=7, width=4, blocks=1, flow_hidden=20, posterior="iaf", context_dim=3
    ),
    "Hierarchical": lambda: HierarchicalPixelVAE(
        image_shape=(3, 8, 8),
        latent_channels=(3, 5),
        latent_sizes=(4, 1),
        pixel_widths=(6, 8),
        latent_width=8,
        blocks=1,
        embed_dim=2,
        pixelcnn=gated(n_layers=1, channels=6, first_kernel=3, kernel=3),
        n_prior_layers=1,
        prior_channels=4,
    ),
}


@pytest.mark.parametrize("name", LATENT_MODELS)
def test_importance_samples_do_not_depend_on_chunk_or_batch_size(name):
    """Each example's bound is the same whether its k samples come in one chunk or in
    chunks of 1, 2 or 3, and in a batch of 7 or alone (as on another DDP rank), up to the
    float32 noise of other batch shapes (~2e-6 relative: other conv kernels); the noise of a
    chunk-sized draw moves it by 1e-3 to 0.5 relative."""
    model = moved_off_start(LATENT_MODELS[name]())
    x = colour_images(7) if name == "Hierarchical" else binary_images(7)
    index = torch.arange(100, 107)
    bounds = {}
    for iwae_batch in (10_000, 7, 14, 21):  # chunks of 20, 1, 2 and 3 samples for 7 images
        model.iwae_batch = iwae_batch
        with model.per_example_noise(index):
            bounds[iwae_batch] = model.log_likelihood_bound(x, 20)
    for bound in bounds.values():
        torch.testing.assert_close(bound, bounds[10_000], rtol=1e-5, atol=1e-3)
    model.iwae_batch = 10  # alone: chunks of 10
    for i in (0, 4, 6):
        with model.per_example_noise(index[i : i + 1]):
            alone = model.log_likelihood_bound(x[i : i + 1], 20)
        torch.testing.assert_close(alone, bounds[10_000][i : i + 1], rtol=1e-5, atol=1e-3)
    # the samples do differ: 20 of them give another bound than the first 3
    with model.per_example_noise(index):
        assert not torch.allclose(model.log_likelihood_bound(x, 3), bounds[10_000])


def test_importance_noise_is_each_samples_own_draw():
    """The noise of n samples per example is the first n of any longer run of samples."""
    model = LATENT_MODELS["Hierarchical"]()
    index = torch.tensor([3, 8])
    with model.per_example_noise(index):
        long = model.importance_noise(2, 9)
    with model.per_example_noise(index):
        short = [model.importance_noise(2, n) for n in (4, 5)]
    for level, shape in model.latent_shapes.items():
        assert long[level].shape == (2, 9, *shape)
        torch.testing.assert_close(torch.cat([s[level] for s in short], dim=1), long[level])


class WithDiagnostic(PixelVAE):
    """A model with an extra term of the bound and a diagnostic."""

    @property
    def term_kinds(self):
        return {**super().term_kinds, "extra": "bound", "ink": "diagnostic"}

    def elbo_terms(self, x):
        terms = super().elbo_terms(x)
        return {**terms, "extra": torch.full_like(terms["recon"], 2.0), "ink": x.sum((1, 2, 3))}


class Undeclared(PixelVAE):
    def elbo_terms(self, x):
        terms = super().elbo_terms(x)
        return {**terms, "aux_recon": torch.ones_like(terms["recon"])}


def small(cls, **kwargs):
    torch.manual_seed(0)
    return cls(latent_dim=3, pixelcnn=gated(n_layers=1, channels=8), **kwargs)


def test_declared_terms_build_the_bound_and_the_loss():
    """A declared bound term is in -ELBO, the loss and the IWAE bound's exact counterpart; a
    diagnostic is in none of them; warm-up and free bits touch the KL terms only."""
    model = small(WithDiagnostic, kl_warmup_steps=10)  # KL weight 0 at step 0
    x = binary_images(4)
    with model.per_example_noise(torch.arange(4)):
        terms = model.elbo_terms(x)
    nelbo = model.nelbo(terms)
    torch.testing.assert_close(nelbo, terms["recon"] + terms["kl/z"] + 2.0)
    torch.testing.assert_close(model.loss(terms), terms["recon"].mean() + 2.0)
    model.kl_warmup_steps, model.free_bits = 0, 50.0  # KL clamped at 50 nats x 3 dims
    torch.testing.assert_close(model.loss(terms), terms["recon"].mean() + 2.0 + 150.0)


def test_an_undeclared_term_fails_loudly():
    model = small(Undeclared)
    x = binary_images(2)
    with pytest.raises(KeyError, match="undeclared terms \\['aux_recon'\\]"):
        model.nelbo(model.elbo_terms(x))
    with pytest.raises(KeyError, match="aux_recon"):
        model.training_step((x, torch.arange(2)), 0)
    with pytest.raises(KeyError, match="lacks the declared bound terms \\['kl/z'\\]"):
        model.nelbo({"recon": torch.zeros(2)})


def test_the_likelihood_is_an_option_and_data_kind_only_the_default():
    """A PixelCNN with a 16-way categorical models 4-bit data, in bits/dim units of 8-bit
    data_kind; its probabilities sum to one over the 16 values of a 1x1 image."""
    torch.manual_seed(0)
    model = PixelCNN(
        image_shape=(1, 1, 1),
        data_kind="8bit",
        likelihood=Categorical(16),
        pixelcnn=gated(n_layers=1),
    ).eval()
    assert model.hparams.likelihood.n_values == 16
    values = torch.arange(16.0).view(16, 1, 1, 1)
    log_p = model.log_likelihood_bound(values, 1)
    assert float(log_p.exp().sum()) == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="16-way categorical.*0..15"):
        model.elbo_terms(torch.full((1, 1, 1, 1), 16.0))
    assert isinstance(PixelCNN(pixelcnn=gated(n_layers=1)).likelihood, Bernoulli)
    assert isinstance(
        PixelCNN(pixelcnn=gated(n_layers=1), data_kind="8bit").likelihood, Categorical
    )


@pytest.mark.parametrize(
    "likelihood, x, message",
    [
        (
            Categorical(256),
            torch.linspace(0.25, 0.75, 96).reshape(2, 3, 4, 4),
            "non-integer values in \\[0.25, 0.75\\]",
        ),
        (Categorical(256), torch.full((2, 3, 4, 4), 256.0), "0..255"),
        (Bernoulli(), torch.full((2, 1, 4, 4), 255.0), "binary data"),
        (Bernoulli(), torch.full((2, 1, 4, 4), 0.5), "non-integer"),
    ],
)
def test_likelihoods_reject_data_of_another_kind(likelihood, x, message):
    params = torch.zeros(2, likelihood.num_params(x.shape[1]), 4, 4)
    with pytest.raises(ValueError, match=message):
        likelihood.log_prob(params, x)


def test_a_checkpoint_of_main_before_the_contract_change_loads(tmp_path):
    """tests/fixtures/pixelcnn_274d61e.ckpt: a 1-layer PixelCNN fitted for one epoch on
    TinyBinary (8 test images) by main at 274d61e, the last commit before the likelihood
    option and the declared terms; tested there it gave test/nll_iwae 544.3671875. It loads
    with no config and gives the same number."""
    ckpt = Path(__file__).parent / "fixtures" / "pixelcnn_274d61e.ckpt"
    named = ["--trainer.logger.init_args.name", "old"]
    run = arvae("test", "--ckpt_path", str(ckpt), *QUIET, *named, cwd=tmp_path)
    ok(run)
    report = read_report(tmp_path / "runs" / "old" / "version_0")
    assert report["n_test_examples"] == 8
    assert report["metrics"]["test/nll_iwae"] == pytest.approx(544.3671875, rel=1e-6)
