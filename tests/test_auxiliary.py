"""PixelCNNs with auxiliary variables (lightning_modules/auxiliary_pixelcnn.py): the views, the
exact sum of the factors, causality of each factor by gradients, training the factors apart
and testing them together, sampling and colourization, the CLI."""

import functools
import itertools
from pathlib import Path

import pytest
import torch
from test_cli import QUIET, REPO, arvae, ok, printed_config, read_report
from test_ddp import check_one_process_and_ddp_tests

from callbacks.auxiliary_views import sampling_mode
from lightning_modules import AuxiliaryPixelCNN
from lightning_modules.backbone import EmbeddingNet, PixelCNNppNet
from lightning_modules.likelihoods import Categorical, DiscretizedLogisticMixture
from lightning_modules.views import Grayscale, HalfResolution

NET = functools.partial(PixelCNNppNet, nr_resnet=1, channels=8, dropout=0.0)
FLAT = functools.partial(NET, resolutions=1)
EMBED = functools.partial(
    EmbeddingNet, n_blocks=3, channels=6, down_after=[1], up_after=[2], dropout=0.0
)
PYRAMID_EMBED = functools.partial(
    EmbeddingNet, n_blocks=4, channels=6, down_after=[1], up_after=[2, 3], dropout=0.0
)


def grayscale_model(shape=(3, 7, 9), seed=0, **kw) -> AuxiliaryPixelCNN:
    torch.manual_seed(seed)
    return AuxiliaryPixelCNN(
        views=[Grayscale()],
        image_shape=shape,
        base=NET,
        conditional=NET,
        embedding=EMBED,
        likelihood=DiscretizedLogisticMixture(n_mix=2),
        **kw,
    )


def pyramid_model(shape=(3, 9, 7), seed=0) -> AuxiliaryPixelCNN:
    torch.manual_seed(seed)
    return AuxiliaryPixelCNN(
        views=[HalfResolution(), HalfResolution()],
        image_shape=shape,
        base=FLAT,
        conditional=FLAT,
        embedding=PYRAMID_EMBED,
        likelihood=DiscretizedLogisticMixture(n_mix=2),
    )


def images(shape, n=4, seed=1) -> torch.Tensor:
    return torch.randint(0, 256, (n, *shape), generator=torch.Generator().manual_seed(seed)).float()


def ready(model: AuxiliaryPixelCNN, x: torch.Tensor) -> AuxiliaryPixelCNN:
    """Data-initialized, then every weight perturbed (nothing rests on initial values), in
    float64 and eval mode."""
    model.data_dependent_init(x)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.double().eval()


# ------------------------------------------------------------------------ the views
def test_grayscale_view_is_the_bt601_luma_cut_into_16_equal_bins():
    x = images((3, 5, 6), n=8)
    view = Grayscale(bits=4)(x)
    luma = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).double()
    assert view.shape == (8, 1, 5, 6) and view.dtype == x.dtype
    assert torch.equal(view[:, 0].double(), torch.floor(luma / 16 + 1e-9))
    assert view.min() >= 0 and view.max() <= 15
    assert torch.equal(view, Grayscale(bits=4)(x.clone()))  # deterministic
    white = torch.full((1, 3, 1, 1), 255.0)
    assert Grayscale(4)(white).item() == 15 and Grayscale(4)(torch.zeros(1, 3, 1, 1)).item() == 0
    assert Grayscale(bits=2)(white).item() == 3


def test_half_resolution_view_averages_blocks_rounding_half_up_and_partial_blocks_at_odd_sizes():
    x = images((3, 5, 7), n=3)
    view = HalfResolution()(x)
    assert view.shape == (3, 3, 3, 4)
    for i, j in itertools.product(range(3), range(4)):
        block = x[:, :, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2].double()
        mean = block.flatten(2).mean(2)
        assert torch.equal(view[:, :, i, j].double(), torch.floor(mean + 0.5)), (i, j)
    # exact halves round up: a block 0, 0, 1, 1 has mean 0.5
    half = torch.tensor([[[[0.0, 0.0], [1.0, 1.0]]]])
    assert HalfResolution()(half).item() == 1.0


