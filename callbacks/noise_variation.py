"""What each level of stochasticity models: PixelVAE Fig. 6 / 11 and appendix A (Fig. 8)."""

from pathlib import Path

import lightning as L
import torch
from einops import rearrange, repeat

from .image_callback import ImageCallback
from .images import save_grid
from .run_dir import run_dir
from .sample_grid import log_images


class NoiseVariation(ImageCallback):
    """Per-level noise variation and per-level reconstructions, as PNG grids.

    ``noise_<level>_<tag>.png``: each row holds the sampling noise of every level fixed
    except ``<level>`` (a latent level, or ``x`` for the pixel-level sampling), which varies
    along the row: the rows of ``noise_z2`` differ in what the top level models (Fig. 6 top),
    those of ``noise_x`` only in pixel-level detail (Fig. 6 bottom). Uses the contract's
    ``sample_noise`` / ``sample(n, noise)``; models without latents only get ``noise_x``.

    ``reconstructions_<level>_<tag>.png`` (models with several ``levels`` and
    ``reconstruct(x, level)``): each row is a validation/test image followed by
    generations that keep the mean of q(z_level|x) and sample everything below it afresh
    (appendix A). Written once, by global rank zero, after testing and every
    ``every_n_epochs`` validation epochs (0 = after testing only: autoregressive sampling
    of every level is slow).

    Args:
        every_n_epochs: how often (validation epochs); 0 = only after testing.
        n_rows: fixed noise settings (rows) per grid (0 = no grids).
        n_variations: samples per row with the varied level's noise redrawn.
        n_reconstructions: images reconstructed per level grid (0 = none).
        seed: seed of the noise, so that grids of successive epochs are comparable.
    """

    def __init__(
        self,
        every_n_epochs: int = 0,
        n_rows: int = 4,
        n_variations: int = 8,
        n_reconstructions: int = 4,
        seed: int = 0,
    ) -> None:
        super().__init__(every_n_epochs, n_reconstructions)
        self.n_rows = n_rows
        self.n_variations = n_variations
        self.seed = seed

    def varied_noise(self, pl_module, level: str) -> dict[str, torch.Tensor]:
        """Noise for n_rows x n_variations samples: each row shares every level's noise
        except ``level``'s, which every sample draws afresh."""
        g = torch.Generator().manual_seed(self.seed)
        fixed = pl_module.sample_noise(self.n_rows, g)
        fresh = pl_module.sample_noise(self.n_rows * self.n_variations, g)
        noise = {k: repeat(v, "r ... -> (r v) ...", v=self.n_variations) for k, v in fixed.items()}
        noise[level] = fresh[level]
        return noise

    @torch.no_grad()
    def write(self, trainer: L.Trainer, pl_module: L.LightningModule, tag: str) -> list[Path]:
        out = run_dir(trainer) / "samples"
        if not trainer.is_global_zero:
            return []
        try:
            levels = list(pl_module.sample_noise(1))
        except NotImplementedError:
            return []
        n = self.n_rows * self.n_variations
        paths = []
        for level in levels if n else []:
            samples = pl_module.sample(n, self.varied_noise(pl_module, level))
            path = out / f"noise_{level}_{tag}.png"
            paths.append(save_grid(pl_module.to_unit_range(samples), path, self.n_variations))
        if self.n_reconstructions and self.originals is not None:
            paths += self._reconstructions(pl_module, out, tag)
        log_images(trainer, paths)
        return paths

    def _reconstructions(self, pl_module, out: Path, tag: str) -> list[Path]:
        latent_levels = getattr(pl_module, "levels", [])
        if len(latent_levels) < 2:  # one level: SampleGrid's reconstructions already show it
            return []
        x = self.originals.to(pl_module.device)
        cols = self.n_variations - 1
        paths = []
        for level in latent_levels:
            generations = pl_module.reconstruct(repeat(x, "n ... -> (n k) ...", k=cols), level)
            rows = torch.cat(
                [x[:, None], rearrange(generations, "(n k) ... -> n k ...", k=cols)], 1
            )
            grid = pl_module.to_unit_range(rearrange(rows, "n k c h w -> (n k) c h w"))
            paths.append(save_grid(grid, out / f"reconstructions_{level}_{tag}.png", cols + 1))
        return paths
