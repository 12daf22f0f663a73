"""Spatial pooling as a filter/correlate/compress composition (the ``pool`` baseline).

The ``H x W`` token grid is cut into ``h x w`` rectangular bins that do not overlap (bin ``i``
spans rows ``floor(i H / h) .. floor((i + 1) H / h) - 1``, columns alike). Each bin's top-left token
is kept (the filter's targets, in raster order of the bins); every other token of the bin goes to
it (the correlate); :class:`~ficoco.stages.AveragingCompress` replaces it by the plain mean of its
bin. Where ``h`` divides ``H`` and ``w`` divides ``W`` this is ``avg_pool2d`` with that stride
(2x2 pooling: 576 -> 144 tokens); elsewhere (24 -> 16 rows for 192 tokens) PyTorch's
``adaptive_avg_pool2d`` would let neighbouring bins overlap, which no merge of tokens can express,
so the bins here alternate sizes instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .correlates import Correlate
from .filters import SetSelectionFilter
from .tokens import NO_POSITION, Correlation, FilterResult, TokenGroup


def pooled_grid(grid: tuple[int, int], kept: int) -> tuple[int, int]:
    """The ``(h, w)`` output grid with ``h * w = kept`` that fits in ``grid`` and is closest to its
    aspect ratio (ties: more rows). A clear error when no such grid exists (e.g. a prime budget)."""
    height, width = grid
    pairs = [(h, kept // h) for h in range(1, height + 1) if kept % h == 0 and kept // h <= width]
    if not pairs:
        near = sorted({h * w for h in range(1, height + 1) for w in range(1, width + 1)}, key=lambda n: abs(n - kept))[:4]
        raise ValueError(f"{kept} tokens cannot be pooled from a {height}x{width} grid into a rectangle of bins; "
                         f"budgets near it that can: {', '.join(map(str, sorted(near)))}")
    aspect = math.log(height / width)
    return min(pairs, key=lambda p: (abs(math.log(p[0] / p[1]) - aspect), -p[0]))


def bin_of(positions: Tensor, grid: tuple[int, int], out: tuple[int, int]) -> Tensor:
    """``[B, N]`` raster index of the output bin of each token at raster ``positions`` (``[B, N]``)."""
    height, width = grid
    rows, cols = positions // width, positions % width
    # row r lies in bin i where floor(i H / h) <= r < floor((i + 1) H / h), i.e. i = floor(((r + 1) h - 1) / H)
    return ((rows + 1) * out[0] - 1) // height * out[1] + ((cols + 1) * out[1] - 1) // width


def _check_full_grid(tokens: TokenGroup) -> None:
    height, width = tokens.grid
    if tokens.num_tokens != height * width or bool((tokens.positions == NO_POSITION).any()):
        raise ValueError(f"spatial pooling needs the whole {height}x{width} token grid, got {tokens.num_tokens} "
                         f"tokens: it cannot follow another reduction")


@dataclass
class GridPartitionFilter(SetSelectionFilter):
    """Keeps the top-left token of each of ``h x w`` bins (:func:`pooled_grid` of the kept count)."""

    def select(self, tokens: TokenGroup, probe, kept: int) -> Tensor:
        _check_full_grid(tokens)
        out = pooled_grid(tokens.grid, kept)
        bins = bin_of(tokens.positions, tokens.grid, out)
        height, width = tokens.grid
        rows, cols = tokens.positions // width, tokens.positions % width
        first_row = (rows * out[0] + out[0] - 1) // height != ((rows - 1) * out[0] + out[0] - 1) // height
        first_col = (cols * out[1] + out[1] - 1) // width != ((cols - 1) * out[1] + out[1] - 1) // width
        anchor = (first_row | (rows == 0)) & (first_col | (cols == 0))
        # bins are raster-ordered like their anchors, so sorting anchors by bin keeps raster order
        order = torch.argsort(torch.where(anchor, bins, bins.new_full((), height * width)), dim=1, stable=True)
        return order[:, :kept]


@dataclass
class GridPartitionCorrelate(Correlate):
    """Each source goes, with weight 1, to the kept token of its own bin."""

    def __call__(self, tokens: TokenGroup, probe, split: FilterResult) -> Correlation:
        out = pooled_grid(tokens.grid, split.targets.shape[1])
        bins = bin_of(tokens.positions, tokens.grid, out)
        source_bin, target_bin = bins.gather(1, split.sources), bins.gather(1, split.targets)
        return Correlation((source_bin[:, :, None] == target_bin[:, None, :]).float())
