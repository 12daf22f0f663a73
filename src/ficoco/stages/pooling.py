"""Spatial pooling as a filter/correlate/compress composition (the ``pool`` baseline).

The ``H x W`` token grid is cut into ``h x w`` rectangular bins that do not overlap (bin ``i``
spans rows ``floor(i H / h) .. floor((i + 1) H / h) - 1``, columns alike). Each bin's top-left token
is kept (the filter's targets, in raster order of the bins); every other token of the bin goes to
it (the correlate); :class:`~ficoco.stages.AveragingCompress` replaces it by the plain mean of its
bin. Where ``h`` divides ``H`` and ``w`` divides ``W`` this is ``avg_pool2d`` with that stride
(2x2 pooling: 576 -> 144 tokens); elsewhere (24 -> 16 rows for 192 tokens) PyTorch's
``adaptive_avg_pool2d`` would let neighbouring bins overlap, which no merge of tokens can express,
so the bins here alternate sizes instead.

A budget with no ``h x w`` rectangle that fits the grid (a prime count, which a share of a
dynamic-resolution image's tokens often is) is pooled into ``r`` row bands instead, band ``i``
holding ``floor((i + 1) n / r) - floor(i n / r)`` bins side by side (``n`` the kept count, ``r``
chosen so that bins come closest to the grid's aspect): bins still tile the grid without overlap,
bands differ by at most one row and the bins of a band by at most one column.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .correlates import Correlate
from .filters import SetSelectionFilter
from .tokens import Correlation, FilterResult, TokenGroup


def _rectangles(grid: tuple[int, int], kept: int) -> list[tuple[int, int]]:
    height, width = grid
    return [(h, kept // h) for h in range(1, height + 1) if kept % h == 0 and kept // h <= width]


def pooled_grid(grid: tuple[int, int], kept: int) -> tuple[int, int]:
    """The ``(h, w)`` output grid with ``h * w = kept`` that fits in ``grid`` and is closest to its
    aspect ratio (ties: more rows). A clear error when no such grid exists (e.g. a prime budget)."""
    height, width = grid
    pairs = _rectangles(grid, kept)
    if not pairs:
        near = sorted({h * w for h in range(1, height + 1) for w in range(1, width + 1)}, key=lambda n: abs(n - kept))[:4]
        raise ValueError(f"{kept} tokens cannot be pooled from a {height}x{width} grid into a rectangle of bins; "
                         f"budgets near it that can: {', '.join(map(str, sorted(near)))}")
    aspect = math.log(height / width)
    return min(pairs, key=lambda p: (abs(math.log(p[0] / p[1]) - aspect), -p[0]))


def pooled_bands(grid: tuple[int, int], kept: int) -> int:
    """Row bands of the bins that pool ``grid`` into ``kept`` tokens: the rows of
    :func:`pooled_grid`'s rectangle where one fits; else the band count ``r`` whose
    ``floor``/``ceil(kept / r)`` bins per band come closest to the grid's aspect (ties: more bands)."""
    height, width = grid
    if not 1 <= kept <= height * width:
        raise ValueError(f"a {height}x{width} grid cannot be pooled into {kept} tokens")
    if _rectangles(grid, kept):
        return pooled_grid(grid, kept)[0]
    aspect = math.log(height / width)
    bands = [r for r in range(1, min(height, kept) + 1) if -(-kept // r) <= width]
    return min(bands, key=lambda r: (abs(math.log(r * r / kept) - aspect), -r))


def _band_layout(positions: Tensor, grid: tuple[int, int], bands: int, kept: int
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(rows, cols, band, bins in the band)`` of each token at raster ``positions`` (``[B, N]``)."""
    height, width = grid
    rows, cols = positions // width, positions % width
    # row r lies in band i where floor(i H / r_b) <= r < floor((i + 1) H / r_b), i.e. i = floor(((r + 1) r_b - 1) / H)
    band = ((rows + 1) * bands - 1) // height
    per_band = (band + 1) * kept // bands - band * kept // bands
    return rows, cols, band, per_band


def bin_of(positions: Tensor, grid: tuple[int, int], bands: int, kept: int) -> Tensor:
    """``[B, N]`` index of the output bin of each token at raster ``positions`` (``[B, N]``), bins
    numbered band by band, left to right (raster order for a rectangle of ``bands`` rows)."""
    _, width = grid
    _, cols, band, per_band = _band_layout(positions, grid, bands, kept)
    return band * kept // bands + ((cols + 1) * per_band - 1) // width


def _check_full_grid(tokens: TokenGroup) -> None:
    """The whole grid, by count: every reduction a plan schedules removes at least one token (a
    fused new token, e.g. EViT's, counts in the budget, so it replaces at least two; layers of no
    removal are left out of schedules), so a full count is the untouched grid. The
    count is known on the host; a look at the positions would make the host wait for the GPU just
    before it launches the pooling (at LLaVA-1.5-7B's batch 8 that wait cost ~2 ms of prefill)."""
    height, width = tokens.grid
    if tokens.num_tokens != height * width:
        raise ValueError(f"spatial pooling needs the whole {height}x{width} token grid, got {tokens.num_tokens} "
                         f"tokens: it cannot follow another reduction")


@dataclass
class GridPartitionFilter(SetSelectionFilter):
    """Keeps the top-left token of each bin (:func:`pooled_bands`: the ``h x w`` rectangle of
    :func:`pooled_grid` where the kept count has one)."""

    def select(self, tokens: TokenGroup, probe, kept: int) -> Tensor:
        _check_full_grid(tokens)
        height, width = tokens.grid
        bands = pooled_bands(tokens.grid, kept)
        bins = bin_of(tokens.positions, tokens.grid, bands, kept)
        rows, cols, band, per_band = _band_layout(tokens.positions, tokens.grid, bands, kept)
        first_row = (rows == 0) | (band != (rows * bands - 1) // height)
        first_col = (cols == 0) | (((cols + 1) * per_band - 1) // width != (cols * per_band - 1) // width)
        anchor = first_row & first_col
        # bins are numbered like their anchors' raster order, so sorting anchors by bin keeps raster order
        order = torch.argsort(torch.where(anchor, bins, bins.new_full((), height * width)), dim=1, stable=True)
        return order[:, :kept]


@dataclass
class GridPartitionCorrelate(Correlate):
    """Each source goes, with weight 1, to the kept token of its own bin."""

    def __call__(self, tokens: TokenGroup, probe, split: FilterResult) -> Correlation:
        kept = split.targets.shape[1]
        bins = bin_of(tokens.positions, tokens.grid, pooled_bands(tokens.grid, kept), kept)
        source_bin, target_bin = bins.gather(1, split.sources), bins.gather(1, split.targets)
        return Correlation((source_bin[:, :, None] == target_bin[:, None, :]).float())
