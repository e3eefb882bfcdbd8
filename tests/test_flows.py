"""MADE masks proven by autograd; AF prior and IAF posterior: invertibility, log-determinants
against autograd Jacobians, normalization, and the near-identity init."""

import math

import pytest
import torch
from torch.autograd.functional import jacobian

from lightning_modules.backbone import MADE, AutoregressiveFlowPrior, IAFPosterior
from lightning_modules.backbone.flows import GATE_BIAS

DIM, HIDDEN, CONTEXT = 6, 32, 5


@pytest.fixture(autouse=True)
def seed() -> None:
    torch.manual_seed(0)


def randomized(module: torch.nn.Module, scale: float = 0.3) -> torch.nn.Module:
    """float64 copy of ``module`` with every parameter perturbed: the near-identity init would
    make the Jacobian and inverse checks trivial."""
    module = module.double()
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))
    return module


def normal_log_prob(x: torch.Tensor) -> torch.Tensor:
    return -0.5 * (x.pow(2) + math.log(2 * math.pi)).sum(-1)


def slogdet(f, x: torch.Tensor) -> torch.Tensor:
    """log|det df/dx| per example of a batched map f: (B, D) -> (B, D), by autograd."""
    return torch.stack([torch.linalg.slogdet(jacobian(lambda v: f(v[None])[0], xi))[1] for xi in x])


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("context_dim", [0, CONTEXT])
def test_made_is_autoregressive(reverse: bool, context_dim: int) -> None:
    made = randomized(MADE(DIM, HIDDEN, 2, n_outputs=3, context_dim=context_dim, reverse=reverse))
    z = torch.randn(8, DIM, dtype=torch.float64)
    c = torch.randn(8, context_dim, dtype=torch.float64) if context_dim else None
    jac = jacobian(lambda z: made(z, c).sum(0), z).abs().sum(2)  # (K, D out, D in)
    order = torch.arange(DIM).flip(0) if reverse else torch.arange(DIM)
    position = torch.empty(DIM, dtype=torch.long)
    position[order] = torch.arange(DIM)
    before = position[None, :] < position[:, None]  # [i, j]: j comes before i
    assert jac[:, ~before].max() == 0, "an output sees itself or a later input"
    assert (jac[:, before] > 0).all(), "an output misses an earlier input"
    if context_dim:
        jac_c = jacobian(lambda c: made(z, c).sum(0), c).abs().sum((2, 3))  # (K, D)
        assert (jac_c > 0).all(), "the context misses an output"


def test_made_starts_near_zero_and_rejects_narrow_hidden() -> None:
    out = MADE(DIM, HIDDEN, 2, n_outputs=2, context_dim=CONTEXT)(
        torch.randn(16, DIM), torch.randn(16, CONTEXT)
    )
    assert out.abs().max() < 0.1
    with pytest.raises(ValueError):
        MADE(DIM, DIM - 2, 2, n_outputs=1)


@pytest.mark.parametrize("mean_only", [True, False])
@pytest.mark.parametrize("steps", [1, 2, 3])
def test_af_prior_inverts_with_exact_log_det(mean_only: bool, steps: int) -> None:
    prior = randomized(AutoregressiveFlowPrior(DIM, steps, HIDDEN, mean_only=mean_only))
    z = torch.randn(4, DIM, dtype=torch.float64)
    eps, log_det = prior.inverse(z)
    torch.testing.assert_close(prior(eps), z, atol=1e-8, rtol=1e-8)
    eps = torch.randn(4, DIM, dtype=torch.float64)
    torch.testing.assert_close(prior.inverse(prior(eps))[0], eps, atol=1e-8, rtol=1e-8)

    z = z[:3]
    expected = slogdet(lambda v: prior.inverse(v)[0], z)
    torch.testing.assert_close(log_det[:3], expected, atol=1e-9, rtol=1e-9)
    if mean_only:
        assert (log_det == 0).all()
    else:
        assert log_det.abs().max() > 0.1, "the randomized affine flow should not preserve volume"
    # change of variables both ways: log p(z) = log N(f^-1(z)) + log|d eps/dz|
    torch.testing.assert_close(prior.log_prob(z), normal_log_prob(prior.inverse(z)[0]) + expected)
    z = prior(eps[:3])
    torch.testing.assert_close(
        prior.log_prob(z), normal_log_prob(eps[:3]) - slogdet(prior, eps[:3])
    )


