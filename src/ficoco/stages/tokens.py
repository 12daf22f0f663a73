"""The data that flows between the three stages.

A reduction point sees ``N`` *candidate* tokens per sample (the visual tokens that may be discarded:
patch tokens inside the vision encoder, image tokens inside the LLM). Everything else in the
sequence ([CLS], system prompt, question) is context: it can be attended to but is never discarded
and never receives merged information.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

#: ``positions`` value of a token that does not stand for one grid cell (e.g. EViT's fused token).
NO_POSITION = -1


@dataclass(frozen=True)
class TokenGroup:
    """Candidate tokens at one reduction point.

    Attributes:
        features: ``[B, N, D]`` hidden states of the candidates, in sequence order.
        sizes: ``[B, N]`` float, how many original patches each token stands for (1 at the start).
        positions: ``[B, N]`` long, original raster index ``row * grid_w + col`` of each token on the
            patch grid, or :data:`NO_POSITION` for synthetic tokens.
        grid: ``(grid_h, grid_w)`` of the original patch grid.
    """

    features: Tensor
    sizes: Tensor
    positions: Tensor
    grid: tuple[int, int]

    @property
    def batch_size(self) -> int:
        return self.features.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.features.shape[1]

    def select(self, index: Tensor) -> "TokenGroup":
        """The tokens at candidate indices ``index`` (``[B, K]``), in that order."""
        return TokenGroup(
            gather_rows(self.features, index), self.sizes.gather(1, index), self.positions.gather(1, index), self.grid
        )

    @classmethod
    def fresh(cls, features: Tensor, grid: tuple[int, int], positions: Tensor | None = None) -> "TokenGroup":
        """Tokens that are still one patch each; ``positions`` default to ``0..N-1``."""
        b, n, _ = features.shape
        if positions is None:
            positions = torch.arange(n, device=features.device).expand(b, n)
        sizes = torch.ones(b, n, device=features.device, dtype=torch.float32)
        return cls(features=features, sizes=sizes, positions=positions, grid=grid)


@dataclass(frozen=True)
class FilterResult:
    """Output of a :class:`~ficoco.stages.filters.Filter`.

    Attributes:
        sources: ``[B, r]`` long, candidate indices to discard (the set S).
        targets: ``[B, N - r]`` long, candidate indices to keep (the set T), in the order the
            survivors take: ascending, so that the kept tokens stay in their original order, for
            every filter whose ``keeps_order`` is true (all but ToMe's official alternation, whose
            order is its ``[unmerged A, B]``).
        scores: ``[B, N]`` float redundancy scores (higher = more discardable), for inspection.
        receivers: optional ``[B, N - r]`` bool, which targets may receive information (ToMe's
            bipartite split lets only the other half receive); ``None`` means all of them.
        passing: optional ``[B, r]`` bool, which sources hand their information on (SparseVLM
            recycles only the most relevant of the tokens it deletes; the others are dropped);
            ``None`` means all of them.
    """

    sources: Tensor
    targets: Tensor
    scores: Tensor | None = None
    receivers: Tensor | None = None
    passing: Tensor | None = None


@dataclass(frozen=True)
class Correlation:
    """Output of a :class:`~ficoco.stages.correlates.Correlate`: where discarded tokens go.

    Attributes:
        weights: ``[B, r, N - r]`` non-negative, ``C_ij`` restricted to each source's chosen targets
            (zero elsewhere); ``[B, r, 1]`` when ``into_new_token`` (one fused token receives all);
            ``None`` for pure pruning.
        into_new_token: the sources converge into one new token appended after the kept ones.
    """

    weights: Tensor | None
    into_new_token: bool = False


@dataclass(frozen=True)
class ReductionResult:
    """What one reduction step produced.

    Attributes:
        tokens: the surviving tokens (targets in order, then the new fused token if any).
        kept: ``[B, N - r]`` candidate indices of the kept targets, in the survivors' order
            (the filter's ``targets``: ascending unless the filter says otherwise).
        sources: ``[B, r]`` candidate indices that were discarded.
        new_token_slot: ``[B]`` candidate index whose row carries the new fused token (one of the
            sources) when the correlation created one, else ``None``.
        filter_result / correlation: the intermediate stage outputs, for inspection.
    """

    tokens: TokenGroup
    kept: Tensor
    sources: Tensor
    new_token_slot: Tensor | None
    filter_result: FilterResult
    correlation: Correlation


def gather_rows(x: Tensor, index: Tensor) -> Tensor:
    """``x[b, index[b]]`` for ``x`` of shape ``[B, N, ...]`` and ``index`` of shape ``[B, K]``."""
    if x.dim() == 2:
        return x.gather(1, index)
    # advanced indexing reads B*K indices; gather with an expanded index would read one per element
    batch = torch.arange(x.shape[0], device=x.device)[:, None]
    if x.shape[0] == 1 and index.shape[0] > 1:
        batch = torch.zeros_like(batch)
    return x[batch, index]


def first_k_true(flags: Tensor, k: int) -> Tensor:
    """``[B, k]`` ascending indices of the first ``k`` true entries of each row of ``flags``
    ``[B, N]`` (rows hold at least ``k``), with no host sync: a stable argsort of the flags lists
    the true ones first, in ascending order."""
    return torch.argsort((~flags).to(torch.int8), dim=1, stable=True)[:, :k]


def complement(index: Tensor, n: int) -> Tensor:
    """Ascending indices of ``0..n-1`` not in ``index`` (``[B, r]`` → ``[B, n - r]``), without host syncs."""
    taken = torch.zeros(index.shape[0], n, dtype=torch.bool, device=index.device).scatter_(1, index, True)
    return first_k_true(~taken, n - index.shape[1])
