"""VLAE (Chen et al. 2017): the local PixelCNN, weight norm with data-dependent init, the
model's bounds under every prior / posterior / decoder switch, free bits, Polyak averaging
at evaluation and the lossy-code figure."""

import copy

import lightning as L
import pytest
import torch
from tiny_data import TinyBinary
from torch import nn

from callbacks import LossyCode, PolyakAveraging
from lightning_modules import VLAE
from lightning_modules.backbone import LocalPixelCNN, data_dependent_init_, weight_norm_

SMALL = dict(width=8, blocks=1, latent_dim=6, flow_hidden=24, context_dim=5, iwae_batch=64)
VARIANTS = {
    "vlae": {},
    "iaf_posterior": dict(prior="gaussian", posterior="iaf"),
    "af_and_iaf_affine": dict(posterior="iaf", flow_mean_only=False),
    "gaussian": dict(prior="gaussian"),
    "factorized_af": dict(pixelcnn=None),
    "unconditional": dict(latent=False),
}


def digits(n: int = 12) -> torch.Tensor:
    dm = TinyBinary(n_train=n)
    dm.setup("fit")
    return torch.stack([dm.train_set[i][0] for i in range(n)])


def initialized(**kwargs) -> VLAE:
    """A small VLAE after its data-dependent init, moved off its start by noise so that the
    flows and the posterior are not near the identity / the prior."""
    torch.manual_seed(0)
    model = VLAE(**{**SMALL, **kwargs})
    model.on_train_batch_start((digits(), None), 0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


# ------------------------------------------------------------------ local PixelCNN
@pytest.mark.parametrize("tie", [True, False])
def test_local_pixelcnn_is_causal_with_a_six_row_window(tie):
    """Output (i, j) depends on no input at or after (i, j) in raster order, on some earlier
    one, and on nothing more than receptive_rows rows up (the window that makes VLAE lossy)."""
    torch.manual_seed(0)
    net = LocalPixelCNN(cond_map_channels=0, tie_weights=tie).double()
    assert net.receptive_rows == 6
    i, j = 14, 9
    x = torch.randn(1, 1, 28, 28, dtype=torch.double, requires_grad=True)
    (grad,) = torch.autograd.grad(net(x)[0, 0, i, j], x)
    g = grad[0, 0].abs()
    order = torch.arange(28 * 28).reshape(28, 28)
    assert g[order >= i * 28 + j].max() == 0
    assert g[i, j - 1] > 0 and g[i - 1, j + 1] > 0  # left and up-right: no blind spot there
    assert g[: i - net.receptive_rows].max() == 0
    assert g[i - net.receptive_rows].max() > 0


def test_local_pixelcnn_ties_its_masked_weights_and_sees_the_map_everywhere():
    tied, untied = LocalPixelCNN(), LocalPixelCNN(tie_weights=False)
    assert len({id(m) for m in tied.masked}) == 1 and len({id(m) for m in untied.masked}) == 5
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(untied) - count(tied) == 4 * (12 * 12 * 9 + 12)
    x = torch.zeros(1, 1, 28, 28)
    cond = torch.randn(1, 4, 28, 28, requires_grad=True)
    (grad,) = torch.autograd.grad(tied(x, None, cond)[0, 0, 5, 5], cond)
    assert grad[0, :, 5, 5].abs().sum() > 0  # the map of the pixel itself is visible
    with pytest.raises(ValueError, match="cond_map"):
        tied(x)


# ------------------------------------------------------------------ weight norm
def test_data_dependent_init_normalizes_every_layer_once():
    torch.manual_seed(0)
    net = weight_norm_(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ELU(), nn.Conv2d(8, 5, 1)))
    x = 3 + 2 * torch.randn(64, 3, 9, 9)
    outputs = {}
    for name in ("0", "2"):
        net.get_submodule(name).register_forward_hook(
            lambda m, i, o, n=name: outputs.update({n: o})
        )
    assert data_dependent_init_(net, lambda: net(x)) == 2
    net(x)  # the new gains and biases give the same normalized outputs without the hooks
    for out in outputs.values():
        assert out.mean((0, 2, 3)).abs().max() < 1e-4
        assert (out.std((0, 2, 3), correction=0) - 1).abs().max() < 1e-3


