"""AGAVE (lightning_modules/agave.py): the b-level logistic of y, the objective of eq. 7 at
λ = 1 and λ = 2, an autoregressive PixelCNN++ that depends on z, the importance-weighted
bound, the two training phases and the control, the CLI, DDP and the λ-sweep figures."""

import functools
import math
from pathlib import Path

import pytest
import torch
from test_cli import QUIET, REPO, arvae, ok, printed_config, read_report
from test_ddp import check_one_process_and_ddp_tests

from arvae import report
from arvae.report import hparam
from lightning_modules import AGAVE
from lightning_modules.backbone import EmbeddingNet, PixelCNNppNet
from lightning_modules.likelihoods import (
    DiscretizedLogistic,
    DiscretizedLogisticMixture,
)
from lightning_modules.views import Quantize

NET = functools.partial(PixelCNNppNet, nr_resnet=1, channels=8, dropout=0.0)
COND = functools.partial(EmbeddingNet, n_blocks=1, channels=5, down_after=[], up_after=[],
                         dropout=0.0)  # fmt: skip


def model_of(shape=(3, 8, 8), seed=0, **kw) -> AGAVE:
    torch.manual_seed(seed)
    options = dict(latent_channels=2, width=8, blocks=1, pixelcnn=NET,
                   likelihood=DiscretizedLogisticMixture(n_mix=2))  # fmt: skip
    return AGAVE(image_shape=shape, **{**options, **kw})


def images(shape, n=4, seed=1) -> torch.Tensor:
    return torch.randint(0, 256, (n, *shape), generator=torch.Generator().manual_seed(seed)).float()


def ready(model: AGAVE, x: torch.Tensor) -> AGAVE:
    """Data-initialized, every weight perturbed (nothing rests on initial values)."""
    model.data_dependent_init(x)
    model.initialized.fill_(True)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


# ----------------------------------------------------------------- y and its likelihood
@pytest.mark.parametrize("levels", [256, 32, 8, 2])
def test_the_b_level_logistic_sums_to_one_over_its_levels_for_every_channel(levels):
    lik = DiscretizedLogistic(levels)
    torch.manual_seed(0)
    n = 64  # (mean, log-scale) pairs, from narrow to broad and beyond the range
    params = torch.stack([torch.empty(n).uniform_(-1.5, 1.5), torch.empty(n).uniform_(-6, 1)], 1)
    params = params[:, :, None, None]
    log_p = torch.stack([lik.log_prob(params, torch.full((n, 1, 1, 1), float(v)))
                         for v in range(levels)])  # fmt: skip
    total = torch.logsumexp(log_p, dim=0)
    torch.testing.assert_close(total, torch.zeros_like(total), atol=2e-5, rtol=0)
    # the channels of a pixel are independent: an RGB pixel's log p is its channels' sum
    rgb = torch.randn(1, 6, 1, 1)
    x = torch.tensor([0.0, 1.0, levels - 1.0]).view(1, 3, 1, 1)
    one = [lik.log_prob(rgb[:, [c, 3 + c]], x[:, [c]]) for c in range(3)]
    torch.testing.assert_close(lik.log_prob(rgb, x), sum(one))


def test_the_b_level_logistic_is_eq_8_with_edge_bins_to_infinity_and_agrees_with_the_mixture():
    """Level j of b holds the 8-bit values c j .. c j + c - 1 (c = 256 / b): its probability
    is the logistic's mass over their bins (float64 reference); at b = 256 a one-component
    grey mixture gives the same numbers."""
    lik = DiscretizedLogistic(32)
    mean, log_scale = 0.13, -2.5

    def cdf(v: float) -> float:
        return 1 / (1 + math.exp(-(v - mean) / math.exp(log_scale)))

    params = torch.tensor([mean, log_scale]).view(1, 2, 1, 1)
    for j in (0, 5, 31):
        low = 0.0 if j == 0 else cdf((2 * 8 * j - 1) / 255 - 1)
        high = 1.0 if j == 31 else cdf((2 * (8 * j + 7) + 1) / 255 - 1)
        got = lik.log_prob(params, torch.full((1, 1, 1, 1), float(j))).exp()
        assert float(got) == pytest.approx(high - low, rel=1e-5)
    x = images((1, 5, 4), n=3)
    params = torch.randn(3, 2, 5, 4)
    mixture = torch.cat([torch.zeros(3, 1, 5, 4), params], 1)  # one component: logit 0
    torch.testing.assert_close(
        DiscretizedLogistic(256).log_prob(params, x),
        DiscretizedLogisticMixture(n_mix=1).log_prob(mixture, x),
        rtol=1e-5,
        atol=1e-4,
    )


