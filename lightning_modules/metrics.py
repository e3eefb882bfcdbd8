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
