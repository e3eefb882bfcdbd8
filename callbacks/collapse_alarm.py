"""A warning when a latent level stops carrying information: posterior collapse."""

import lightning as L
from lightning.pytorch.utilities import rank_zero_warn

COLLAPSED_KL_NATS = 0.5  # below one bit per image the code says next to nothing about x


class CollapseAlarm(L.Callback):
    """After each validation epoch once the KL warm-up is over (and after testing), warns
    when a latent level's KL falls below ``min_kl`` nats per image or none of its units is
    active (``{stage}/active_units/<level>`` = 0): the decoder models the data without the
    latent. Each level warns once per stage, naming the options that help.

    Args:
        min_kl: nats per image below which a level counts as collapsed.
    """

    def __init__(self, min_kl: float = COLLAPSED_KL_NATS) -> None:
        self.min_kl = min_kl
        self.warned: set[tuple[str, str]] = set()

    def collapsed(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> dict:
        """``{level: why}`` for each latent level whose ``stage`` metrics show collapse."""
        metrics = trainer.callback_metrics
        found = {}
        for level in getattr(pl_module, "latent_shapes", {}):
            kl = metrics.get(f"{stage}/kl/{level}")
            active = metrics.get(f"{stage}/active_units/{level}")
            n_units = pl_module.latent_dims[level]
            if kl is not None and float(kl) < self.min_kl:
                found[level] = f"KL {float(kl):.3g} nats per image"
            elif active is not None and float(active) == 0:
                found[level] = f"0 of {n_units} units active"
        return found

    def _check(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for level, why in self.collapsed(trainer, pl_module, stage).items():
            if (stage, level) in self.warned:
                continue
            self.warned.add((stage, level))
            rank_zero_warn(
                f"Posterior collapse at {stage} step {trainer.global_step}: latent level"
                f" {level!r} carries (almost) nothing ({why}); the pixel decoder models the"
                " images without it. What helps: a longer KL warm-up"
                " (model.init_args.kl_warmup_steps), free bits (model.init_args.free_bits),"
                " a pixel decoder with a smaller receptive field (fewer layers or a smaller"
                " kernel in model.init_args.pixelcnn) or conditioning that reaches every layer,"
                " and AGAVE's auxiliary reconstruction weight lambda."
            )

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        warming_up = trainer.global_step < getattr(pl_module, "kl_warmup_steps", 0)
        if not trainer.sanity_checking and not warming_up:
            self._check(trainer, pl_module, "val")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check(trainer, pl_module, "test")