def test_samples_fall_in_the_bin_of_their_noise_and_quantize_floors_into_b_bins():
    lik = DiscretizedLogistic(16)
    params = torch.randn(2, 6, 5, 5)
    noise = torch.rand(2, 3, 5, 5)
    level = lik.sample(params, noise)
    mean, log_scale = lik.split(params)
    low, high = lik.edges(level)
    f = lambda v: torch.sigmoid((v - mean) / log_scale.exp())  # noqa: E731
    below = torch.where(level == 0, 0.0, f(low))
    above = torch.where(level == 15, 1.0, f(high))
    assert ((below <= noise + 1e-5) & (noise <= above + 1e-5)).all()
    x = images((3, 4, 4))
    assert torch.equal(Quantize(16)(x), torch.div(x, 16, rounding_mode="floor"))
    assert torch.equal(Quantize(8)(torch.tensor([[[[0.0, 31.0, 32.0, 255.0]]]])),
                       torch.tensor([[[[0.0, 0.0, 1.0, 7.0]]]]))  # fmt: skip
    with pytest.raises(ValueError, match="divide 256"):
        DiscretizedLogistic(24)


@pytest.mark.parametrize("levels, downsamplings", [(256, 0), (32, 1), (8, 2)])
def test_the_auxiliary_image_is_what_the_options_say(levels, downsamplings):
    model = model_of(aux_levels=levels, aux_downsamplings=downsamplings, latent_downsamplings=1)
    x = images(model.image_shape)
    y = model.aux_image(x)
    size = 8 // 2**downsamplings
    assert y.shape == (4, 3, size, size) and model.aux_shape == (3, size, size)
    assert y.min() >= 0 and y.max() <= levels - 1
    f = model.vae_output(model.encode(x)[0])
    assert f.shape == y.shape and model.condition(f).shape == x.shape


# ------------------------------------------------------------------ the objective (eq. 7)
def independent_elbos(model: AGAVE, x: torch.Tensor):
    """x's and y's ELBOs for one z, from the parts (torch.distributions for the KL)."""
    mean, log_std = model.encode(x)
    z = mean + log_std.exp() * torch.randn(x.shape[0], *model.latent_shapes["z"])
    f = model.vae_output(z)
    q, prior = torch.distributions.Normal(mean, log_std.exp()), torch.distributions.Normal(0, 1)
    kl = torch.distributions.kl_divergence(q, prior).flatten(1).sum(1)
    log_px = model.likelihood.log_prob(model.pixel_params(x, model.condition(f)), x)
    scales = model.aux_log_scale[None, :, None, None].expand_as(f)
    log_py = DiscretizedLogistic(256).log_prob(torch.cat([f, scales], 1), model.aux_image(x))
    return log_px - kl, log_py - kl, log_px + log_py - kl


@pytest.mark.parametrize("lam", [1.0, 2.0, 12.0])
def test_the_loss_is_eq_7_the_joint_elbo_at_lambda_1_and_the_sum_of_the_elbos_at_2(lam):
    model = model_of(lam=lam)
    x = images(model.image_shape)
    ready(model, x)
    x = x
    with torch.no_grad():
        torch.manual_seed(5)
        terms = model.checked(model.elbo_terms(x))
        torch.manual_seed(5)
        elbo_x, elbo_y, joint = independent_elbos(model, x)
        loss = float(model.loss(terms))
    kl = terms["kl/z"]
    assert loss == pytest.approx(float((terms["recon"] + terms["recon_y"] + lam * kl).mean()))
    if lam == 1.0:  # x and y conditionally independent given z
        assert loss == pytest.approx(float(-joint.mean()), rel=1e-6)
    if lam == 2.0:  # the two ELBOs, sharing the encoder
        assert loss == pytest.approx(float(-(elbo_x + elbo_y).mean()), rel=1e-6)
    # the reported bound is x's alone: recon_y is in the loss, not in -ELBO
    torch.testing.assert_close(model.nelbo(terms), -elbo_x)
    assert model.term_kinds["recon_y"] == "auxiliary"


