"""Correlate stage: for each discarded token, which kept tokens receive its information and how much.

A correlate maps ``(tokens, probe, filter_result)`` to a :class:`~ficoco.stages.tokens.Correlation`
whose weights are ``[B, r, T]`` (``r`` sources, ``T`` targets).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from .probe import AttentionProbe, token_importance
from .tokens import Correlation, FilterResult, TokenGroup, gather_rows


class Correlate(ABC):
    """Base class of the correlate stage."""

    #: the correlation sends sources into one new token instead of existing targets
    creates_token: bool = False

    @abstractmethod
    def __call__(self, tokens: TokenGroup, probe: AttentionProbe, split: FilterResult) -> Correlation: ...

    def without_cls(self) -> "Correlate":
        """This correlate for an encoder without [CLS]: itself, or its stand-in."""
        return self


def quantile_targets(c: Tensor, eps: float, allowed: Tensor | None = None) -> Tensor:
    """Token-adaptive target selection (docs/spec.md §3): keep ``C_ij`` where ``C_ij >= tau_i``,
    ``tau_i = quantile_eps({C_ij : j allowed})``, per source row; zero elsewhere.

    Args:
        c: ``[B, r, T]`` non-negative correlations.
        eps: quantile level in ``[0, 1]`` (0.998).
        allowed: optional ``[B, T]`` bool, targets that may receive.
    Returns:
        ``[B, r, T]`` with at least one non-zero entry per row: the row maximum is always kept, and
        a row with no positive correlation at all (under causal attention a source may see none of
        the targets) sends weight 1 to its first allowed target rather than losing the token.
    """
    c = c.float()
    if allowed is not None:
        c = c.masked_fill(~allowed[:, None, :], float("nan"))
        tau = torch.nanquantile(c, eps, dim=-1, keepdim=True)
    else:
        tau = torch.quantile(c, eps, dim=-1, keepdim=True)
    return _kept_or_first_allowed(c, c >= tau, allowed)  # NaN compares False: disallowed targets drop out


def _kept_or_first_allowed(c: Tensor, keep: Tensor, allowed: Tensor | None) -> Tensor:
    """``c`` where ``keep`` (``[B, r, T]``), zero elsewhere; a row left with no positive weight
    sends weight 1 to its first allowed target instead, so that no source is lost."""
    out = torch.where(keep, c, torch.zeros((), device=c.device))
    empty = out.sum(dim=-1, keepdim=True) <= 0
    first = torch.zeros(out.shape[:2] + (1,), dtype=torch.long, device=c.device)
    if allowed is not None:
        first += allowed.to(torch.int8).argmax(dim=-1)[:, None, None]
    fallback = torch.zeros_like(out).scatter_(-1, first, 1.0)
    return torch.where(empty, fallback, out)


def top_k_targets(c: Tensor, k: int, allowed: Tensor | None = None) -> Tensor:
    """Fixed-``K`` target selection (the paper's "fixed K" ablation, docs/spec.md §10): keep the ``k``
    largest allowed ``C_ij`` of each source row, zero elsewhere. Ties at the ``k``-th value go to
    the lower target index. A row with no positive allowed correlation sends weight 1 to its first
    allowed target, as :func:`quantile_targets` does.

    Args:
        c: ``[B, r, T]`` non-negative correlations.
        k: targets per source, at least 1 (``K = 0`` is pruning: no correlate at all).
        allowed: optional ``[B, T]`` bool, targets that may receive.
    Returns:
        ``[B, r, T]``.
    """
    if k < 1:
        raise ValueError(f"a fixed number of targets must be at least 1, got {k}; K = 0 is pruning")
    c = c.float()
    ranked = c if allowed is None else c.masked_fill(~allowed[:, None, :], -1.0)
    # a stable descending sort puts tied values in index order, so the cut is deterministic
    chosen = ranked.sort(dim=-1, descending=True, stable=True).indices[..., :min(k, c.shape[-1])]
    keep = torch.zeros_like(c, dtype=torch.bool).scatter_(-1, chosen, True)
    if allowed is not None:
        keep &= allowed[:, None, :]
    return _kept_or_first_allowed(c, keep, allowed)


def _choose_targets(c: Tensor, eps: float, fixed_k: int | None, allowed: Tensor | None) -> Tensor:
    return quantile_targets(c, eps, allowed) if fixed_k is None else top_k_targets(c, fixed_k, allowed)


def _check_fixed_k(fixed_k: int | None) -> None:
    if fixed_k is not None and (not isinstance(fixed_k, int) or fixed_k < 1):
        raise ValueError(f"fixed_k must be None (token-adaptive) or an integer >= 1, got {fixed_k!r}")


@dataclass
class AttentionQuantileCorrelate(Correlate):
    """FiCoCo-V correlate: ``C_ij = A_ij`` (attention of discarded token ``i`` to kept token ``j``,
    softmax over all keys), targets chosen per token by the ``eps`` quantile, or, with ``fixed_k``,
    each source's ``fixed_k`` most correlated targets (the paper's fixed-K ablation).

    Attributes:
        eps: quantile level of the token-adaptive targets (0.998).
        fixed_k: each source's ``fixed_k`` largest instead (``None``: token-adaptive).
        correlation_map: how ``A`` averages the heads. ``"mean_softmax"`` (default, docs/spec.md
            §3): the mean of the per-head softmax rows, the attention the layer computed;
            ``"mean_logits_softmax"``: the softmax of the head-averaged logits, as FiCoCo's
            official code correlates (docs/methods.md). Either forms only the sources' rows.
    """

    eps: float = 0.998
    fixed_k: int | None = None
    correlation_map: Literal["mean_softmax", "mean_logits_softmax"] = "mean_softmax"

    def __post_init__(self) -> None:
        _check_fixed_k(self.fixed_k)
        if self.correlation_map not in ("mean_softmax", "mean_logits_softmax"):
            raise ValueError(f"correlation_map must be 'mean_softmax' or 'mean_logits_softmax', "
                             f"got {self.correlation_map!r}")

    def __call__(self, tokens: TokenGroup, probe: AttentionProbe, split: FilterResult) -> Correlation:
        average = "probs" if self.correlation_map == "mean_softmax" else "logits"
        c = attention_between(probe, split.sources, split.targets, average)
        return Correlation(_choose_targets(c, self.eps, self.fixed_k, split.receivers))


@dataclass
class TextMediatedQuantileCorrelate(Correlate):
    """FiCoCo-L correlate (docs/spec.md §4): direct plus indirect correlation through the text,
    ``C_ij = gamma * A_ij + (1 - gamma) * (1/M) sum_k A_ki A_kj``, targets by the ``eps`` quantile
    or, with ``fixed_k``, each source's ``fixed_k`` most correlated targets."""

    gamma: float = 0.6
    eps: float = 0.998
    fixed_k: int | None = None

    def __post_init__(self) -> None:
        _check_fixed_k(self.fixed_k)

    def __call__(self, tokens: TokenGroup, probe: AttentionProbe, split: FilterResult) -> Correlation:
        direct = attention_between(probe, split.sources, split.targets)
        text = probe.text_attention  # [B, M, N]
        t_src = text.gather(2, split.sources[:, None, :].expand(-1, text.shape[1], -1))
        t_tgt = text.gather(2, split.targets[:, None, :].expand(-1, text.shape[1], -1))
        indirect = torch.einsum("bms,bmt->bst", t_src, t_tgt) / probe.num_text[:, :, None]
        c = self.gamma * direct + (1 - self.gamma) * indirect
        return Correlation(_choose_targets(c, self.eps, self.fixed_k, split.receivers))