def test_the_levels_are_what_the_config_says():
    model = AuxiliaryPixelCNN(views=[HalfResolution()] * 4, image_shape=(3, 128, 128),
                              base=FLAT, conditional=FLAT, embedding=PYRAMID_EMBED)  # fmt: skip
    assert model.level_names == ["x", "64x64", "32x32", "16x16", "8x8"]
    assert [s[1] for s in model.level_shapes] == [128, 64, 32, 16, 8]
    assert all(isinstance(lik, DiscretizedLogisticMixture) for lik in model.likelihoods)
    gray = grayscale_model((3, 32, 32))
    assert gray.level_names == ["x", "gray4"] and gray.level_shapes == [(3, 32, 32), (1, 32, 32)]
    assert isinstance(gray.likelihoods[1], Categorical) and gray.likelihoods[1].n_values == 16
    x = images((3, 128, 128), n=1)
    levels = model.views_of(x)
    assert [tuple(v.shape[1:]) for v in levels] == model.level_shapes


def test_grayscale_bounds_admit_exactly_the_colours_of_the_grey_level():
    """For every grey level g: every colour whose view is g passes the nested bounds (R, then
    G given R, then B given both), and the bounds admit as many colours as have view g (so
    none of another level): counted over all 256^3 colours."""
    view = Grayscale(bits=4)
    values = torch.arange(256)
    r, g = values[:, None].expand(256, 256), values[None, :].expand(256, 256)
    colours = torch.stack(torch.meshgrid(values, values, values, indexing="ij"))
    levels = view(colours.reshape(1, 3, 256, 65536).float()).long().flatten()
    counts = torch.bincount(levels, minlength=16)
    for grey in range(16):
        bounds = view.pixel_bounds(torch.full((1, 1, 1, 1), float(grey)), None, 0, 0)
        drawn = [r[None], g[None]]
        (low_r, high_r), (low_g, high_g), (low_b, high_b) = (
            (low.expand(1, 256, 256)[0], high.expand(1, 256, 256)[0])
            for low, high in (bounds(c, drawn[:c]) for c in range(3))
        )
        ok_g = (r >= low_r) & (r <= high_r) & (g >= low_g) & (g <= high_g)
        assert bool((low_b <= high_b)[ok_g].all()), "an admitted (R, G) has no B"
        assert ((high_b - low_b + 1) * ok_g).sum() == counts[grey], grey
        rr, gg, bb = colours.reshape(3, -1)[:, levels == grey]
        assert bool(ok_g[rr, gg].all())
        assert bool(((bb >= low_b[rr, gg]) & (bb <= high_b[rr, gg])).all())