def test_the_decomposition_adds_up_in_bits_per_dimension():
    model = model_of(aux_downsamplings=1, latent_downsamplings=1)
    x = images(model.image_shape)
    ready(model, x)
    terms = model.elbo_terms(x)
    m = model.evaluation_metrics(terms)
    bpd = model.nelbo(terms) / (model.dims * math.log(2))
    torch.testing.assert_close(m["bpd/kl"] + m["bpd/recon"], bpd)
    y_dims = 3 * 4 * 4 * math.log(2)
    torch.testing.assert_close(m["bpd_vae"], (terms["recon_y"] + terms["kl/z"]) / y_dims)


# ------------------------------------------------------------- the decoder and the latents
def test_the_pixelcnn_is_autoregressive_in_x_with_f_of_z_on_and_depends_on_z():
    """Gradients at odd sizes with random weights: the parameters of pixel (i, j) depend on
    the pixels before it in raster order only (every channel), and on z."""
    model = model_of(shape=(3, 7, 5), latent_downsamplings=0, cond_net=COND)
    x = images(model.image_shape, n=1)
    ready(model, x).eval()
    x = x.requires_grad_(True)
    z = torch.randn(1, *model.latent_shapes["z"], requires_grad=True)
    cond = model.condition(model.vae_output(z))
    params = model.pixel_params(x, cond)
    height, width = model.image_shape[1:]
    for i in range(height):
        for j in range(width):
            gx, gz = torch.autograd.grad(params[0, :, i, j].sum(), (x, z), retain_graph=True)
            seen = gx[0].abs().sum(0) > 0
            later = torch.ones(height, width, dtype=torch.bool)
            later.view(-1)[: i * width + j] = False
            assert not seen[later].any(), (i, j)
            assert gz.abs().sum() > 0, (i, j)
    assert seen.any()  # the last pixel sees earlier ones


