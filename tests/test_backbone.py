"""Causality of every masked network, proven by gradients, and the likelihood heads."""

import itertools
import math

import pytest
import torch
from einops import rearrange
from torch import nn

from lightning_modules.backbone import (
    GatedBlock,
    GatedPixelCNN,
    MaskedConv2d,
    PixelEmbedding,
    PlainPixelCNN,
    ResBlock,
    causal_mask,
    from_vector,
    he_init_,
    n_halvings,
    resnet,
    sample_autoregressive,
    shift_down,
    to_vector,
    weight_norm_masked_,
)
from lightning_modules.likelihoods import Bernoulli, Categorical, DiagonalGaussian, bits_per_dim

H, W = 6, 7


def input_jacobian(f, x: torch.Tensor, i: int, j: int, c: int) -> torch.Tensor:
    """|d f(x)[0, c, i, j] / d x[0]|, shaped like x[0]."""
    x = x.clone().requires_grad_(True)
    f(x)[0, c, i, j].backward()
    return x.grad[0].abs()


def strictly_before(i: int, j: int) -> torch.Tensor:
    """(H, W) bool: positions before (i, j) in raster order."""
    rows = torch.arange(H)[:, None]
    cols = torch.arange(W)[None, :]
    return (rows < i) | ((rows == i) & (cols < j))


def assert_causal(f, n_colors: int, in_channels: int, out_channels: int, blind_spot_free: bool):
    """Output channel of colour g at (i, j) may depend on input pixels before (i, j) and, at
    (i, j) itself, only on input channels of colours < g. Nothing else, ever."""
    torch.manual_seed(0)
    x = torch.randn(1, in_channels, H, W, dtype=torch.float64)
    for i, j, c in itertools.product(range(H), range(W), range(out_channels)):
        grad = input_jacobian(f, x, i, j, c)
        allowed = strictly_before(i, j).expand(in_channels, H, W).clone()
        colour = torch.arange(in_channels) % n_colors
        allowed[:, i, j] = colour < c % n_colors
        assert grad[~allowed].max() == 0, f"output ({c},{i},{j}) sees a forbidden input"
        if blind_spot_free:
            assert (grad[:, :i, :].sum(0) > 0).all(), f"output ({c},{i},{j}) misses a row above"
            assert (grad[:, i, :j].sum(0) > 0).all(), f"output ({c},{i},{j}) misses a pixel left"


@pytest.mark.parametrize("n_colors", [1, 3])
@pytest.mark.parametrize("n_layers", [1, 2, 4])
def test_gated_pixelcnn_is_causal_without_blind_spot(n_layers, n_colors):
    net = GatedPixelCNN(
        n_colors,
        2 * n_colors,
        n_layers=n_layers,
        channels=6,
        first_kernel=7,
        kernel=5,
        n_colors=n_colors,
    ).double()
    # 4 layers of 5x5 after a 7x7 see every earlier pixel of a 6x7 image: no blind spot
    assert_causal(net.double(), n_colors, n_colors, 2 * n_colors, blind_spot_free=n_layers == 4)


@pytest.mark.parametrize("n_colors", [1, 3])
def test_plain_pixelcnn_is_causal(n_colors):
    net = PlainPixelCNN(
        n_colors, n_colors, n_layers=3, channels=6, first_kernel=3, kernel=3, n_colors=n_colors
    ).double()
    assert_causal(net, n_colors, n_colors, n_colors, blind_spot_free=False)


def test_both_stacks_are_causal_after_n_layers():
    """The horizontal stack never sees the current pixel; the vertical stack reaches it only
    shifted down, i.e. from strictly earlier rows."""
    blocks = [GatedBlock(1, 4, 5, first=True)] + [
        GatedBlock(4, 4, 3, first=False) for _ in range(3)
    ]
    blocks = torch.nn.ModuleList(blocks).double()

    def stacks(x):
        v, h = x, x
        for block in blocks:
            v, h = block(v, h)
        return v, h

    x = torch.randn(1, 1, H, W, dtype=torch.float64)
    for i, j in itertools.product(range(H), range(W)):
        grad_h = input_jacobian(lambda t: stacks(t)[1], x, i, j, 0)[0]
        assert grad_h[~strictly_before(i, j)].max() == 0
        grad_v = input_jacobian(lambda t: shift_down(stacks(t)[0]), x, i, j, 0)[0]
        assert grad_v[i:].max() == 0, "shifted vertical stack sees the current row"


