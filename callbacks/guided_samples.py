"""AGAVE's figures: the VAE's f(z) beside the PixelCNN++'s samples given it (Figs. 3 and 7):
the blurry global structure that z carries and the detail the PixelCNN++ adds on top."""

from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F

from .image_callback import ImageCallback
from .images import save_grid
from .run_dir import run_dir
from .sample_grid import log_images


class GuidedSamples(ImageCallback):
    """Two PNGs in ``<log_dir>/samples/`` (and image loggers), written by global rank zero:

    - ``guided_reconstructions_<tag>.png``, a row per validation / test image: x, the
      auxiliary image y, f(z) for z the mean of q(z|x), then ``n_draws`` x ~ p(x | f(z))
      (Fig. 3a: VR and PS);
    - ``guided_samples_<tag>.png``, a row per z ~ p(z): f(z), then ``n_draws`` x ~ p(x | f(z))
      (Fig. 3b, Fig. 7).

    For models with ``vae_output`` (AGAVE); y and f(z) are enlarged to x's size.

    Args:
        every_n_epochs: how often (validation epochs); 0 = only after testing.
        n_originals: test images (rows) of the first figure; 0 = no figure.
        n_prior: z ~ p(z) (rows) of the second; 0 = no figure.
        n_draws: PixelCNN++ samples per f(z).
        seed: seed of the drawing noise, so the figures of two runs are comparable.
    """

    def __init__(
        self,
        every_n_epochs: int = 0,
        n_originals: int = 4,
        n_prior: int = 4,
        n_draws: int = 3,
        seed: int = 0,
    ) -> None:
        super().__init__(every_n_epochs, n_originals)
        self.n_prior, self.n_draws, self.seed = n_prior, n_draws, seed

    @torch.no_grad()
    def write(self, trainer: L.Trainer, pl_module: L.LightningModule, tag: str) -> list[Path]:
        folder, paths = run_dir(trainer) / "samples", []  # a collective under DDP: first
        if not hasattr(pl_module, "vae_output") or not trainer.is_global_zero:
            return []
        generator = torch.Generator().manual_seed(self.seed)
        if self.originals is not None and len(self.originals):
            x = self.originals.to(pl_module.device)
            f = pl_module.vae_output(pl_module.encode(x)[0])
            y = pl_module.aux_likelihood.network_input(pl_module.aux_image(x))
            columns = [pl_module.to_unit_range(x), *(unit(pl_module, v) for v in (y, f))]
            columns += self._draws(pl_module, f, generator)
            paths.append(self._save(columns, folder / f"guided_reconstructions_{tag}.png"))
        if self.n_prior:
            z = pl_module.sample_noise(self.n_prior, generator)["z"].to(pl_module.device)
            f = pl_module.vae_output(z)
            columns = [unit(pl_module, f), *self._draws(pl_module, f, generator)]
            paths.append(self._save(columns, folder / f"guided_samples_{tag}.png"))
        log_images(trainer, paths)
        return paths

    def _draws(self, pl_module, f: torch.Tensor, generator) -> list[torch.Tensor]:
        """``n_draws`` columns of x ~ p(x | f(z)), each row's draws from the same f."""
        if not self.n_draws:
            return []
        many = f.repeat_interleave(self.n_draws, 0)
        noise = pl_module.likelihood.noise((len(many), *pl_module.image_shape), generator)
        drawn = pl_module.to_unit_range(pl_module.decode(many, noise))
        return list(drawn.unflatten(0, (len(f), self.n_draws)).unbind(1))

    @staticmethod
    def _save(columns: list[torch.Tensor], path: Path) -> Path:
        rows = torch.stack([c.float().cpu() for c in columns], 1).flatten(0, 1)
        return save_grid(rows, path, len(columns))


def unit(pl_module, values: torch.Tensor) -> torch.Tensor:
    """Values on the [-1, 1] scale of x (f(z), y's bin centres) as [0, 1] images at x's size."""
    size = tuple(pl_module.image_shape[1:])
    return F.interpolate((values.clamp(-1, 1) + 1) / 2, size=size, mode="nearest")