def test_iwae_bound_is_above_the_elbo_and_tightens_with_k():
    model = model_of()
    x = images(model.image_shape, n=3)
    ready(model, x).eval()
    with torch.no_grad():  # a posterior away from the prior, so the bounds differ
        head = model.encoder[-1]
        head.bias[: head.out_channels // 2] += 1.0
    x, index = x, torch.arange(3)
    with torch.no_grad(), model.per_example_noise(index):
        elbo = -model.nelbo(model.elbo_terms(x)).mean()
        bounds = [model.log_likelihood_bound(x, k).mean() for k in (1, 8, 64)]
    assert all(a <= b + 1e-3 for a, b in zip(bounds, bounds[1:], strict=False)), bounds
    assert bounds[-1] > elbo


def test_pretraining_keeps_the_pixelcnn_loss_off_the_vae_then_trains_jointly():
    """In the first ``pretrain_steps`` the PixelCNN++'s reconstruction reaches no VAE weight
    (the two train independently); afterwards it does. Every parameter gets a gradient in
    both phases (DDP needs them), the auxiliary term dropped included."""
    for steps, joint in ((10, False), (0, True)):
        model = model_of(pretrain_steps=steps, auxiliary_weight=0.0).train()
        x = images(model.image_shape)
        ready(model, x)
        terms = model.elbo_terms(x)
        vae = [*model.encoder.parameters(), *model.decoder.parameters()]
        grads = torch.autograd.grad(terms["recon"].sum(), vae, allow_unused=True, retain_graph=True)
        reached = any(g is not None and g.abs().sum() > 0 for g in grads)
        assert reached == joint
        model.loss(terms).backward()
        assert all(p.grad is not None for p in model.parameters())
        assert model.aux_log_scale.grad.abs().sum() == 0  # weight 0: no pull from y


def test_sampling_follows_its_noise_and_each_row_matches_the_full_image():
    """x ~ p(x | f(z)) from given noise is repeatable, and the sampler's cropped canvas
    gives the parameters the whole image does (so the draws are the model's)."""
    model = model_of(shape=(3, 6, 4), latent_downsamplings=1, aux_downsamplings=1)
    x = images(model.image_shape, n=2)
    ready(model, x).eval()
    noise = model.sample_noise(2, torch.Generator().manual_seed(3))
    a, b = model.sample(2, noise), model.sample(2, noise)
    assert torch.equal(a, b) and a.shape == (2, 3, 6, 4)
    assert a.min() >= 0 and a.max() <= 255 and torch.equal(a, a.round())
    f = model.vae_output(noise["z"])
    drawn = model.decode(f, noise["x"])
    assert torch.equal(drawn, a)


# ---------------------------------------------------------------------------- the CLI
AGAVE_CLI = [
    "--model.class_path", "lightning_modules.AGAVE",
    "--model.init_args.latent_channels", "2",
    "--model.init_args.width", "8",
    "--model.init_args.blocks", "1",
    "--model.init_args.pretrain_steps", "1",
    "--model.init_args.iwae_k", "4",
    "--model.init_args.pixelcnn.init_args.nr_resnet", "1",
    "--model.init_args.pixelcnn.init_args.channels", "8",
    "--model.init_args.pixelcnn.init_args.dropout", "0.0",
    "--model.init_args.likelihood", "DiscretizedLogisticMixture",
    "--model.init_args.likelihood.n_mix", "2",
    "--data.class_path", "tests.tiny_data.TinyColour",
    "--data.init_args.n_test", "13",
    "--data.init_args.eval_batch_size", "5",
]  # fmt: skip
DATA = AGAVE_CLI[AGAVE_CLI.index("--data.class_path") :]
FIGURES = ["--guided_samples.n_originals", "2", "--guided_samples.n_prior", "2",
           "--guided_samples.n_draws", "2", "--samples.n_samples", "0"]  # fmt: skip
NO_FIGURES = ["--guided_samples.n_originals", "0", "--guided_samples.n_prior", "0",
              "--samples.n_samples", "0", "--noise_variation.n_rows", "0"]  # fmt: skip


def fit(cwd: Path, name: str, *extra: str) -> Path:
    ok(arvae("fit", *AGAVE_CLI, *QUIET, "--trainer.max_steps", "3", "--test_after_fit", "true",
             "--trainer.log_every_n_steps", "1",
             "--trainer.logger.init_args.name", name, *extra, cwd=cwd))  # fmt: skip
    return cwd / "runs" / name / "version_0"


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> Path:
    """A 3-step CLI fit (one step of pre-training) at λ = 2, tested after the fit."""
    cwd = tmp_path_factory.mktemp("agave")
    return fit(cwd, "lam2", *FIGURES, "--model.init_args.lam", "2")


def test_cli_fit_then_test_reports_the_bounds_and_fig_4s_decomposition(fitted):
    report_ = read_report(fitted)
    m = report_["metrics"]
    assert report_["n_test_examples"] == 13 and report_["iwae_k"] == 4
    assert m["test/nelbo"] == pytest.approx(m["test/recon"] + m["test/kl/z"], rel=1e-6)
    assert m["test/bpd"] == pytest.approx(m["test/bpd/kl"] + m["test/bpd/recon"], rel=1e-6)
    assert {"test/recon_y", "test/bpd_vae", "test/bpd/recon_y", "test/bpd_iwae"} <= set(m)
    assert m["test/active_units/z"] >= 0
    written = {p.name for p in (fitted / "samples").iterdir()}
    assert {"guided_reconstructions_test.png", "guided_samples_test.png"} <= written
    assert "train/recon_y" in (fitted / "metrics.csv").read_text().splitlines()[0]


def test_ddp_test_of_a_checkpoint_matches_one_process(fitted, tmp_path):
    ckpt = fitted.parents[2] / read_report(fitted)["ckpt_path"]
    # one small figure of each kind: rank zero draws while the others wait (a collective
    # inside a figure callback's rank-zero branch would hang here)
    figures = ["--guided_samples.n_originals", "1", "--guided_samples.n_prior", "1",
               "--guided_samples.n_draws", "1", "--samples.n_samples", "0",
               "--noise_variation.n_rows", "0"]  # fmt: skip
    one = check_one_process_and_ddp_tests("lightning_modules.AGAVE", ckpt,
                                                    [*DATA, *figures], tmp_path)  # fmt: skip
    assert one["n_test_examples"] == 13 and "test/bpd_iwae" in one["metrics"]


def test_the_control_starts_from_a_checkpoint_and_the_report_plots_a_lambda_sweep(fitted):
    """Appendix C's switch: a fresh fit from the λ = 2 run's weights with the auxiliary term
    dropped; then `arvae report --plot lam` draws Fig. 4 from the two runs."""
    cwd = fitted.parents[2]
    ckpt = cwd / read_report(fitted)["ckpt_path"]
    control = fit(cwd, "control", *NO_FIGURES, "--model.init_args.auxiliary_weight", "0.0",
                  "--model.init_args.pretrain_steps", "0", "--model.init_args.lam", "4",
                  "--model.init_args.init_checkpoint", str(ckpt))  # fmt: skip
    first = (control / "metrics.csv").read_text()
    assert "train/kl/z" in first.splitlines()[0]
    out = cwd / "report" / "agave.md"
    metrics = ["bpd", "bpd_vae", "bpd/kl", "bpd/recon", "bpd/recon_y"]
    table = report.main([str(cwd / "runs"), "--plot", "lam", "--metric", *metrics,
                         "--out", str(out)])  # fmt: skip
    assert "bpd_vae" in table and table.count("AGAVE") == 2
    figure = out.parent / "metrics_vs_lam.png"
    assert figure.is_file() and figure.stat().st_size > 10_000
    assert (out.parent / "breakdown_vs_lam.png").is_file()


def test_init_checkpoint_loads_the_weights_of_a_fresh_fit_only(fitted, tmp_path):
    ckpt = fitted.parents[2] / read_report(fitted)["ckpt_path"]
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)
    options = {k: v for k, v in saved["hyper_parameters"].items() if not k.startswith("_")}
    model = AGAVE(**{**options, "init_checkpoint": str(ckpt)})
    model.on_train_start()  # no trainer: step 0, a fresh fit
    for key, value in saved["state_dict"].items():
        assert torch.equal(model.state_dict()[key], value), key
    other = AGAVE(**{**options, "latent_channels": 3, "init_checkpoint": str(ckpt)})
    with pytest.raises(ValueError, match="does not hold this model's weights"):
        other.on_train_start()


