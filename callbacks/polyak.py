"""Polyak averaging of the weights for evaluation (VLAE appendix A: alpha = 0.998)."""

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import EMAWeightAveraging


class PolyakAveraging(EMAWeightAveraging):
    """Lightning's exponential moving average of the weights, ``decay`` = alpha: validation
    and the checkpoints' ``state_dict`` use the averages, and after ``fit`` the model holds
    them.

    One fix over the parent: outside ``fit`` (``arvae test --ckpt_path``, or the test that
    ``test_after_fit`` runs with the fitting trainer) a checkpoint's averaged ``state_dict``
    is what gets evaluated. The parent would reload the live training weights there when the
    trainer that fitted is reused, silently testing un-averaged weights.
    """

    def __init__(self, decay: float = 0.998, **kwargs: Any) -> None:
        super().__init__(decay=decay, **kwargs)

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if trainer.state.fn == "fit":
            super().on_load_checkpoint(trainer, pl_module, checkpoint)