def test_conditioning_reaches_every_position_without_breaking_causality():
    net = GatedPixelCNN(1, 1, n_layers=2, channels=4, cond_vec_dim=3, cond_map_channels=2).double()
    x = torch.randn(1, 1, H, W, dtype=torch.float64)
    vec = torch.randn(1, 3, dtype=torch.float64, requires_grad=True)
    cmap = torch.randn(1, 2, H, W, dtype=torch.float64, requires_grad=True)
    net(x, vec, cmap)[0, 0, 0, 0].backward()
    assert vec.grad.abs().sum() > 0 and cmap.grad[:, :, 0, 0].abs().sum() > 0
    assert_causal(lambda t: net(t, vec.detach(), cmap.detach()), 1, 1, 1, blind_spot_free=False)


def test_mask_types_and_colour_groups():
    a = causal_mask(3, 3, (3, 3), (1, 1), "A", n_groups=3)
    b = causal_mask(3, 3, (3, 3), (1, 1), "B", n_groups=3)
    assert a[:, :, 0].min() == 1 and a[:, :, 1, 0].min() == 1  # rows above, left: visible
    assert a[:, :, 2].max() == 0 and a[:, :, 1, 2].max() == 0  # below, right: hidden
    # at the centre: R sees nothing (A) / R (B); G sees R (A) / R,G (B); B sees R,G (A)
    assert torch.equal(a[:, :, 1, 1], torch.tensor([[0.0, 0, 0], [1, 0, 0], [1, 1, 0]]))
    assert torch.equal(b[:, :, 1, 1], torch.tensor([[1.0, 0, 0], [1, 1, 0], [1, 1, 1]]))
    with pytest.raises(ValueError, match="odd"):
        MaskedConv2d(1, 1, 4, "A")


def test_bernoulli_matches_direct_computation():
    torch.manual_seed(0)
    logits = torch.randn(5, 1, 4, 4, dtype=torch.float64)
    x = torch.bernoulli(torch.full_like(logits, 0.5))
    p = torch.sigmoid(logits)
    direct = (x * p.log() + (1 - x) * (1 - p).log()).flatten(1).sum(1)
    torch.testing.assert_close(Bernoulli.log_prob(logits, x), direct.float())
    assert torch.equal(Bernoulli.mode(logits), (p > 0.5).float())
    assert set(Bernoulli.sample(logits).unique().tolist()) <= {0.0, 1.0}


def test_autoregressive_bernoulli_sums_to_one_over_all_images():
    """sum over all 2^(h*w) binary images of p(x) = 1, for an untrained conditional net."""
    h, w = 2, 3
    net = GatedPixelCNN(
        1, 1, n_layers=2, channels=4, first_kernel=3, kernel=3, cond_vec_dim=2, cond_map_channels=1
    ).double()
    bits = torch.tensor(list(itertools.product([0.0, 1.0], repeat=h * w)), dtype=torch.float64)
    x = bits.view(-1, 1, h, w)
    vec = torch.randn(1, 2, dtype=torch.float64).expand(len(x), 2)
    cmap = torch.randn(1, 1, h, w, dtype=torch.float64).expand(len(x), 1, h, w)
    logits = net(x, vec, cmap)
    log_p = -torch.nn.functional.binary_cross_entropy_with_logits(logits, x, reduction="none")
    total = log_p.flatten(1).sum(1).exp().sum()
    assert abs(float(total) - 1.0) < 1e-9


def test_gaussian_kl_analytic_matches_monte_carlo():
    torch.manual_seed(0)
    mean, log_std = torch.randn(1, 8), 0.5 * torch.randn(1, 8)
    z = DiagonalGaussian.sample(mean, log_std, torch.randn(200_000, 8))
    zeros = torch.zeros_like(z)
    mc = (
        DiagonalGaussian.log_prob(mean.expand_as(z), log_std.expand_as(z), z)
        - DiagonalGaussian.log_prob(zeros, zeros, z)
    ).mean()
    analytic = DiagonalGaussian.kl_standard_normal(mean, log_std).sum()
    assert abs(float(mc - analytic)) < 0.03 * float(analytic) + 0.01


