"""Turning batches of images into one PNG grid (no torchvision dependency)."""

from pathlib import Path

import numpy as np
import torch
from einops import rearrange, repeat
from PIL import Image

MIN_CELL = 112  # pixels per image side in a saved grid: a 28 x 28 digit is drawn 4x


def image_grid(images: torch.Tensor, ncols: int, pad: int = 1, scale: int = 1) -> np.ndarray:
    """(N, C, H, W) in [0, 1] -> uint8 (rows*(s*H+pad), ncols*(s*W+pad)[, C]) grid,
    row-major; each pixel drawn as an s x s block, cells separated by ``pad`` grey pixels."""
    n = images.shape[0]
    nrows = -(-n // ncols)
    blank = torch.zeros(nrows * ncols - n, *images.shape[1:], device=images.device)
    images = torch.cat([images.float().clamp(0, 1), blank])
    images = repeat(images, "n c h w -> n c (h s) (w t)", s=scale, t=scale)
    images = torch.nn.functional.pad(images, (0, pad, 0, pad), value=0.5)
    grid = rearrange(images.cpu(), "(r k) c h w -> (r h) (k w) c", k=ncols)
    grid = (grid * 255).round().to(torch.uint8).numpy()
    return grid[..., 0] if grid.shape[-1] == 1 else grid


def save_grid(images: torch.Tensor, path: Path, ncols: int) -> Path:
    """Write the grid as a PNG, each image enlarged (nearest neighbour, a whole factor) to
    at least ``MIN_CELL`` pixels a side where it is smaller, so single pixels can be judged."""
    scale = max(1, -(-MIN_CELL // max(images.shape[-2:])))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image_grid(images, ncols, pad=max(2, scale), scale=scale)).save(path)
    return path
