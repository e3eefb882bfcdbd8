"""Writes the test metrics of a run as JSON next to its logs: the input of `arvae report`."""

import json
from datetime import datetime, timezone

import lightning as L

from .run_dir import run_dir


class TestReport(L.Callback):
    """After ``test``, global rank zero writes ``<log_dir>/test_metrics.json`` with every
    ``test/*`` metric (nats per image; reduced over ranks), the model's hyper-parameters, the
    datamodule, the checkpoint tested and the number of test examples."""

    __test__ = False  # not a pytest test class

    def __init__(self, filename: str = "test_metrics.json") -> None:
        self.filename = filename

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        log_dir = run_dir(trainer)
        if not trainer.is_global_zero:
            return
        metrics = {
            k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")
        }
        datamodule = trainer.datamodule
        test_set = getattr(datamodule, "test_set", None)
        report = {
            "model": type(pl_module).__name__,
            "hparams": {k: _plain(v) for k, v in pl_module.hparams.items()},
            "datamodule": type(datamodule).__name__ if datamodule is not None else None,
            "data": {k: _plain(v) for k, v in getattr(datamodule, "hparams", {}).items()},
            "n_test_examples": len(test_set) if test_set is not None else None,
            "iwae_k": getattr(pl_module, "iwae_k", None),
            "ckpt_path": trainer.ckpt_path,
            "global_step": trainer.global_step,
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "metrics": metrics,
        }
        path = log_dir / self.filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")


def _plain(value):
    """JSON-safe copy of a hyper-parameter value."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return str(value)