def test_gaussian_log_prob_integrates_to_one():
    grid = torch.linspace(-12, 12, 20001, dtype=torch.float64)[:, None]
    mean, log_std = torch.tensor([[0.7]]), torch.tensor([[0.3]])
    density = DiagonalGaussian.log_prob(mean.expand_as(grid), log_std.expand_as(grid), grid).exp()
    assert abs(float(torch.trapezoid(density, grid[:, 0])) - 1) < 1e-6


# --------------------------------------------------------------- 8-bit images (E.2)
def test_rgb_pixelcnn_on_embedded_pixels_is_channel_causal():
    """R at (i, j) sees no G/B of its own pixel, G sees R, B sees R and G, through the pixel
    embedding (output channel e * 3 + c belongs to colour c) and with weight norm on."""
    embed_dim, n_values = 2, 4
    net = GatedPixelCNN(
        3 * embed_dim, 3 * n_values, n_layers=2, channels=6, first_kernel=3, kernel=3, n_colors=3
    )
    net = weight_norm_masked_(net).double()
    assert_causal(net, 3, 3 * embed_dim, 3 * n_values, blind_spot_free=False)


def test_weight_norm_keeps_initial_weights_and_masks():
    torch.manual_seed(0)
    conv = MaskedConv2d(3, 6, 3, "A", n_groups=3)
    before = conv.weight.detach().clone()
    weight_norm_masked_(conv)
    assert torch.nn.utils.parametrize.is_parametrized(conv, "weight")
    torch.testing.assert_close(conv.weight, before)
    x = torch.randn(1, 3, 5, 5)
    torch.testing.assert_close(
        conv(x), torch.nn.functional.conv2d(x, before * conv.mask, conv.bias, padding=1)
    )


def test_rgb_categorical_pixelcnn_sums_to_one_over_all_images():
    """sum over all 4^6 images (3 colours, 1x2 pixels, 4 values) of p(x) = 1: the R -> G -> B
    chain of an untrained, conditioned PixelCNN on embedded pixels is a distribution."""
    torch.manual_seed(0)
    n_values, embed_dim = 4, 2
    cat = Categorical(n_values)
    embed = PixelEmbedding(n_values, embed_dim).double()
    net = GatedPixelCNN(
        3 * embed_dim,
        3 * n_values,
        n_layers=2,
        channels=6,
        first_kernel=3,
        kernel=3,
        n_colors=3,
        cond_map_channels=2,
    ).double()
    values = torch.tensor(list(itertools.product(range(n_values), repeat=6)), dtype=torch.float64)
    x = values.view(-1, 3, 1, 2)
    cmap = torch.randn(1, 2, 1, 2, dtype=torch.float64).expand(len(x), 2, 1, 2)
    with torch.no_grad():
        params = net(embed(x), None, cmap).double()
        logits = rearrange(params, "b (v c) h w -> b c h w v", v=n_values).log_softmax(-1)
        log_p = logits.gather(-1, x.long()[..., None])[..., 0].flatten(1).sum(1)
    assert abs(float(log_p.exp().sum()) - 1.0) < 1e-9
    # the library's log_prob agrees with the direct computation (float32 logits)
    torch.testing.assert_close(cat.log_prob(params, x), log_p.float(), rtol=1e-5, atol=1e-4)


