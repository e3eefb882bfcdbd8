"""The cost breakdown behind PixelVAE Fig. 4b: reconstruction, KL and active units per epoch."""

import csv
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from .run_dir import run_dir


def stage_terms(metrics: dict, stage: str) -> dict[str, float]:
    """The ``{stage}/nelbo``, ``{stage}/recon``, ``{stage}/kl/*`` (and IWAE, bpd, active units)
    entries as floats; not the bounds' standard errors, which the test report keeps."""
    prefix = f"{stage}/"
    keep = ("nelbo", "recon", "kl/", "nll_iwae", "bpd", "active_units/")
    return {
        k[len(prefix) :]: float(v)
        for k, v in sorted(metrics.items())
        if k.startswith(prefix) and k[len(prefix) :].startswith(keep) and not k.endswith("_se")
    }


class KLBreakdown(L.Callback):
    """Appends one row per validation epoch (and one for the test) to
    ``<log_dir>/kl_breakdown.csv`` and prints the table at the end of fitting and testing.
    Values are the epoch means in nats per image, already reduced over DDP ranks; the file
    is written by global rank zero only."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def _add(self, trainer: L.Trainer, stage: str) -> None:
        terms = stage_terms(trainer.callback_metrics, stage)
        if not terms:
            return
        self.rows.append({"stage": stage, "epoch": trainer.current_epoch, **terms})
        log_dir = run_dir(trainer)
        if trainer.is_global_zero:
            self._write(log_dir / "kl_breakdown.csv")

    def _write(self, path: Path) -> None:
        fields = list(dict.fromkeys(k for row in self.rows for k in row))
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(self.rows)

    def table(self) -> str:
        """The rows as a Markdown table."""
        fields = list(dict.fromkeys(k for row in self.rows for k in row))
        lines = ["| " + " | ".join(fields) + " |", "|" + "---|" * len(fields)]
        for row in self.rows:
            cells = [
                f"{row[f]:.3f}" if isinstance(row.get(f), float) else str(row.get(f, ""))
                for f in fields
            ]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._add(trainer, "val")

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._add(trainer, "test")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.rows:
            rank_zero_info(
                "KL breakdown (nats per image; bpd in bits per dimension; active units of"
                " each latent level):\n" + self.table()
            )

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.on_fit_end(trainer, pl_module)