# ------------------------------------------------------------------------ configs, sweeps
AGAVE_DIR = REPO / "experiments" / "agave"


@pytest.mark.parametrize(
    "overlay, options",
    [
        ("cifar10_lambda2", {"lam": 2, "aux_levels": 256, "aux_downsamplings": 0}),
        ("cifar10_lambda8", {"lam": 8}),
        ("cifar10_lambda12", {"lam": 12}),
        ("cifar10_levels32", {"lam": 8, "aux_levels": 32}),
        ("cifar10_aux16x16", {"aux_downsamplings": 1}),
        ("cifar10_aux8x8", {"aux_downsamplings": 2}),
        ("cifar10_control", {"auxiliary_weight": 0.0, "lam": 1, "pretrain_steps": 0}),
    ],
)
def test_the_configs_hold_the_papers_settings_and_build(overlay, options):
    """§4.1: Adamax 2e-3 without decay, a PixelCNN++ of the PixelCNN++ paper's size, 150
    importance samples; each overlay's λ and y. The full-size model builds for CIFAR-10.
    (The sweeps' commands are parsed in test_sweep.py.)"""
    config = printed_config("fit", "-c", str(AGAVE_DIR / "_cifar10.yaml"), "-c",
                            str(AGAVE_DIR / f"{overlay}.yaml"))  # fmt: skip
    init = config["model"]["init_args"]
    assert (init["optimizer"], init["lr"], init["lr_decay"], init["iwae_k"]) == (
        "adamax", 0.002, 1.0, 150)  # fmt: skip
    assert all(hparam(init, k) == v for k, v in options.items()), init
    net = init["pixelcnn"]["init_args"]
    assert (net["nr_resnet"], net["channels"], net["dropout"]) == (5, 160, 0.5)
    assert config["data"]["class_path"] == "datamodules.CIFAR10"
    if overlay in ("cifar10_lambda2", "cifar10_aux8x8"):
        init = {k: v for k, v in init.items() if k not in ("image_shape", "data_kind")}
        model = AGAVE(image_shape=(3, 32, 32), **init)
        size = 32 // 2 ** options["aux_downsamplings"]
        assert model.aux_shape == (3, size, size) and model.latent_shapes["z"] == (32, 16, 16)


def test_the_cpu_demo_is_the_smoke_run_trained_longer():
    """cifar10_demo.yaml changes only the schedule (and the run's name) of the smoke run."""
    files = ["_cifar10", "cifar10_lambda2", "cifar10_smoke"]
    args = [a for f in files for a in ("-c", str(AGAVE_DIR / f"{f}.yaml"))]
    smoke = printed_config("fit", *args)
    demo = printed_config("fit", *args, "-c", str(AGAVE_DIR / "cifar10_demo.yaml"))
    assert demo["trainer"]["max_epochs"] == 30 and smoke["trainer"]["max_epochs"] == 6
    assert demo["model"] == smoke["model"] and demo["data"] == smoke["data"]
    assert demo["trainer"]["logger"]["init_args"]["name"] == "agave_cifar10_demo"
