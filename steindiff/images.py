"""Image grids for samples in [-1, 1]: non-finite pixels are shown in magenta, never hidden."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from steindiff.output.files import write_file

__all__ = ["image_grid", "png_bytes", "save_png", "side_by_side"]

NONFINITE_RGB = (255, 0, 255)


def image_grid(samples: torch.Tensor, columns: int | None = None, pad: int = 2, scale: int = 1) -> np.ndarray:
    """An (H, W, 3) uint8 grid of (N, C, h, w) samples with C in {1, 3}, tiled row by row."""
    x = samples.detach().float().cpu()
    n, c, h, w = x.shape
    if c not in (1, 3):
        raise ValueError(f"expected 1 or 3 channels, got {c}")
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    finite = torch.isfinite(x).all(1, keepdim=True)
    pixels = ((torch.nan_to_num(x).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).expand(n, 3, h, w).clone()
    pixels = torch.where(finite, pixels, torch.tensor(NONFINITE_RGB, dtype=torch.uint8).reshape(1, 3, 1, 1))
    grid = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, columns)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[top : top + h, left : left + w] = pixels[i].permute(1, 2, 0).numpy()
    return grid.repeat(scale, 0).repeat(scale, 1) if scale > 1 else grid


def side_by_side(grids: Sequence[np.ndarray], gap: int = 8) -> np.ndarray:
    """Grids placed left to right on white, top-aligned."""
    height = max(g.shape[0] for g in grids)
    width = sum(g.shape[1] for g in grids) + gap * (len(grids) - 1)
    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    left = 0
    for g in grids:
        canvas[: g.shape[0], left : left + g.shape[1]] = g
        left += g.shape[1] + gap
    return canvas


def png_bytes(image: np.ndarray) -> bytes:
    """An (H, W, 3) uint8 array encoded as PNG, for writing with other files at once."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def save_png(path: str | Path, image: np.ndarray) -> None:
    """Write an (H, W, 3) uint8 array as PNG, whole or not at all (its folder made if missing)."""
    write_file(path, png_bytes(image))
