"""LLaVA-NeXT's "anyres" image layout: how one image becomes crops, and crops become LLM tokens.

The processor picks, among ``image_grid_pinpoints``, the resolution that best fits the image
(``select_best_resolution``), cuts it into ``tile_rows x tile_cols`` crops of the tower's input
size and puts a resized copy of the whole image first (the *base* crop). Each crop gives a
``side x side`` patch grid (24 x 24 for CLIP-336/14). The model then hands the LLM

- the base crop's ``side²`` tokens, in raster order;
- the tiles' patches laid out as one ``(tile_rows x side) x (tile_cols x side)`` grid, with the
  rows or columns that only pad the resized image cut away (``unpad_image``), each remaining row
  followed by one ``image_newline`` token.

With a reduction before the LLM each crop hands on ``k`` tokens that no longer form a grid, so
the packing above cannot be built; :meth:`AnyresLayout.pack` lays them out instead (see its
docstring and docs/methods.md, "LLaVA-NeXT"). Everything here is arithmetic on sizes: the
formulas are those of transformers' ``get_anyres_image_grid_shape`` and ``unpad_image``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..stages import NO_POSITION


@dataclass(frozen=True)
class AnyresLayout:
    """Where one image's tokens come from.

    Attributes:
        side: patches per crop side (24 for CLIP-336/14).
        tile_rows / tile_cols: crops of the best-fitting resolution.
        rows / cols: the tiles' patch grid after unpadding (``rows <= tile_rows x side``).
        top / left: where that unpadded grid starts inside the tiles' full grid.
    """

    side: int
    tile_rows: int
    tile_cols: int
    rows: int
    cols: int
    top: int
    left: int

    @property
    def crops(self) -> int:
        """Crops the tower encodes: the base image and every tile."""
        return 1 + self.tile_rows * self.tile_cols

    @property
    def full_tokens(self) -> int:
        """LLM tokens of the image without reduction: base, unpadded tile rows, one newline per row."""
        return self.side * self.side + self.rows * (self.cols + 1)

    @property
    def patch_tokens(self) -> int:
        """Those of them that are patches (not newline tokens)."""
        return self.side * self.side + self.rows * self.cols

    @property
    def grid_width(self) -> int:
        """Columns of the tiles' full patch grid."""
        return self.tile_cols * self.side

    def newlines(self) -> Tensor:
        """``[full_tokens]`` bool: which of the image's unreduced tokens are newline tokens."""
        flags = torch.zeros(self.full_tokens, dtype=torch.bool)
        base = self.side * self.side
        flags[base + self.cols::self.cols + 1] = True
        return flags

    def patch_positions(self) -> Tensor:
        """``[patch_tokens]`` one index per patch of the unreduced image, in prompt order: ``p`` for
        the base crop's raster position ``p``, ``side² + r x grid_width + c`` for the tiles' patch at
        row ``r``, column ``c`` of their full grid. Unique within an image (decoder-side stages use
        them as keys, :data:`LLM_GRID`)."""
        base = torch.arange(self.side * self.side)
        r = torch.arange(self.rows)[:, None] + self.top
        c = torch.arange(self.cols)[None, :] + self.left
        return torch.cat([base, (self.side * self.side + r * self.grid_width + c).flatten()])

    def pack(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """How the crops' reduced tokens are laid out in the prompt.

        Args:
            positions: ``[crops, k]`` raster position within its crop of each token a crop hands
                on (:data:`~ficoco.stages.NO_POSITION` for a fused token), base crop first.
        Returns:
            ``(order, index)``, both ``[crops x k]``: ``order`` picks rows of the crops' tokens
            flattened (``[crops x k, D]``) into prompt order: the base crop's ``k`` tokens as they
            were handed on, then every tile token that has a position in the raster order of the
            tiles' full grid (rows run across tiles, as the unreduced packing reads), then the
            fused tokens, tile by tile. ``index`` is each token's :meth:`patch_positions`-style
            index (``NO_POSITION`` for fused ones), in that order.
        """
        crops, k = positions.shape
        if crops != self.crops:
            raise ValueError(f"an image of {self.tile_rows}x{self.tile_cols} tiles has {self.crops} crops, got {crops}")
        device = positions.device
        tiles = positions[1:]
        tile = torch.arange(crops - 1, device=device)[:, None]
        row = (tile // self.tile_cols) * self.side + tiles.clamp_min(0) // self.side
        col = (tile % self.tile_cols) * self.side + tiles.clamp_min(0) % self.side
        index = self.side * self.side + row * self.grid_width + col
        fused = tiles == NO_POSITION
        # fused tokens sort after every grid index, tile by tile in the order handed on
        big = self.side * self.side + self.tile_rows * self.side * self.grid_width
        rank = torch.arange(tiles.numel(), device=device).view_as(tiles)
        key = torch.where(fused, big + rank, index).flatten()
        tile_order = key.argsort(stable=True)
        order = torch.cat([torch.arange(k, device=device), k + tile_order])
        index = torch.where(fused, NO_POSITION, index).flatten()[tile_order]
        return order, torch.cat([positions[0], index])


#: the grid decoder-side stages see on LLaVA-NeXT: an image's tokens have the unique indices of
#: :meth:`AnyresLayout.patch_positions`, not positions on one grid (base and tiles are two grids)
LLM_GRID = (1, 1 << 20)


def anyres_layout(image_size: tuple[int, int], pinpoints: list, crop_size: int, patch_size: int) -> AnyresLayout:
    """The layout of an image of ``image_size`` (``(height, width)`` in pixels, as the processor's
    ``image_sizes``) on a model with ``image_grid_pinpoints`` ``pinpoints``, crops of
    ``crop_size`` pixels and patches of ``patch_size``."""
    from transformers.image_processing_utils import select_best_resolution

    height, width = (int(x) for x in image_size)
    if height <= 0 or width <= 0:
        raise ValueError(f"image size {height}x{width} is not a real image size (image_sizes is height, width)")
    best_height, best_width = select_best_resolution((height, width), [list(p) for p in pinpoints])
    tile_rows, tile_cols = best_height // crop_size, best_width // crop_size
    side = crop_size // patch_size
    grid_height, grid_width = tile_rows * side, tile_cols * side
    rows, cols, top, left = grid_height, grid_width, 0, 0
    # unpad_image: the resized image fills the best resolution along one axis, padding the other
    if width / height > grid_width / grid_height:
        new_height = int(round(height * (grid_width / width), 7))
        top = (grid_height - new_height) // 2
        rows = grid_height - 2 * top
    else:
        new_width = int(round(width * (grid_height / height), 7))
        left = (grid_width - new_width) // 2
        cols = grid_width - 2 * left
    return AnyresLayout(side, tile_rows, tile_cols, rows, cols, top, left)


@dataclass(frozen=True)
class OnevisionLayout(AnyresLayout):
    """LLaVA-OneVision's variant (``anyres_max_N``): after unpadding, a tiles' grid of more than
    ``1.1² x N`` crops' worth of patches is resized (bilinear) to ``out_rows x out_cols`` before the
    newline tokens are added; otherwise ``out_rows, out_cols == rows, cols``.

    Attributes:
        out_rows / out_cols: the tiles' token grid the LLM receives (newline after each of its rows).
    """

    out_rows: int
    out_cols: int

    @property
    def scaled(self) -> bool:
        """Whether the unpadded tiles' grid was resized (its tokens are no longer patches of it)."""
        return (self.out_rows, self.out_cols) != (self.rows, self.cols)

    @property
    def full_tokens(self) -> int:
        return self.side * self.side + self.out_rows * (self.out_cols + 1)

    @property
    def patch_tokens(self) -> int:
        return self.side * self.side + self.out_rows * self.out_cols

    def newlines(self) -> Tensor:
        flags = torch.zeros(self.full_tokens, dtype=torch.bool)
        flags[self.side * self.side + self.out_cols::self.out_cols + 1] = True
        return flags

    def patch_positions(self) -> Tensor:
        """As :meth:`AnyresLayout.patch_positions`; a resized grid's token at row ``r``, column
        ``c`` gets ``side² + r x out_cols + c`` (unique, but not a place on the tiles' full grid)."""
        if not self.scaled:
            return super().patch_positions()
        return torch.arange(self.patch_tokens)


def onevision_layout(image_size: tuple[int, int], pinpoints: list, crop_size: int, patch_size: int,
                     max_crops: int) -> OnevisionLayout:
    """:func:`anyres_layout` then ``anyres_max_{max_crops}``'s resize, with the arithmetic of
    transformers' ``LlavaOnevisionModel.pack_image_features`` (and its processor's count)."""
    base = anyres_layout(image_size, pinpoints, crop_size, patch_size)
    out_rows, out_cols = base.rows, base.cols
    ratio = math.sqrt(base.rows * base.cols / (max_crops * base.side ** 2))
    if ratio > 1.1:
        out_rows, out_cols = int(base.rows // ratio), int(base.cols // ratio)
    return OnevisionLayout(base.side, base.tile_rows, base.tile_cols, base.rows, base.cols, base.top, base.left,
                           out_rows, out_cols)