@pytest.mark.parametrize("mean_only", [True, False])
def test_af_prior_density_integrates_to_one(mean_only: bool) -> None:
    """Quadrature of p on a box in 2-D equals the fraction of samples f(eps) in the box
    (nearly 1; the bounded-scale affine flow may leave a thin tail outside)."""
    prior = randomized(AutoregressiveFlowPrior(2, 4, HIDDEN, mean_only=mean_only), scale=0.03)
    x = torch.linspace(-12, 12, 481, dtype=torch.float64)
    mass = prior.log_prob(torch.cartesian_prod(x, x)).exp().sum() * (x[1] - x[0]) ** 2
    inside = (prior(torch.randn(20000, 2, dtype=torch.float64)).abs() < 12).all(-1)
    assert inside.double().mean() > 0.99
    assert abs(mass.item() - inside.double().mean().item()) < 1e-3


@pytest.mark.parametrize("mean_only", [True, False])
def test_iaf_log_det_matches_autograd(mean_only: bool) -> None:
    iaf = randomized(IAFPosterior(DIM, CONTEXT, steps=3, hidden=HIDDEN, mean_only=mean_only))
    y = torch.randn(3, DIM, dtype=torch.float64)
    h = torch.randn(3, CONTEXT, dtype=torch.float64)
    _, log_det = iaf(y, h)
    expected = torch.cat(
        [slogdet(lambda v, b=b: iaf(v, h[b : b + 1])[0], y[b : b + 1]) for b in range(3)]
    )
    torch.testing.assert_close(log_det, expected, atol=1e-9, rtol=1e-9)
    assert (log_det == 0).all() if mean_only else (log_det < 0).all()


def test_iaf_step_is_triangular() -> None:
    """One step (order 0..D-1): dz_i/dy_j = 0 for j after i, dz_i/dy_i = sigma_i > 0."""
    iaf = randomized(IAFPosterior(DIM, CONTEXT, steps=1, hidden=HIDDEN))
    y = torch.randn(1, DIM, dtype=torch.float64)
    h = torch.randn(1, CONTEXT, dtype=torch.float64)
    jac = jacobian(lambda v: iaf(v[None], h)[0][0], y[0])
    assert (jac.triu(1) == 0).all()
    assert (jac.diagonal() > 0).all() and (jac.diagonal() < 1).all()
    assert (jac[torch.ones(DIM, DIM).tril(-1).bool()] != 0).all(), "an output misses an input"


def test_iaf_starts_near_identity_and_is_smooth() -> None:
    y, h = torch.randn(16, DIM), torch.randn(16, CONTEXT)
    iaf = IAFPosterior(DIM, CONTEXT, steps=1, hidden=HIDDEN)
    m, s = iaf.mades[0](y, h).unbind(1)
    assert m.abs().max() < 0.1 and (s - GATE_BIAS).abs().max() < 0.1
    sigma = torch.sigmoid(torch.tensor(GATE_BIAS))
    z, log_det = iaf(y, h)
    torch.testing.assert_close(z, sigma * y, atol=0.05, rtol=0)
    torch.testing.assert_close(log_det, DIM * sigma.log().expand(16), atol=0.05, rtol=0)
    z, log_det = IAFPosterior(DIM, CONTEXT, hidden=HIDDEN, mean_only=True)(y, h)
    torch.testing.assert_close(z, y, atol=0.1, rtol=0)
    assert (log_det == 0).all()

    iaf = randomized(IAFPosterior(DIM, CONTEXT, steps=4, hidden=HIDDEN))
    direction = torch.randn(1, DIM, dtype=torch.float64)
    t = torch.linspace(0, 1e-3, 11, dtype=torch.float64)[:, None]
    z, _ = iaf(y[:1].double() + t * direction, h[:1].double().expand(11, -1))
    steps = (z[1:] - z[:-1]).norm(dim=-1)
    assert steps.max() < 1e-3 and steps.max() < 1.5 * steps.min(), "output is not smooth"


def test_paper_sizes_run() -> None:
    """VLAE appendix A: dim 64, 4 steps of a 640-unit 3-layer MADE."""
    prior, iaf = AutoregressiveFlowPrior(64), IAFPosterior(64, context_dim=32)
    eps = torch.randn(3, 64)
    z = prior(eps)
    back, log_det = prior.inverse(z)
    torch.testing.assert_close(back, eps, atol=1e-4, rtol=1e-4)
    assert (log_det == 0).all() and prior.log_prob(z).isfinite().all()
    z, log_det = iaf(torch.randn(3, 64), torch.randn(3, 32))
    assert z.shape == (3, 64) and log_det.shape == (3,) and log_det.isfinite().all()
