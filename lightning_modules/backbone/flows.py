"""Autoregressive flows for VLAE (Chen et al. 2017, section 3.2): the AF prior and the IAF
posterior, each a stack of MADE-parametrized affine steps whose variable order alternates
between steps (so every variable gets to depend on every other one).

Both start near the identity: the MADE output layer starts near zero (see ``MADE``), so
mu ~ 0 and log-scale ~ 0 for the prior, and m ~ 0 with the IAF gate bias at +2.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .made import MADE

LOG_SCALE_BOUND = 3.0  # AF prior: log sigma = B tanh(s / B), sigma in (e^-3, e^3) per step
GATE_BIAS = 2.0  # IAF: sigma = sigmoid(s) starts at sigmoid(2) ~ 0.88 (Kingma et al. 2016)


def standard_normal_log_prob(x: Tensor) -> Tensor:
    """log N(x; 0, I) summed over the last dimension."""
    return -0.5 * (x.pow(2) + math.log(2 * math.pi)).sum(-1)


class AutoregressiveFlowPrior(nn.Module):
    """VLAE's AF prior: p(z) with z = f(eps), eps ~ N(0, I); each of `steps` steps is
    z_i = eps_i * sigma_i(z_<i) + mu_i(z_<i) (mean-only: sigma = 1), MADE-parametrized,
    alternating the variable order between steps. log p(z) = log N(f^-1(z)) + log|det d eps/dz|.

    VLAE (appendix A) uses 4 mean-only steps, each a 3-layer MADE with 640 ReLU units
    (input -> 640 -> 640 -> output); mean-only steps are volume preserving (log-det 0).
    The general affine step bounds the log-scale softly, log sigma = 3 tanh(s / 3), so
    neither direction can blow up; s ~ 0 at init gives sigma ~ 1.
    """

    def __init__(
        self,
        dim: int,
        steps: int = 4,
        hidden: int = 640,
        n_hidden_layers: int = 2,
        mean_only: bool = True,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.mean_only = mean_only
        n_outputs = 1 if mean_only else 2
        self.mades = nn.ModuleList(
            MADE(dim, hidden, n_hidden_layers, n_outputs, reverse=k % 2 == 1) for k in range(steps)
        )

    def _shift_log_scale(self, made: MADE, z: Tensor) -> tuple[Tensor, Tensor]:
        """(mu, log sigma) of one step, each (B, dim), as functions of the step's output z."""
        out = made(z)
        if self.mean_only:
            return out[:, 0], torch.zeros_like(z)
        return out[:, 0], LOG_SCALE_BOUND * torch.tanh(out[:, 1] / LOG_SCALE_BOUND)

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """z -> (eps, log|det d eps / d z|) per example (B,): one parallel pass per step,
        since every step's (mu, sigma) depend only on its own output z."""
        log_det = z.new_zeros(z.shape[0])
        for made in reversed(self.mades):
            mu, log_sigma = self._shift_log_scale(made, z)
            z = (z - mu) * torch.exp(-log_sigma)
            log_det = log_det - log_sigma.sum(-1)
        return z, log_det

    def log_prob(self, z: Tensor) -> Tensor:
        """log p(z) per example (B,)."""
        eps, log_det = self.inverse(z)
        return standard_normal_log_prob(eps) + log_det

    def forward(self, eps: Tensor) -> Tensor:
        """z = f(eps) (sampling): dim passes per step, each fixing one more variable, since
        position p of the order is exact once positions < p are (after p + 1 passes)."""
        for made in self.mades:
            z = eps
            for _ in range(self.dim):
                mu, log_sigma = self._shift_log_scale(made, z)
                z = eps * torch.exp(log_sigma) + mu
            eps = z
        return eps


class IAFPosterior(nn.Module):
    """Kingma et al. 2016 inverse autoregressive flow on top of a diagonal Gaussian q(y|x):
    each step y <- sigma * y + (1 - sigma) * m with (m, s) = MADE(y, context h),
    sigma = sigmoid(s) (the numerically stable LSTM-type update, Kingma et al. eq. 14);
    mean_only: y <- y + m. Order alternates between steps.
    log q(z|x) = log q(y0|x) - sum log|det dz/dy|.

    Init: m ~ 0 and the bias of s at +2, so every step starts as y <- 0.88 y, near the
    identity (Kingma et al. 2016 appendix: s "sufficiently positive, close to +1 or +2").
    """

    def __init__(
        self,
        dim: int,
        context_dim: int,
        steps: int = 4,
        hidden: int = 640,
        n_hidden_layers: int = 2,
        mean_only: bool = False,
    ) -> None:
        super().__init__()
        self.mean_only = mean_only
        n_outputs = 1 if mean_only else 2
        self.mades = nn.ModuleList(
            MADE(dim, hidden, n_hidden_layers, n_outputs, context_dim, reverse=k % 2 == 1)
            for k in range(steps)
        )
        if not mean_only:
            with torch.no_grad():
                for made in self.mades:
                    made.layers[-1].bias.view(2, dim)[1].fill_(GATE_BIAS)

    def forward(self, y: Tensor, context: Tensor) -> tuple[Tensor, Tensor]:
        """(y, h) -> (z, log|det dz/dy|) per example (B,)."""
        log_det = y.new_zeros(y.shape[0])
        for made in self.mades:
            out = made(y, context)
            if self.mean_only:
                y = y + out[:, 0]
                continue
            m, s = out.unbind(1)
            sigma = torch.sigmoid(s)
            y = sigma * y + (1 - sigma) * m
            log_det = log_det + F.logsigmoid(s).sum(-1)
        return y, log_det