@dataclass
class ArgmaxSimilarityCorrelate(Correlate):
    """ToMe correlate: each source goes to its single most similar receiver (cosine similarity of
    head-averaged keys), weight 1."""

    def __call__(self, tokens: TokenGroup, probe: AttentionProbe, split: FilterResult) -> Correlation:
        k = F.normalize(probe.mean_keys, dim=-1)
        sim = gather_rows(k, split.sources) @ gather_rows(k, split.targets).transpose(1, 2)  # [B, r, T]
        if split.receivers is not None:
            sim = sim.masked_fill(~split.receivers[:, None, :], float("-inf"))
        best = sim.argmax(dim=-1, keepdim=True)
        return Correlation(torch.zeros_like(sim).scatter_(-1, best, 1.0))


@dataclass
class ConvergentCorrelate(Correlate):
    """EViT correlate: every discarded token converges into one new fused token, weighted by the
    attention [CLS] pays it (``weights="cls"``) or, without [CLS], the attention it receives
    from all tokens (``"received"``)."""

    creates_token = True
    weights: Literal["cls", "received"] = "cls"

    def __post_init__(self) -> None:
        if self.weights not in ("cls", "received"):
            raise ValueError(f"weights must be 'cls' or 'received', got {self.weights!r}")

    def __call__(self, tokens: TokenGroup, probe: AttentionProbe, split: FilterResult) -> Correlation:
        importance = probe.cls_attention if self.weights == "cls" else probe.received_attention
        w = importance.gather(1, split.sources)
        return Correlation(w[:, :, None], into_new_token=True)

    def without_cls(self) -> "ConvergentCorrelate":
        return replace(self, weights="received")


