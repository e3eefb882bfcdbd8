"""PixelCNN++ network: causality and receptive field by gradients, conditioning, weight norm
with data-dependent init, odd sizes."""

import itertools
import math

import pytest
import torch
from torch.nn.utils import parametrize

from lightning_modules.backbone.pixelcnnpp import (
    Dropout,
    PixelCNNppNet,
    ShiftedConv2d,
    ShiftedConvTranspose2d,
    concat_elu,
    padded_concat_elu,
    resize_map,
)

C_IN, C_OUT, COND_VEC, COND_MAP = 3, 4, 3, 2
SIZES = [(5, 7), (7, 5), (8, 8), (6, 9)]


def make_net(nr_resnet: int = 1, cond: bool = False, seed: int = 0, **kw) -> PixelCNNppNet:
    """A tiny float64 net, data-initialized, then every parameter perturbed: causality must
    not rest on any initial value (zero biases, unit gains)."""
    torch.manual_seed(seed)
    net = PixelCNNppNet(
        C_IN,
        C_OUT,
        nr_resnet=nr_resnet,
        channels=8,
        dropout=0.0,
        cond_vec_dim=COND_VEC if cond else 0,
        cond_map_channels=COND_MAP if cond else 0,
        **kw,
    ).double()
    x, vec, cmap = inputs(4, 6, 7, cond)
    net.init_from_data(x, vec, cmap)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return net


def inputs(b: int, h: int, w: int, cond: bool, map_size: tuple[int, int] | None = None):
    x = torch.rand(b, C_IN, h, w, dtype=torch.float64) * 2 - 1
    if not cond:
        return x, None, None
    vec = torch.randn(b, COND_VEC, dtype=torch.float64)
    cmap = torch.randn(b, COND_MAP, *(map_size or (h, w)), dtype=torch.float64)
    return x, vec, cmap


def strictly_before(h: int, w: int, i: int, j: int) -> torch.Tensor:
    rows, cols = torch.arange(h)[:, None], torch.arange(w)[None, :]
    return (rows < i) | ((rows == i) & (cols < j))


def seen_pixels(net, x, vec=None, cmap=None) -> dict[tuple[int, int], torch.Tensor]:
    """(i, j) -> (H, W) bool: input pixels (any channel) out[0, :, i, j] has a gradient on.
    One backward per position, summed over the output channels."""
    x = x[:1].clone().requires_grad_(True)
    out = net(x, vec, cmap)
    h, w = x.shape[-2:]
    seen = {}
    for i, j in itertools.product(range(h), range(w)):
        (grad,) = torch.autograd.grad(out[0, :, i, j].sum(), x, retain_graph=True)
        seen[i, j] = grad[0].abs().sum(0) > 0
    return seen


def assert_causal(seen: dict) -> None:
    for (i, j), s in seen.items():
        forbidden = ~strictly_before(*s.shape, i, j)
        assert not s[forbidden].any(), f"output ({i}, {j}) sees pixel (i, j) or a later one"


def theoretical_gap(h: int, w: int, i: int, j: int, nr_resnet: int) -> torch.Tensor:
    """Earlier pixels out of reach (see PixelCNNppNet's docstring): on odd rows, the current row
    beyond 4 * nr_resnet + 2 to the left and the row above beyond that to the right."""
    reach = 4 * nr_resnet + 2
    gap = torch.zeros(h, w, dtype=torch.bool)
    if i % 2:
        gap[i, : max(j - reach, 0)] = True
        gap[i - 1, j + reach + 1 :] = True
    return gap


@pytest.mark.parametrize("size", SIZES)
def test_causal_and_receptive_field_with_random_weights(size):
    h, w = size
    net = make_net(nr_resnet=1, seed=h * w)
    x, _, _ = inputs(1, h, w, False)
    seen = seen_pixels(net, x)
    assert_causal(seen)
    # every earlier pixel is seen but the documented gap: all of them when w <= 7 (reach 6)
    for (i, j), s in seen.items():
        expected = strictly_before(h, w, i, j) & ~theoretical_gap(h, w, i, j, 1)
        assert torch.equal(s, expected), f"output ({i}, {j}): receptive field differs"
    if w > 7:
        assert any(theoretical_gap(h, w, i, j, 1).any() for i, j in seen), "gap not exercised"


@pytest.mark.parametrize("size", [(8, 8), (6, 9)])
def test_deeper_network_sees_every_earlier_pixel(size):
    net = make_net(nr_resnet=2, seed=1)
    seen = seen_pixels(net, inputs(1, *size, False)[0])
    for (i, j), s in seen.items():
        assert torch.equal(s, strictly_before(*size, i, j)), f"output ({i}, {j})"