@pytest.mark.parametrize("size", [(5, 7), (4, 4), (1, 3)])
def test_half_resolution_bounds_let_any_choice_within_them_complete_to_the_view(size):
    """Pixels drawn one by one in raster order, each uniformly within its bounds (the lowest,
    the highest or random), always give an image whose view is the given one."""
    gen = torch.Generator().manual_seed(0)
    view = HalfResolution()
    h, w = size
    coarse = torch.randint(0, 256, (6, 3, (h + 1) // 2, (w + 1) // 2), generator=gen).float()
    for pick in ("low", "high", "random"):
        canvas = torch.zeros(6, 3, h, w)
        for i, j in itertools.product(range(h), range(w)):
            bounds = view.pixel_bounds(coarse, canvas, i, j)
            for c in range(3):
                low, high = (b[:, 0, 0].float() for b in bounds(c, []))
                assert bool((low <= high).all()), (i, j, c)
                u = torch.rand(6, generator=gen)
                value = {"low": low, "high": high, "random": (low + u * (high - low + 1)).floor()}
                canvas[:, c, i, j] = value[pick].clamp(max=high)
        if h > 1 or w > 1:
            assert torch.equal(view(canvas), coarse), pick


# ------------------------------------------------------------ the sum of the factors
@pytest.mark.parametrize("make", [grayscale_model, pyramid_model])
def test_reported_log_likelihood_is_exactly_the_sum_of_the_factors(make):
    model = make()
    x = images(model.image_shape)
    ready(model, x)
    with torch.no_grad():
        terms = model.checked(model.elbo_terms(x.double()))
        metrics = model.evaluation_metrics(terms)
    assert set(terms) == {f"nll/{n}" for n in model.level_names}
    total = model.nelbo(terms)
    assert torch.equal(total, sum(terms.values()))
    bpd = total / (model.dims * torch.log(torch.tensor(2.0, dtype=torch.float64)))
    parts = sum(metrics[f"bpd/{n}"] for n in model.level_names)
    torch.testing.assert_close(parts, bpd, rtol=1e-6, atol=0)  # float32 sums
    torch.testing.assert_close(metrics["bpd_at/x"], bpd, rtol=1e-6, atol=0)
    # each factor is the likelihood of its own level given the next coarser one
    levels = model.views_of(x.double())
    top = model.level_names[-1]
    base = -model.likelihoods[-1].log_prob(
        model.nets[top](model.likelihoods[-1].network_input(levels[-1])), levels[-1]
    )
    torch.testing.assert_close(terms[f"nll/{top}"], base)
    assert all(torch.isfinite(v).all() and (v > 0).all() for v in terms.values())


# ------------------------------------------------------------------------ causality
def gradient_support(model, level: int, x_l, coarser, i: int, j: int):
    """Pixels of X_level and of X_level+1 the parameters of pixel (i, j) have a gradient on."""
    x_l = x_l.clone().requires_grad_(True)
    inputs = [x_l]
    cond = None
    if coarser is not None:
        coarser = coarser.clone().requires_grad_(True)
        inputs.append(coarser)
        cond = model.embed(model.level_names[level], coarser, level)
    params = model.factor_params(level, x_l, cond)
    grads = torch.autograd.grad(params[0, :, i, j].sum(), inputs, allow_unused=True)
    return [None if g is None else g[0].abs().sum(0) > 0 for g in grads]


@pytest.mark.parametrize("make", [grayscale_model, pyramid_model])
def test_each_factor_sees_only_earlier_pixels_of_its_level_and_any_of_the_coarser(make):
    model = make()
    x = images(model.image_shape, n=2)
    ready(model, x)
    levels = model.views_of(x.double())
    for level in range(len(model.level_names)):
        h, w = levels[level].shape[-2:]
        coarser = levels[level + 1] if level + 1 < len(levels) else None
        sees_coarser_after = False
        for i, j in itertools.product(range(h), range(w)):
            seen = gradient_support(model, level, levels[level], coarser, i, j)
            rows, cols = torch.arange(h)[:, None], torch.arange(w)[None, :]
            later = (rows > i) | ((rows == i) & (cols >= j))
            assert not seen[0][later].any(), (model.level_names[level], i, j)
            if coarser is not None:
                assert seen[1].any(), "the factor ignores the coarser level"
                ch, cw = coarser.shape[-2:]
                crow, ccol = torch.arange(ch)[:, None], torch.arange(cw)[None, :]
                sees_coarser_after |= bool(seen[1][(crow > i) | ((crow == i) & (ccol >= j))].any())
        if coarser is not None:  # X̂ is given whole: its later pixels count too
            assert sees_coarser_after


# ------------------------------------------------- the factors apart, and together
def test_train_factors_freezes_the_other_factors_and_leaves_them_out_of_the_loss():
    model = grayscale_model(train_factors=["x"])
    x = images(model.image_shape)
    model.data_dependent_init(x)
    model.train()
    assert set(model.term_kinds) == {"nll/x"}
    terms = model.elbo_terms(x)
    assert set(terms) == {"nll/x"}
    model.loss(model.checked(terms)).backward()
    assert all(p.grad is None and not p.requires_grad for p in model.nets["gray4"].parameters())
    assert all(p.grad is not None for p in model.nets["x"].parameters())
    model.eval()  # evaluation reports every factor
    assert set(model.elbo_terms(x)) == {"nll/x", "nll/gray4"}
    with pytest.raises(ValueError, match="train_factors"):
        grayscale_model(train_factors=["colour"])


def test_factor_checkpoints_combine_two_separately_trained_factors(tmp_path):
    x = images((3, 7, 9))
    trained = {}
    for name, seed in (("gray4", 1), ("x", 2)):
        model = grayscale_model(seed=seed, train_factors=[name])
        model.data_dependent_init(x)
        path = tmp_path / f"{name}.ckpt"
        torch.save({"state_dict": model.state_dict()}, path)
        trained[name] = (model.eval(), str(path))
    combined = grayscale_model(seed=3, factor_checkpoints={n: p for n, (_, p) in trained.items()})
    combined.eval()
    with torch.no_grad():
        terms = combined.elbo_terms(x)
        for name, (model, _) in trained.items():
            assert torch.equal(terms[f"nll/{name}"], model.elbo_terms(x)[f"nll/{name}"]), name
    # loading a checkpoint of the combined model keeps the factors from their files
    ckpt = {"state_dict": {k: torch.zeros_like(v) for k, v in combined.state_dict().items()}}
    combined.on_load_checkpoint(ckpt)
    assert torch.equal(ckpt["state_dict"]["nets.x.out.bias"], trained["x"][0].nets.x.out.bias)
    with pytest.raises(FileNotFoundError, match="factor_checkpoints"):
        grayscale_model(factor_checkpoints={"x": str(tmp_path / "missing.ckpt")})


# ------------------------------------------------------------------------- sampling
def test_samples_follow_their_noise_and_every_level_is_valid():
    model = grayscale_model((3, 5, 4))
    x = images(model.image_shape)
    ready(model, x).float()
    noise = model.sample_noise(2, torch.Generator().manual_seed(0))
    assert list(noise) == ["gray4", "x"]  # coarsest first: the order of sampling
    first, again = model.sample_levels(2, noise), model.sample_levels(2, noise)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    sample, view = first
    assert sample.shape == (2, 3, 5, 4) and view.shape == (2, 1, 5, 4)
    assert sample.min() >= 0 and sample.max() <= 255 and view.max() <= 15
    assert torch.equal(sample, sample.round())


@pytest.mark.parametrize("sampling", ["ordinary", "variance_reduced", "map"])
def test_colourize_draws_several_colourings_that_keep_each_input_view_exactly(sampling):
    model = grayscale_model((3, 4, 5))
    model.likelihood.sampling = sampling
    x = images(model.image_shape, n=2)
    ready(model, x).float()
    views = model.views_of(x)[1]
    colourings = model.colourize(views, n_colourings=3)
    assert colourings.shape == (6, 3, 4, 5)
    assert torch.equal(model.views_of(colourings)[1], views.repeat_interleave(3, 0))
    if sampling != "map":  # different draws for one input
        assert not torch.equal(colourings[0], colourings[1])


def test_pyramid_samples_are_consistent_across_levels():
    """Each sampled level's view is exactly the coarser sampled level (odd sizes)."""
    model = pyramid_model((3, 7, 5))
    x = images(model.image_shape)
    ready(model, x).float()
    levels = model.sample_levels(3)
    assert [tuple(v.shape[1:]) for v in levels] == model.level_shapes
    for level, view in enumerate(model.views):
        assert torch.equal(view(levels[level]), levels[level + 1]), level


# ------------------------------------------------------------------------------ CLI
AUX = [
    "--model.class_path", "lightning_modules.AuxiliaryPixelCNN",
    "--model.init_args.views", '[{"class_path": "lightning_modules.views.Grayscale"}]',
    "--model.init_args.base.init_args.nr_resnet", "1",
    "--model.init_args.base.init_args.channels", "8",
    "--model.init_args.base.init_args.dropout", "0.0",
    "--model.init_args.conditional.init_args.nr_resnet", "1",
    "--model.init_args.conditional.init_args.channels", "8",
    "--model.init_args.embedding.init_args.n_blocks", "2",
    "--model.init_args.embedding.init_args.channels", "6",
    "--model.init_args.embedding.init_args.down_after", "[1]",
    "--model.init_args.embedding.init_args.up_after", "[2]",
    "--model.init_args.likelihood", "DiscretizedLogisticMixture",
    "--model.init_args.likelihood.n_mix", "2",
    "--data.class_path", "tests.tiny_data.TinyColour",
    "--data.init_args.n_test", "13",
    "--data.init_args.eval_batch_size", "5",
]  # fmt: skip


DATA = AUX[AUX.index("--data.class_path") :]
FIGURES = ["--colourizations.n_originals", "2", "--colourizations.n_colourings", "2",
           "--multiscale.n_samples", "2"]  # fmt: skip


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> Path:
    """The run directory of a 3-step CLI fit, tested after the fit."""
    cwd = tmp_path_factory.mktemp("aux")
    ok(arvae("fit", *AUX, *QUIET, *FIGURES, "--trainer.max_steps", "3", "--test_after_fit",
             "true", "--trainer.logger.init_args.name", "aux", cwd=cwd))  # fmt: skip
    return cwd / "runs" / "aux" / "version_0"


def test_cli_fit_then_test_reports_each_factor_and_their_sum(fitted):
    report = read_report(fitted)
    m = report["metrics"]
    assert report["n_test_examples"] == 13
    assert m["test/nelbo"] == pytest.approx(m["test/nll/x"] + m["test/nll/gray4"], rel=1e-6)
    assert m["test/bpd"] == pytest.approx(m["test/bpd/x"] + m["test/bpd/gray4"], rel=1e-6)
    assert m["test/bpd_at/x"] == pytest.approx(m["test/bpd"], rel=1e-6)
    assert m["test/nll_iwae"] == pytest.approx(m["test/nelbo"], rel=1e-6)  # exact: no latent
    written = {p.name for p in (fitted / "samples").iterdir()}
    assert {"samples_test.png", "noise_gray4_test.png", "noise_x_test.png"} <= written
    assert {"colourizations_test.png", "multiscale_test.png"} <= written


def test_ddp_test_of_a_checkpoint_matches_one_process(fitted, tmp_path):
    """`arvae test` of the fit's checkpoint on 2 gloo ranks and in one process: each of the 13
    test images once, the same numbers for every factor."""
    ckpt = fitted.parents[2] / read_report(fitted)["ckpt_path"]
    # one small figure of each kind: rank zero draws while the others wait (a collective
    # inside a figure callback's rank-zero branch would hang here)
    figures = ["--multiscale.n_samples", "1", "--colourizations.n_originals", "1",
               "--colourizations.n_colourings", "1", "--samples.n_samples", "0",
               "--noise_variation.n_rows", "0"]  # fmt: skip
    one = check_one_process_and_ddp_tests("lightning_modules.AuxiliaryPixelCNN", ckpt,
                                                    [*DATA, *figures], tmp_path)  # fmt: skip
    assert one["n_test_examples"] == 13 and "test/bpd/gray4" in one["metrics"]


def test_the_paper_config_parses_into_the_grayscale_pixelcnn_of_section_4_1(tmp_path):
    """§4.1's schedule and sizes, and the full-size model builds for CIFAR-10."""
    config_file = REPO / "experiments" / "auxiliary" / "grayscale_cifar10.yaml"
    config = printed_config("fit", "-c", str(config_file))
    init = config["model"]["init_args"]
    assert (init["optimizer"], init["lr"], init["lr_decay"]) == ("adam", 0.001, 0.99999)
    assert config["data"]["init_args"]["batch_size"] == 64 and config["data"]["init_args"]["flip"]
    assert init["embedding"]["init_args"]["n_blocks"] == 24
    assert init["base_likelihood"]["init_args"]["n_values"] == 16
    assert all(init[n]["init_args"]["dropout"] == 0.5 for n in ("base", "conditional", "embedding"))
    init = {k: v for k, v in init.items() if k not in ("image_shape", "data_kind")}
    model = AuxiliaryPixelCNN(image_shape=(3, 32, 32), **init)
    assert model.level_names == ["x", "gray4"]
    conditional = model.nets["x"]
    blocks = sum(len(stage) for stage in [*conditional.up_u, *conditional.down_u])
    assert blocks == 6 * 4 + 2  # 6 stages of nr_resnet 4, plus the down pass's 2 extra


@pytest.mark.parametrize(
    "name, data, levels",
    [
        ("pyramid_celeba", "CelebA", ["x", "64x64", "32x32", "16x16", "8x8"]),
        ("pyramid_cifar10", "CIFAR10", ["x", "16x16", "8x8"]),
    ],
)
def test_the_pyramid_configs_hold_section_4_2(name, data, levels, tmp_path):
    """§4.2: light levels (3 blocks, no down/up-sampling, 100 filters), the 15-block embedding
    (down after 3, up after 9 and 12), Adam 1e-3 with decay 0.999995, batch 16, 60 epochs."""
    config_file = REPO / "experiments" / "auxiliary" / f"{name}.yaml"
    config = printed_config("fit", "-c", str(config_file))
    assert config["data"]["class_path"] == f"datamodules.{data}"
    assert config["data"]["init_args"]["batch_size"] == 16 and config["trainer"]["max_epochs"] == 60
    init = config["model"]["init_args"]
    assert (init["optimizer"], init["lr"], init["lr_decay"]) == ("adam", 0.001, 0.999995)
    for net in ("base", "conditional"):
        args = init[net]["init_args"]
        assert (args["nr_resnet"], args["channels"], args["resolutions"]) == (3, 100, 1)
    embed = init["embedding"]["init_args"]
    assert (embed["n_blocks"], embed["down_after"], embed["up_after"]) == (15, [3], [9, 12])
    size = {"CelebA": 128, "CIFAR10": 32}[data]
    init = {k: v for k, v in init.items() if k not in ("image_shape", "data_kind")}
    model = AuxiliaryPixelCNN(image_shape=(3, size, size), **init)
    assert model.level_names == levels


def test_cli_tests_two_separately_trained_factors_as_one_model(tmp_path):
    """The paper's protocol: each factor trained in a run of its own (`train_factors`), then
    `arvae test` of one run's checkpoint with the other factor from the other run's
    (`factor_checkpoints`): each factor's test NLL is that of the run that trained it."""
    runs = {}
    for factor in ("gray4", "x"):
        ok(arvae("fit", *AUX, *QUIET, "--model.init_args.train_factors", f"[{factor}]",
                 "--trainer.max_steps", "2", "--test_after_fit", "true",
                 "--samples.n_samples", "0", "--noise_variation.n_rows", "0",
                 "--multiscale.n_samples", "0", "--colourizations.n_colourings", "0",
                 "--seed_everything", {"gray4": "1", "x": "2"}[factor],
                 "--trainer.logger.init_args.name", factor, cwd=tmp_path))  # fmt: skip
        runs[factor] = tmp_path / "runs" / factor / "version_0"
    ckpt = {f: tmp_path / read_report(run)["ckpt_path"] for f, run in runs.items()}
    ok(arvae("test", "--model", "lightning_modules.AuxiliaryPixelCNN", *QUIET, *DATA,
             "--ckpt_path", str(ckpt["x"]),
             "--model.init_args.factor_checkpoints", f"{{gray4: {ckpt['gray4']}}}",
             "--samples.n_samples", "0", "--noise_variation.n_rows", "0",
             "--multiscale.n_samples", "0", "--colourizations.n_colourings", "0",
             "--trainer.logger.init_args.name", "both", cwd=tmp_path))  # fmt: skip
    both = read_report(tmp_path / "runs" / "both" / "version_0")["metrics"]
    for factor, run in runs.items():
        alone = read_report(run)["metrics"]
        assert both[f"test/nll/{factor}"] == pytest.approx(alone[f"test/nll/{factor}"], rel=1e-6)
    assert both["test/nelbo"] == pytest.approx(
        both["test/nll/x"] + both["test/nll/gray4"], rel=1e-6
    )


def test_figures_can_sample_by_another_mode_and_leave_the_model_as_it_was():
    """Figs. 4 and 5 from a trained model: the figure callbacks' ``sampling`` switches every
    mixture of the model for the figure only; a categorical level samples as it is."""
    model = grayscale_model((3, 4, 4))
    mixture = model.likelihoods[0]
    with sampling_mode(model, "variance_reduced", 0.3):
        assert (mixture.sampling, mixture.log_scale_shift) == ("variance_reduced", 0.3)
    assert (mixture.sampling, mixture.log_scale_shift) == ("ordinary", 0.5)
    with pytest.raises(RuntimeError), sampling_mode(model, "map", None):
        assert mixture.sampling == "map"
        raise RuntimeError
    assert mixture.sampling == "ordinary"


@pytest.mark.parametrize("resolutions, crop", [(3, 4), (3, 8), (1, 3)])
def test_the_sampler_s_crop_of_canvas_and_map_gives_the_full_images_outputs(resolutions, crop):
    """Sampling row i runs a level on rows 0..c of the canvas and of f_w's map, c the next
    multiple of the coarsest stream's stride: those rows' parameters are the full image's."""
    torch.manual_seed(0)
    net = functools.partial(NET, resolutions=resolutions)
    model = AuxiliaryPixelCNN(views=[Grayscale()], image_shape=(3, 9, 5), base=net,
                              conditional=net, embedding=EMBED,
                              likelihood=DiscretizedLogisticMixture(n_mix=2))  # fmt: skip
    x = images(model.image_shape, n=2)
    ready(model, x)
    levels = model.views_of(x.double())
    cond = model.embed("x", levels[1], 0)
    with torch.no_grad():
        full = model.factor_params(0, levels[0], cond)
        part = model.factor_params(0, levels[0][:, :, :crop], cond[:, :, :crop])
    torch.testing.assert_close(part, full[:, :, :crop], rtol=0, atol=1e-10)
