"""Metrics beyond torchmetrics' aggregations, reduced across DDP ranks like them."""

import torch
from torchmetrics import Metric


class StandardError(Metric):
    """Standard error of the mean of the values seen: sample std (n - 1) / sqrt(n).

    It says how far a test mean measured on these n examples may lie from the test set's
    (or the data distribution's), e.g. whether two runs' NLLs differ by more than noise or
    what a ``limit_test_batches`` subset costs in precision. The sums are float64 so that
    large per-image values (thousands of nats on 8-bit data) keep their variance; NaN
    for fewer than two values.
    """

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        for name in ("n", "total", "total_sq"):
            zero = torch.zeros((), dtype=torch.float64)
            self.add_state(name, default=zero, dist_reduce_fx="sum")

    def update(self, values: torch.Tensor) -> None:
        values = values.detach().double().flatten()
        self.n += values.numel()
        self.total += values.sum()
        self.total_sq += values.square().sum()

    def compute(self) -> torch.Tensor:
        if self.n < 2:
            return torch.tensor(float("nan"), dtype=torch.float64, device=self.n.device)
        var = (self.total_sq - self.total.square() / self.n) / (self.n - 1)
        return (var.clamp(min=0) / self.n).sqrt()


class ActiveUnits(Metric):
    """The number of active latent units (Burda et al. 2015, §5.2): dimension u is active
    when Cov_x(E_{q(z|x)}[z_u]) > ``threshold``, the variance over the examples seen of the
    posterior mean. A unit whose posterior mean does not move with x carries no information
    about x: all-inactive levels are collapsed posteriors. Float64 sums per unit, summed
    over DDP ranks, so the count is the one set's whatever the split over ranks and batches.

    Args:
        n_units: dimensions of the latent level (its mean flattened per example).
        threshold: Burda et al.'s 0.01.
    """

    full_state_update = False

    def __init__(self, n_units: int, threshold: float = 0.01, **kwargs) -> None:
        super().__init__(**kwargs)
        self.threshold = threshold
        self.add_state("n", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        for name in ("total", "total_sq"):
            zeros = torch.zeros(n_units, dtype=torch.float64)
            self.add_state(name, default=zeros, dist_reduce_fx="sum")

    def update(self, means: torch.Tensor) -> None:
        """``means``: (B, ...) posterior means, flattened per example to the level's units."""
        means = means.detach().double().flatten(1)
        if means.shape[1] != self.total.numel():
            raise ValueError(f"expected {self.total.numel()} units, got {means.shape[1]}")
        self.n += means.shape[0]
        self.total += means.sum(0)
        self.total_sq += means.square().sum(0)

    def variances(self) -> torch.Tensor:
        """Per-unit variance over x of the posterior mean (n - 1 denominator; NaN if n < 2)."""
        if self.n < 2:
            return torch.full_like(self.total, float("nan"))
        return ((self.total_sq - self.total.square() / self.n) / (self.n - 1)).clamp(min=0)

    def compute(self) -> torch.Tensor:
        return (self.variances() > self.threshold).sum().double()