@pytest.mark.parametrize("level", [0, 1, 2])
def test_conditioning_changes_output_and_keeps_causality(level):
    h, w = 7, 9
    map_size = [(7, 9), (4, 5), (2, 3)][level]  # full, half, quarter resolution (ceil)
    net = make_net(cond=True, seed=level)
    x, vec, cmap = inputs(2, h, w, True, map_size)
    out = net(x, vec, cmap)
    assert not torch.allclose(out, net(x, torch.randn_like(vec), cmap))
    assert not torch.allclose(out, net(x, vec, torch.randn_like(cmap)))
    # x stays causal with the map; the map may be seen anywhere, also after (i, j)
    assert_causal(seen_pixels(net, x[:1], vec[:1], cmap[:1]))
    cmap = cmap[:1].clone().requires_grad_(True)
    net(x[:1], vec[:1], cmap)[0, :, 0, 0].sum().backward()
    later = ~strictly_before(*map_size, 0, 1)  # positions after (0, 0)
    assert cmap.grad[0].abs().sum(0)[later].sum() > 0


def test_resize_map_aligns_cells_for_odd_sizes():
    m = torch.randn(1, 2, 7, 9)
    half = resize_map(m, (4, 5))
    # ceil-mode 2x2 averages: the last row / column average the cells they have
    assert torch.allclose(half[..., 0, 0], m[..., :2, :2].mean((-2, -1)))
    assert torch.allclose(half[..., 3, 4], m[..., 6, 8])
    assert torch.allclose(resize_map(m, (2, 3)), resize_map(half, (2, 3)))
    quarter = torch.randn(1, 2, 2, 3)
    up = resize_map(quarter, (7, 9))
    rows, cols = torch.arange(7) // 4, torch.arange(9) // 4  # a quarter cell covers 4x4
    assert torch.equal(up, quarter[:, :, rows][:, :, :, cols])
    assert torch.equal(resize_map(m, (7, 9)), m)


def normalized(t: torch.Tensor) -> bool:
    mean, std = t.mean((0, 2, 3)), t.std((0, 2, 3), correction=0)
    return bool(torch.allclose(mean, torch.zeros_like(mean), atol=1e-4)) and bool(
        torch.allclose(std, torch.ones_like(std), atol=1e-3)
    )


@pytest.mark.parametrize("cond", [False, True])
def test_data_dependent_init_normalizes_and_every_parameter_learns(cond):
    torch.manual_seed(0)
    net = PixelCNNppNet(
        C_IN,
        C_OUT,
        nr_resnet=1,
        channels=8,
        dropout=0.0,
        cond_vec_dim=COND_VEC if cond else 0,
        cond_map_channels=COND_MAP if cond else 0,
    )
    x, vec, cmap = inputs(8, 7, 9, cond, (4, 5) if cond else None)
    x, vec, cmap = (None if t is None else t.float() for t in (x, vec, cmap))
    n_layers = sum(parametrize.is_parametrized(m) for m in net.modules())
    assert net.init_from_data(x, vec, cmap) == n_layers  # every layer, once
    # a transposed weight (in, out, kh, kw) is normalized per output channel: dim 1
    deconv = net.up_u_conv[0]
    assert deconv.parametrizations.weight.original0.shape == (1, 8, 1, 1)
    norms = torch.linalg.vector_norm(deconv.weight, dim=(0, 2, 3))
    assert torch.allclose(norms, deconv.parametrizations.weight.original0.flatten())

    outputs = {}
    layers = {"u_init": net.u_init, "deconv": deconv, "gate": net.down_ul[2][1].conv2}
    for name, m in layers.items():
        m.register_forward_hook(lambda m, i, o, name=name: outputs.__setitem__(name, o))
    out = net(x, vec, cmap)
    assert isinstance(net.u_init, ShiftedConv2d) and isinstance(deconv, ShiftedConvTranspose2d)
    for name, o in outputs.items():
        assert normalized(o), f"{name} not normalized after the data-dependent init"
    assert normalized(out) and torch.isfinite(out).all()

    out.pow(2).sum().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} gets no gradient"


