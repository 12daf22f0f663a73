"""The image at a lower resolution (the ``downsample`` control): which smaller patch grid, and the
resize that produces it.

Unlike the token stages, this acts before the vision encoder, on the pixels the processor made:
the tower then runs on fewer patches, and the LLM receives one token per patch (or per merge
group) of the smaller grid, as it would for a genuinely smaller image.

- :func:`exact_grid`: for fixed-grid models (LLaVA-1.5, whose processor hands every image as the
  same square): the ``rows x cols`` rectangle with exactly the budget's tokens closest to the grid's
  aspect (:func:`~ficoco.stages.pooling.pooled_grid`, the same rectangle ``pool`` uses), refused when
  it would stretch the image more than ``max_aspect``.
- :func:`grid_within`: for dynamic-resolution models (Qwen-VL, whose images keep their aspect
  ratio): each side scaled by ``sqrt(budget / tokens)`` and rounded down or up, the combination with
  the most tokens within the budget; the count is then *at most* the budget.
- :func:`resize_images`: bicubic with antialiasing (PIL's kernel, as the CLIP and Qwen image
  processors resize), in the processor's normalised space.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .pooling import pooled_grid


def _stretch(rows: int, cols: int, grid: tuple[int, int]) -> float:
    """How much a ``rows x cols`` grid distorts the aspect of ``grid`` (1.0: not at all)."""
    # exact in integers: rows/cols against grid rows/cols, whichever way round is >= 1
    tall, wide = rows * grid[1], cols * grid[0]
    return max(tall, wide) / min(tall, wide)


def exact_grid(grid: tuple[int, int], kept: int, max_aspect: float) -> tuple[int, int]:
    """The ``(rows, cols)`` patch grid with ``rows * cols == kept`` within ``grid``, closest to its
    aspect (ties: more rows); refused with the nearest feasible budgets when none exists or when the
    closest one stretches the image by more than ``max_aspect`` (``rows/cols`` against the grid's)."""
    height, width = grid
    feasible = sorted({r * c for r in range(1, height + 1) for c in range(1, width + 1)
                       if _stretch(r, c, grid) <= max_aspect})
    near = ", ".join(map(str, sorted(sorted(feasible, key=lambda n: (abs(n - kept), n))[:4])))
    try:
        rows, cols = pooled_grid(grid, kept)
    except ValueError:
        rows = cols = None
    if rows is None or _stretch(rows, cols, grid) > max_aspect:
        closest = "" if rows is None else \
            f" (the closest, {rows}x{cols}, stretches the image {_stretch(rows, cols, grid):.2g}:1)"
        raise ValueError(f"downsample cannot give exactly {kept} tokens: no rows x cols grid of that count fits the "
                         f"{height}x{width}-patch image with its aspect stretched at most {max_aspect:g}:1{closest}; "
                         f"budgets near it that can: {near}")
    return rows, cols


def grid_within(grid: tuple[int, int], kept: int) -> tuple[int, int]:
    """The ``(rows, cols)`` grid of at most ``kept`` cells keeping ``grid``'s aspect: each side
    scaled by ``sqrt(kept / cells)`` and rounded down or up (at least 1, at most the side), the
    combination with the most cells within ``kept`` (ties: the aspect closest to ``grid``'s, then
    more rows); where a side would scale below one cell, the rectangle of at least one cell a side
    with the most cells within ``kept``. ``kept >= rows * cols`` keeps ``grid``."""
    height, width = grid
    if kept >= height * width:
        return height, width
    scale = math.sqrt(kept / (height * width))
    options = [(r, c) for r in {max(1, math.floor(height * scale)), min(height, math.ceil(height * scale))}
               for c in {max(1, math.floor(width * scale)), min(width, math.ceil(width * scale))} if r * c <= kept]
    if not options:  # a side scaled below one cell (a long thin image): the best fit of at least one cell a side
        options = [(r, min(width, kept // r)) for r in range(1, min(height, kept) + 1)]
    return max(options, key=lambda p: (p[0] * p[1], -_stretch(p[0], p[1], grid), p[0]))


def resize_images(pixels: Tensor, size: tuple[int, int]) -> Tensor:
    """``pixels`` ``[..., C, H, W]`` resized to ``[..., C, size[0], size[1]]``: bicubic with
    antialiasing (PyTorch's antialiased bicubic uses PIL's kernel, ``a = -0.5``, so this is what the
    image processors compute, without their rounding to 8 bits), in float32 and back to the input's
    dtype. A resize is affine-equivariant, so resizing normalised pixels equals normalising
    resized ones (apart from the processors' clamping to [0, 255])."""
    if tuple(pixels.shape[-2:]) == tuple(size):
        return pixels
    lead = pixels.shape[:-3]
    flat = pixels.reshape(-1, *pixels.shape[-3:]).float()
    out = torch.nn.functional.interpolate(flat, size=tuple(size), mode="bicubic", antialias=True, align_corners=False)
    return out.reshape(*lead, *out.shape[-3:]).to(pixels.dtype)
