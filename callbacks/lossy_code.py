"""The lossy-code figure of VLAE (Chen et al. 2017, Fig. 1a / 2a)."""

from pathlib import Path

import lightning as L
import torch
from einops import rearrange

from .image_callback import ImageCallback
from .images import save_grid
from .run_dir import run_dir
from .sample_grid import log_images


class LossyCode(ImageCallback):
    """Originals beside their "decompressions" x' ~ p(x|z), z ~ q(z|x): each row of
    ``decompressions_<tag>.png`` is one validation (or test) image followed by
    ``n_decompressions`` independent decompressions. What stays the same across a row is
    what the code z keeps (global structure); what changes is left to the decoder (local
    detail). For models with ``decompress`` (VLAE); samples come from ``SampleGrid``.
    Written once, by global rank zero, to ``<log_dir>/samples/`` and image loggers.

    Args:
        every_n_epochs: how often (validation epochs); 0 = only after testing.
        n_originals: images (rows) per figure.
        n_decompressions: decompressions per image.
        seed: seed of the decompression noise, so figures of two runs are comparable.
    """

    def __init__(
        self,
        every_n_epochs: int = 0,
        n_originals: int = 8,
        n_decompressions: int = 4,
        seed: int = 0,
    ) -> None:
        super().__init__(every_n_epochs, n_originals)
        self.n_decompressions = n_decompressions
        self.seed = seed

    @torch.no_grad()
    def write(self, trainer: L.Trainer, pl_module: L.LightningModule, tag: str) -> list[Path]:
        if not getattr(pl_module, "latent_dims", None) or not hasattr(pl_module, "decompress"):
            return []  # no latent code to decompress from
        out = run_dir(trainer) / "samples"
        if not trainer.is_global_zero or self.originals is None:
            return []
        x = self.originals.to(pl_module.device)
        generator = torch.Generator().manual_seed(self.seed)
        copies = [pl_module.decompress(x, generator) for _ in range(self.n_decompressions)]
        rows = rearrange([x, *copies], "k n c h w -> (n k) c h w")
        path = out / f"decompressions_{tag}.png"
        paths = [save_grid(pl_module.to_unit_range(rows), path, self.n_decompressions + 1)]
        log_images(trainer, paths)
        return paths
