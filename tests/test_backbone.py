"""Causality of every masked network, proven by gradients, and the likelihood heads."""

import itertools

import pytest
import torch

from lightning_modules.backbone import (
    GatedBlock,
    GatedPixelCNN,
    MaskedConv2d,
    PlainPixelCNN,
    causal_mask,
    shift_down,
)
from lightning_modules.likelihoods import Bernoulli, DiagonalGaussian

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
        n_colors, 2 * n_colors, n_layers, channels=6, first_kernel=7, kernel=5, n_colors=n_colors
    ).double()
    # 4 layers of 5x5 after a 7x7 see every earlier pixel of a 6x7 image: no blind spot
    assert_causal(net.double(), n_colors, n_colors, 2 * n_colors, blind_spot_free=n_layers == 4)


@pytest.mark.parametrize("n_colors", [1, 3])
def test_plain_pixelcnn_is_causal(n_colors):
    net = PlainPixelCNN(
        n_colors, n_colors, 3, channels=6, first_kernel=3, kernel=3, n_colors=n_colors
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
    net = GatedPixelCNN(1, 1, 2, channels=4, cond_vec_dim=3, cond_map_channels=2).double()
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
        1, 1, 2, channels=4, first_kernel=3, kernel=3, cond_vec_dim=2, cond_map_channels=1
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
