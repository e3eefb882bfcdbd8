"""Turning batches of images into one PNG grid (no torchvision dependency)."""

from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from PIL import Image


def image_grid(images: torch.Tensor, ncols: int, pad: int = 1) -> np.ndarray:
    """(N, C, H, W) in [0, 1] -> uint8 (rows*(H+pad), ncols*(W+pad)[, C]) grid, row-major."""
    n = images.shape[0]
    nrows = -(-n // ncols)
    blank = torch.zeros(nrows * ncols - n, *images.shape[1:], device=images.device)
    images = torch.cat([images.float().clamp(0, 1), blank])
    images = torch.nn.functional.pad(images, (0, pad, 0, pad), value=0.5)
    grid = rearrange(images.cpu(), "(r k) c h w -> (r h) (k w) c", k=ncols)
    grid = (grid * 255).round().to(torch.uint8).numpy()
    return grid[..., 0] if grid.shape[-1] == 1 else grid


def save_grid(images: torch.Tensor, path: Path, ncols: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image_grid(images, ncols)).save(path)
    return path