def test_categorical_log_prob_sample_and_mode():
    torch.manual_seed(0)
    cat = Categorical(256)
    params = torch.randn(4, 3 * 256, 2, 2)
    x = torch.randint(0, 256, (4, 3, 2, 2)).float()
    logits = rearrange(params, "b (v c) h w -> b c h w v", v=256).log_softmax(-1)
    direct = logits.gather(-1, x.long()[..., None])[..., 0].flatten(1).sum(1)
    torch.testing.assert_close(cat.log_prob(params, x), direct)
    assert torch.equal(cat.mode(params), logits.argmax(-1).float())
    noise = cat.noise((4, 3, 2, 2))
    sample = cat.sample(params, noise)
    assert torch.equal(sample, cat.sample(params, noise)) and sample.max() <= 255
    assert torch.equal(sample, sample.round())
    # inverse-CDF sampling follows the probabilities: a 3-way distribution, 20k draws
    probs = torch.tensor([0.2, 0.5, 0.3])
    draws = Categorical(3).sample(probs.log().view(1, 3, 1, 1).expand(20_000, 3, 1, 1))
    freq = torch.bincount(draws.flatten().long(), minlength=3) / 20_000
    torch.testing.assert_close(freq, probs, atol=0.015, rtol=0)
    with pytest.raises(ValueError, match="0..255"):
        cat.log_prob(params, x - 256)


def test_autoregressive_gaussian_prior_integrates_to_one():
    """A conditional PixelCNN with a diagonal-Gaussian head over a 1x2 latent map with one
    channel: its density integrates to 1 over the plane (the second value's Gaussian
    depends on the first)."""
    torch.manual_seed(0)
    net = GatedPixelCNN(
        1, 2, n_layers=2, channels=4, first_kernel=3, kernel=3, cond_map_channels=1
    ).double()
    with torch.no_grad():  # keep the std away from tiny values, so the grid resolves it
        net.head.out.bias.copy_(torch.tensor([0.0, 0.3]))
    grid = torch.linspace(-9, 9, 601, dtype=torch.float64)
    z = torch.cartesian_prod(grid, grid).view(-1, 1, 1, 2)
    cmap = torch.randn(1, 1, 1, 2, dtype=torch.float64).expand(len(z), 1, 1, 2)
    with torch.no_grad():
        mean, log_std = DiagonalGaussian.split(net(z, None, cmap).double())
        density = DiagonalGaussian.log_prob(mean.double(), log_std.double(), z).exp()
    step = float(grid[1] - grid[0])
    assert abs(float(density.sum()) * step**2 - 1) < 1e-3
    assert float(mean[:, :, :, 1].std()) > 0  # the second position does depend on the first


def test_gaussian_kl_between_two_gaussians_matches_monte_carlo():
    torch.manual_seed(1)
    mq, lq, mp, lp = (
        torch.randn(1, 6),
        0.3 * torch.randn(1, 6),
        torch.randn(1, 6),
        0.3 * torch.randn(1, 6),
    )
    z = DiagonalGaussian.sample(mq, lq, torch.randn(200_000, 6))
    mc = (
        DiagonalGaussian.log_prob(mq.expand_as(z), lq.expand_as(z), z)
        - DiagonalGaussian.log_prob(mp.expand_as(z), lp.expand_as(z), z)
    ).mean()
    analytic = DiagonalGaussian.kl(mq, lq, mp, lp).sum()
    assert abs(float(mc - analytic)) < 0.03 * float(analytic) + 0.01


def test_bits_per_dim_conversion():
    nats = torch.tensor([3072 * math.log(2) * 3.0])
    torch.testing.assert_close(bits_per_dim(nats, 3 * 32 * 32), torch.tensor([3.0]))
    # a uniform 256-way model costs exactly 8 bits per dimension
    cat = Categorical(256)
    x = torch.randint(0, 256, (2, 3, 4, 4)).float()
    uniform = -cat.log_prob(torch.zeros(2, 3 * 256, 4, 4), x)
    torch.testing.assert_close(bits_per_dim(uniform, 3 * 4 * 4), torch.full((2,), 8.0))


def test_resnet_blocks_resample_by_two_and_vectors_round_trip():
    x = torch.randn(2, 8, 16, 16)
    assert ResBlock(8, 12, "down")(x).shape == (2, 12, 8, 8)
    assert ResBlock(8, 12, "up")(x).shape == (2, 12, 32, 32)
    assert ResBlock(8, 8)(x).shape == x.shape
    down = resnet([8, 16, 32], 8, "down", blocks=1)
    assert down(x).shape == (2, 32, 4, 4)
    up = resnet([32, 16, 8], 32, "up", blocks=1)
    assert up(down(x)).shape == x.shape
    v = to_vector(32, 4, 10)(down(x))
    assert v.shape == (2, 10, 1, 1) and from_vector(10, 32, 4)(v).shape == (2, 32, 4, 4)
    assert n_halvings(64, 8) == 3 and n_halvings(4, 32) == 3
    with pytest.raises(ValueError, match="power of two"):
        n_halvings(24, 8)