@dataclass(frozen=True)
class NeighbourCorrelation(Correlation):
    """A convergent correlation (``weights`` ``[B, r, 1]``: each source's weight in one new token)
    plus what every kept token adds from its nearest neighbours, kept or discarded (PruMerge):

    Attributes:
        from_targets: ``[B, T, T]`` weight of kept token ``u``'s features added to kept token ``t``
            (zero diagonal).
        from_sources: ``[B, T, r]`` weight of source ``i``'s features added to kept token ``t``.
    """

    from_targets: Tensor | None = None
    from_sources: Tensor | None = None


@dataclass
class KeyNeighbourCorrelate(Correlate):
    """PruMerge's correlate: each kept token takes its ``neighbours`` nearest tokens by key cosine
    among *all* other candidates (kept ones included), each weighted by the attention it gets; and
    every discarded token goes, with the same weight, into one new token.

    Attributes:
        neighbours: how many (the official 32; fewer when there are fewer other tokens).
        weights: ``"cls"`` ([CLS] attention) or ``"received"`` (the stand-in without [CLS]).
        heads: ``"fused"``: attention and keys of the layer read as one head over all channels (the
            official code's: full keys, :attr:`AttentionProbe.fused_heads`); ``"mean"``: the
            mean of the per-head attention and the head-averaged keys.
    """

    creates_token = True
    neighbours: int = 32
    weights: Literal["cls", "received"] = "cls"
    heads: Literal["fused", "mean"] = "fused"

    def __post_init__(self) -> None:
        if isinstance(self.neighbours, bool) or not isinstance(self.neighbours, int) or self.neighbours < 1:
            raise ValueError(f"neighbours must be an integer >= 1, got {self.neighbours!r}")
        if self.weights not in ("cls", "received"):
            raise ValueError(f"weights must be 'cls' or 'received', got {self.weights!r}")
        if self.heads not in ("fused", "mean"):
            raise ValueError(f"heads must be 'fused' or 'mean', got {self.heads!r}")

    def __call__(self, tokens: TokenGroup, probe: AttentionProbe, split: FilterResult) -> NeighbourCorrelation:
        a = token_importance(probe, self.heads, self.weights)  # [B, N], shared with the filter's
        keys = F.normalize((probe.fused_heads if self.heads == "fused" else probe).mean_keys, dim=-1)  # [B, N, d]
        similarity = gather_rows(keys, split.targets) @ keys.transpose(1, 2)  # [B, T, N]
        similarity.scatter_(2, split.targets[..., None], float("-inf"))  # a token is not its own neighbour
        near = similarity.topk(min(self.neighbours, keys.shape[1] - 1), dim=-1).indices  # [B, T, k]
        w = torch.zeros_like(similarity).scatter_(2, near, a[:, None, :].expand_as(similarity).gather(2, near))
        return NeighbourCorrelation(a.gather(1, split.sources)[:, :, None], into_new_token=True,
                                    from_targets=gather_cols(w, split.targets), from_sources=gather_cols(w, split.sources))

    def without_cls(self) -> "KeyNeighbourCorrelate":
        return replace(self, weights="received")


@dataclass
class NoCorrelate(Correlate):
    """Pure pruning: discarded tokens pass their information nowhere (FastV, random)."""

    def __call__(self, tokens: TokenGroup, probe: AttentionProbe, split: FilterResult) -> Correlation:
        return Correlation(None)


def attention_between(probe, rows: Tensor, cols: Tensor, average: Literal["probs", "logits"] = "probs") -> Tensor:
    """``[B, r, T]``: the attention of candidates ``rows`` (``[B, r]``) to candidates ``cols``
    (``[B, T]``), softmax over all keys: the probe's own ``attention_between`` where it has one
    (which may form only these columns), else its full rows gathered at ``cols``."""
    between = getattr(probe, "attention_between", None)
    if between is not None:
        return between(rows, cols, average)
    full = probe.attention_rows(rows) if average == "probs" else probe.attention_rows(rows, average)
    return gather_cols(full, cols)


def gather_cols(rows: Tensor, cols: Tensor) -> Tensor:
    """``[B, r, N]`` gathered at columns ``cols`` (``[B, T]``) → ``[B, r, T]``."""
    return rows.gather(2, cols[:, None, :].expand(-1, rows.shape[1], -1))
