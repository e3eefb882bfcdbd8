"""Writes the test metrics of a run as JSON next to its logs: the input of `arvae report`."""

import json
import sys
from datetime import datetime, timezone

import lightning as L
import torch
from jsonargparse import Namespace
from lightning.pytorch.utilities import rank_zero_info

from .run_dir import run_dir


class TestReport(L.Callback):
    """After ``test``, global rank zero writes ``<log_dir>/test_metrics.json`` with every
    ``test/*`` metric (nats per image; reduced over ranks), the model's hyper-parameters, the
    datamodule, the checkpoint tested, the command line, ``world_size`` (the ranks) and
    ``n_test_examples``: the examples the test really evaluated, summed over the ranks (not
    the size of the test set), so a sampler that repeats examples, or
    ``limit_test_batches``, shows in the report."""

    __test__ = False  # not a pytest test class

    def __init__(self, filename: str = "test_metrics.json") -> None:
        self.filename = filename
        self.n_seen = 0
        self.n_examples: int | None = None

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.n_seen = 0

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.n_seen += len(batch[0])  # batches are (x, index)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        seen = torch.tensor(self.n_seen, device=pl_module.device)
        self.n_examples = int(trainer.strategy.reduce(seen, reduce_op="sum"))  # every rank

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # both are read on every rank: log_dir is a broadcast, and reading a metric that was
        # not computed yet would sync it over the ranks
        log_dir = run_dir(trainer)
        metrics = {
            k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")
        }
        if not trainer.is_global_zero:
            return
        datamodule = trainer.datamodule
        report = {
            "model": type(pl_module).__name__,
            "hparams": {k: json_safe(v) for k, v in pl_module.hparams.items()},
            "datamodule": type(datamodule).__name__ if datamodule is not None else None,
            "data": {k: json_safe(v) for k, v in getattr(datamodule, "hparams", {}).items()},
            "n_test_examples": self.n_examples,
            "world_size": trainer.world_size,
            "iwae_k": getattr(pl_module, "iwae_k", None),
            "ckpt_path": trainer.ckpt_path,
            "command": ["arvae", *sys.argv[1:]],
            "global_step": trainer.global_step,
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "metrics": metrics,
        }
        path = log_dir / self.filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")
        figures = sorted((log_dir / "samples").glob("*_test.png"))
        units = getattr(pl_module, "latent_dims", {})
        rank_zero_info(summary(metrics, report["iwae_k"], units, path, figures))


def summary(
    metrics: dict[str, float], iwae_k: int | None, units: dict[str, int], path, figures: list
) -> str:
    """The test's headline: its bounds with standard errors, each latent level's KL and
    active units, and the files it wrote."""
    parts = []
    for key, name in (("nelbo", "-ELBO"), ("nll_iwae", f"IWAE (k={iwae_k})")):
        if f"test/{key}" in metrics:
            se = metrics.get(f"test/{key}_se", float("nan"))
            parts.append(f"{name} {metrics[f'test/{key}']:.2f} ± {se:.2f}")
    lines = ["Test: " + ", ".join(parts) + " nats per image"]
    if "test/bpd_iwae" in metrics:
        lines[0] += f" ({metrics['test/bpd_iwae']:.3f} bits/dim)"
    for key in sorted(k for k in metrics if k.startswith("test/kl/")):
        level = key.removeprefix("test/kl/")
        active = metrics.get(f"test/active_units/{level}")
        n = f" of {units[level]}" if level in units else ""
        count = f", {active:.0f}{n} units active" if active is not None else ""
        lines.append(f"  latent {level}: KL {metrics[key]:.2f} nats{count}")
    lines.append(f"Metrics: {path}")
    lines += [f"Figure: {figure}" for figure in figures]
    return "\n".join(lines)


def json_safe(value):
    """JSON-safe copy of a hyper-parameter value."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, Namespace):  # a class_path option as jsonargparse parsed it
        value = value.as_dict()
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    return str(value)