@pytest.mark.parametrize("h,w", list(itertools.product([5, 7, 9, 32], repeat=2)))
def test_output_shape_for_odd_and_even_sizes(h, w):
    torch.manual_seed(0)
    net = PixelCNNppNet(C_IN, C_OUT, nr_resnet=1, channels=8, cond_map_channels=COND_MAP).eval()
    x = torch.rand(2, C_IN, h, w) * 2 - 1
    quarter = torch.randn(2, COND_MAP, (h + 3) // 4, (w + 3) // 4)
    assert net(x, cond_map=quarter).shape == (2, C_OUT, h, w)
    assert net(x, cond_map=torch.randn(2, COND_MAP, h, w)).shape == (2, C_OUT, h, w)


def test_missing_or_unexpected_conditioning_is_an_error():
    net = PixelCNNppNet(C_IN, C_OUT, nr_resnet=1, channels=8, cond_vec_dim=COND_VEC)
    x = torch.zeros(1, C_IN, 5, 5)
    with pytest.raises(ValueError, match="cond_vec"):
        net(x)
    with pytest.raises(ValueError, match="cond_map"):
        net(x, torch.zeros(1, COND_VEC), torch.zeros(1, 1, 5, 5))
    assert PixelCNNppNet.receptive_rows is None


@pytest.mark.parametrize("p", [0.2, 0.5, 0.37])
def test_dropout_zeroes_each_element_with_probability_p_and_rescales_the_rest(p):
    """The fast mask (16 random bits per element against p's threshold) is nn.Dropout's
    distribution with p rounded to a multiple of 2^-16: a fraction p of elements dropped,
    independently (neighbours in memory too: four masks share a 64-bit draw), the rest scaled
    by 1 / (1 - p), the gradient masked alike; off in eval mode. The mask follows a
    channels-last input's layout."""
    torch.manual_seed(0)
    drop = Dropout(p).train()
    rounded = round(p * 2**16) / 2**16
    assert abs(rounded - p) <= 2**-17
    x = torch.ones(8, 50, 25, 20).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    y = drop(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    kept = y != 0
    sd = math.sqrt(p * (1 - p) / x.numel())
    assert abs((1 - kept.float().mean().item()) - p) < 5 * sd
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / (1 - rounded)))
    y.sum().backward()
    torch.testing.assert_close(x.grad, kept.float() / (1 - rounded))
    flat = kept.permute(0, 2, 3, 1).flatten().float()  # memory order
    for lag in (1, 2, 3, 4):  # within one 64-bit draw and across draws
        pairs = flat[:-lag] * flat[lag:]
        assert abs(pairs.mean().item() - (1 - p) ** 2) < 5 * math.sqrt((1 - p) ** 2 / x.numel())
    assert torch.equal(drop.eval()(x), x)


def test_dropout_of_a_view_that_is_not_dense():
    sliced = torch.randn(3, 8, 5, 6)[:, ::2]  # the mask is laid out contiguously instead
    assert (Dropout(0.5).train()(sliced) == 0).float().mean().item() == pytest.approx(0.5, abs=0.1)


def test_dropout_near_one_drops_everything_and_near_zero_nothing():
    x = torch.randn(3, 4, 5, 6)
    assert torch.equal(Dropout(1 - 2**-20).train()(x), torch.zeros_like(x))
    assert torch.equal(Dropout(2**-20).train()(x), x)


@pytest.mark.parametrize("pad", [(0, 0, 0, 0), (1, 1, 1, 0), (1, 0, 1, 0), (2, 1, 1, 1)])
@pytest.mark.parametrize("n_parts", [1, 2])
def test_padded_concat_elu_is_the_padded_composition_with_its_gradient(pad, n_parts):
    """The fused op that feeds a gated block's unpadded convolutions equals
    F.pad(concat_elu(cat(parts)), pad) (channel order [elu(parts), elu(-parts)]) at odd sizes,
    channels last, and its backward is the composition's gradient (gradcheck, float64)."""
    torch.manual_seed(0)
    parts = tuple(torch.randn(2, c, 5, 7, dtype=torch.float64) for c in (3, 2)[:n_parts])
    out = padded_concat_elu(parts, pad)
    expected = torch.nn.functional.pad(concat_elu(torch.cat(parts, dim=1)), pad)
    torch.testing.assert_close(out, expected, rtol=1e-15, atol=1e-15)
    assert out.is_contiguous(memory_format=torch.channels_last)
    leaves = tuple(p.clone().requires_grad_() for p in parts)
    assert torch.autograd.gradcheck(lambda *a: padded_concat_elu(a, pad), leaves)
    half = padded_concat_elu(tuple(p.to(torch.bfloat16) for p in parts), pad)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.double(), expected, rtol=1e-2, atol=1e-2)
    mixed = (leaves[0].detach().to(torch.bfloat16).requires_grad_(), *leaves[1:])
    out = padded_concat_elu(mixed, pad)  # promoted, each gradient in its part's dtype
    assert out.dtype == (torch.float64 if n_parts == 2 else torch.bfloat16)
    out.sum().backward()
    assert [p.grad.dtype for p in mixed] == [p.dtype for p in mixed]