def test_pixel_embedding_groups_channels_by_colour():
    embed = PixelEmbedding(256, 5)
    x = torch.zeros(1, 3, 2, 2)
    x[0, 1] = 7  # only G changes
    out, base = embed(x), embed(torch.zeros_like(x))
    changed = (out != base).flatten(2).any(-1)[0]
    assert changed.tolist() == [k % 3 == 1 for k in range(15)]


@pytest.mark.parametrize("kind", ["gated", "plain"])
def test_sampling_with_a_receptive_field_window_is_exact(kind):
    """Sampling row i from rows i - receptive_rows .. i gives the very same images as
    sampling from the whole canvas (same noise), so the window loses nothing."""
    torch.manual_seed(0)
    cat = Categorical(4)
    cls = GatedPixelCNN if kind == "gated" else PlainPixelCNN
    net = cls(
        3, 12, n_layers=3, channels=6, first_kernel=5, kernel=3, n_colors=3, cond_map_channels=2
    )
    cmap = torch.randn(2, 2, 9, 5)
    noise = cat.noise((2, 3, 9, 5))

    def params(x, rows):
        return net(cat.network_input(x), None, cmap[:, :, rows])

    full = sample_autoregressive(params, cat.sample, (2, 3, 9, 5), noise=noise)
    window = sample_autoregressive(
        params, cat.sample, (2, 3, 9, 5), noise=noise, context_rows=net.receptive_rows
    )
    assert torch.equal(full, window)
    assert net.receptive_rows < 9 - 1  # the window really is smaller than the canvas


def test_sampling_progress_checks_for_a_stop_after_every_row(capsys):
    """Inside sampling_progress, sampling shows its bar (on stderr) and calls the check after
    each row: a check that raises (on SIGTERM) stops it there, not at the end of the image."""
    from lightning_modules.backbone.autoregressive import sampling_progress

    cat, calls = Categorical(2), []

    def params(x, rows):
        return torch.zeros(x.shape[0], 2, x.shape[2], x.shape[3])

    def check():
        calls.append(len(calls))
        if len(calls) == 2:
            raise KeyboardInterrupt

    with sampling_progress("Figure test", check), pytest.raises(KeyboardInterrupt):
        sample_autoregressive(params, cat.sample, (2, 1, 5, 3))
    assert calls == [0, 1]  # after rows 0 and 1 of 5
    assert "Figure test: sampling 1x5x3 x 2" in capsys.readouterr().err
    sample_autoregressive(params, cat.sample, (2, 1, 5, 3))  # outside: no check, no bar
    assert calls == [0, 1] and capsys.readouterr().err == ""


@pytest.mark.parametrize(
    "layer",
    [
        nn.Conv2d(64, 48, 3, padding=1),
        nn.ConvTranspose2d(64, 48, 3, stride=2, padding=1, output_padding=1),
        nn.ConvTranspose2d(64, 32, 4, stride=2, padding=1),
    ],
    ids=["conv", "transposed 3x3 stride 2", "transposed 4x4 stride 2"],
)
def test_he_init_keeps_the_second_moment_through_a_layer(layer):
    """He init: after a ReLU (second moment 1/2 of a unit Gaussian's) a layer's outputs have
    variance ~1, also for transposed convolutions, whose output pixels each sum in x taps /
    stride^2 terms (PyTorch's fan-in, out x taps, would give 1/4 and 1/2 here)."""
    torch.manual_seed(0)
    he_init_(layer)
    out = layer(torch.relu(torch.randn(64, 64, 12, 12)))
    assert float(out[..., 2:-2, 2:-2].var()) == pytest.approx(1.0, rel=0.1)