def test_vlae_weight_norm_skips_the_flows_and_the_zero_posterior_head():
    model = VLAE(**SMALL)
    parametrized = lambda m: nn.utils.parametrize.is_parametrized(m, "weight")  # noqa: E731
    assert parametrized(model.pixelcnn.first) and parametrized(model.decoder[0])
    assert not parametrized(model.encoder[-1])
    assert not any(parametrized(m) for m in model.prior_flow.modules())
    x = digits()
    model.on_train_batch_start((x, None), 0)
    assert bool(model.initialized)
    state = copy.deepcopy(model.state_dict())
    model.on_train_batch_start((1 - x, None), 1)  # already initialized: nothing changes
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    # q(z|x) starts at N(0, I) and the AF prior near it: z carries almost nothing yet (the
    # KL is a one-sample estimate per image, so its batch mean is what is ~0)
    kl = model.elbo_terms(x)["kl/z"]
    assert kl.mean().abs() < 0.05 and kl.abs().max() < 0.5


# ------------------------------------------------------------------ the bounds
@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != "gaussian"])
def test_one_sample_iwae_equals_the_elbo_estimate(variant):
    """With the same per-example noise, the k = 1 importance-weighted bound is exactly the
    single-sample ELBO: the exact log densities of flows and the KL estimate agree."""
    model = initialized(**VARIANTS[variant])
    x, index = digits(), torch.arange(12)
    with model.per_example_noise(index), torch.no_grad():
        nelbo = model.nelbo(model.elbo_terms(x))
    with model.per_example_noise(index):
        bound = model.log_likelihood_bound(x, 1)
    torch.testing.assert_close(-nelbo, bound, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("variant", ["vlae", "iaf_posterior", "gaussian"])
def test_iwae_bound_is_above_the_elbo_and_tightens_with_k(variant):
    model = initialized(**VARIANTS[variant])
    x, index = digits(), torch.arange(12)
    with model.per_example_noise(index), torch.no_grad():
        elbo = -model.nelbo(model.elbo_terms(x)).mean()
    bounds = []
    for k in (1, 10, 100):
        with model.per_example_noise(index):
            bounds.append(model.log_likelihood_bound(x, k).mean())
    assert bounds[2] >= bounds[1] - 0.05 >= bounds[0] - 0.1
    assert bounds[2] > elbo


def test_gaussian_kl_is_analytic_and_matches_the_monte_carlo_one():
    model = initialized(prior="gaussian")
    x = digits(4)
    with torch.no_grad():
        analytic = model.elbo_terms(x)["kl/z"]
        mean, log_std, ctx = model.encode(x)
        mc = torch.stack(
            [
                -model.log_prior(z) + log_q
                for z, log_q in (
                    model.posterior_sample(mean, log_std, ctx, torch.randn_like(mean))
                    for _ in range(4000)
                )
            ]
        ).mean(0)
    torch.testing.assert_close(mc, analytic, atol=0.1 + 0.05 * analytic.abs().max(), rtol=0)


def test_unconditional_decoder_has_no_latent_and_an_exact_likelihood():
    model = initialized(latent=False)
    x = digits(4)
    assert model.latent_dims == {} and set(model.elbo_terms(x)) == {"recon"}
    torch.testing.assert_close(model.log_likelihood_bound(x, 7), -model.elbo_terms(x)["recon"])
    with pytest.raises(ValueError, match="no latent"):
        model.decompress(x)


def test_vlae_rejects_other_images():
    with pytest.raises(ValueError, match="1x28x28 binary"):
        VLAE(image_shape=(3, 32, 32), data_kind="8bit")


# ------------------------------------------------------------------ sampling
@pytest.mark.parametrize("variant", ["vlae", "factorized_af", "unconditional"])
def test_samples_and_decompressions_are_binary_and_follow_their_noise(variant):
    model = initialized(**VARIANTS[variant])
    noise = model.sample_noise(3, torch.Generator().manual_seed(1))
    a, b = model.sample(3, noise), model.sample(3, noise)
    assert a.shape == (3, 1, 28, 28) and set(a.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(a, b)
    if variant != "unconditional":
        x = digits(3)
        d = model.decompress(x, torch.Generator().manual_seed(0))
        assert d.shape == x.shape and set(d.unique().tolist()) <= {0.0, 1.0}


# ------------------------------------------------------------------ training
def test_free_bits_per_data_dim_stop_the_kl_gradient_below_the_threshold():
    """0.01 nats/data-dim on 28x28 images: below 7.84 nats the KL term is a constant."""
    torch.manual_seed(0)
    model = VLAE(**SMALL, free_bits=0.01, free_bits_unit="data_dim")
    x = digits()
    model.on_train_batch_start((x, None), 0)  # fresh: q(z|x) = N(0, I), KL ~ 0
    terms = model.elbo_terms(x)
    assert terms["kl/z"].mean() < 0.01 * 784
    kl_only = model.loss({"recon": torch.zeros(()), "kl/z": terms["kl/z"]})
    assert kl_only.item() == pytest.approx(0.01 * 784)
    grads = torch.autograd.grad(kl_only, list(model.encoder.parameters()), allow_unused=True)
    assert all(g is None or g.abs().max() == 0 for g in grads)
    model = initialized(free_bits=0.01, free_bits_unit="data_dim")  # KL ~ 50 nats
    kl = model.loss({"recon": torch.zeros(()), "kl/z": model.elbo_terms(x)["kl/z"]})
    grads = torch.autograd.grad(kl, list(model.encoder.parameters()), allow_unused=True)
    assert any(g is not None and g.abs().max() > 0 for g in grads)


class Snapshots(L.Callback):
    """Records the live weights after the last training step and the weights validation sees."""

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.live = {k: v.clone() for k, v in pl_module.state_dict().items()}

    def on_validation_batch_start(self, trainer, pl_module, *args):
        self.validated = {k: v.clone() for k, v in pl_module.state_dict().items()}


def test_polyak_averaged_weights_are_the_ones_evaluated_and_saved(tmp_path):
    """With Polyak averaging (VLAE: alpha = 0.998) validation, the weights left after fit,
    the checkpoint and a test of it by the trainer that fitted (test_after_fit) or by a new
    one (`arvae test --ckpt_path`) all use the averages, not the live weights."""
    L.seed_everything(0)
    model = VLAE(**SMALL, lr=0.01, optimizer="adamax")
    ema, snaps = PolyakAveraging(decay=0.9), Snapshots()
    trainer = L.Trainer(
        max_steps=6,
        callbacks=[ema, snaps],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        num_sanity_val_steps=0,
        limit_val_batches=1,
    )
    trainer.fit(model, datamodule=TinyBinary(n_train=48, batch_size=8))
    averaged = ema._average_model.module.state_dict()
    key = "pixelcnn.head.1.parametrizations.weight.original1"
    assert not torch.equal(snaps.live[key], averaged[key])
    assert torch.equal(snaps.validated[key], averaged[key])
    assert torch.equal(model.state_dict()[key], averaged[key])
    path = next(tmp_path.rglob("*.ckpt"))
    ckpt = torch.load(path, weights_only=False)
    assert torch.equal(ckpt["state_dict"][key], averaged[key])

    class Tested(L.Callback):
        def on_test_start(self, trainer, pl_module):
            self.weights = pl_module.state_dict()[key].clone()

    for tester in (trainer, L.Trainer(logger=False, enable_progress_bar=False)):
        tested = Tested()
        tester.callbacks.append(tested)
        tester.test(model, datamodule=TinyBinary(n_test=4), ckpt_path=path, verbose=False)
        assert torch.equal(tested.weights, averaged[key])


def test_lossy_code_figure_rows_are_an_original_and_its_decompressions(tmp_path):
    model = initialized()
    callback = LossyCode(n_originals=3, n_decompressions=2)
    callback.originals = digits(3)
    trainer = L.Trainer(logger=False, default_root_dir=tmp_path)
    trainer.strategy.connect(model)
    (path,) = callback.write(trainer, model, "test")
    from PIL import Image

    grid = Image.open(path)
    assert grid.size == (3 * 116, 3 * 116)  # 3 columns (original + 2), 3 rows; digits 4x, 4-px gaps


def _init_on_rank(rank: int, port: int, result: dict) -> None:
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2
    )
    try:
        torch.manual_seed(rank)  # different initial weights and batches on the two ranks
        model = VLAE(**SMALL)
        x = digits(16)[rank * 8 : rank * 8 + 8]
        model.on_train_batch_start((x, None), 0)
        result[rank] = torch.cat([p.detach().flatten() for p in model.parameters()])
    finally:
        torch.distributed.destroy_process_group()


def test_data_dependent_init_gives_every_ddp_rank_the_same_weights():
    """Each rank initializes from its own batch; rank zero's weights are broadcast, so the
    replicas cannot drift apart from step one (DDP syncs gradients, not weights)."""
    import torch.multiprocessing as mp
    from test_cli import free_port

    with mp.Manager() as manager:
        result = manager.dict()
        mp.spawn(_init_on_rank, args=(free_port(), result), nprocs=2)
        assert torch.equal(result[0], result[1])
