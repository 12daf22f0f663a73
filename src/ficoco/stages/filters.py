"""Filter stage: score every candidate for redundancy and split it into sources S and targets T.

A filter maps ``(tokens, probe, r)`` to a :class:`~ficoco.stages.tokens.FilterResult`; the ``r``
highest redundancy scores form S. Scores only need what the probe provides, so any filter runs in
the vision encoder or the LLM wherever its statistics exist.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from .probe import AttentionProbe, token_importance
from .tokens import NO_POSITION, FilterResult, TokenGroup, complement, first_k_true, gather_rows


class Filter(ABC):
    """Base class: subclasses define :meth:`scores`; the top ``r`` scores are discarded."""

    #: the filter decides how many tokens each sample keeps (PruMerge's outliers): a reduction
    #: then removes what :meth:`kept_counts` leaves, and takes no budget
    adaptive: bool = False
    #: the filter reads the instruction after the image (``probe.text_embeddings``, CDPruner): an
    #: adapter may then find the instruction's tokens before the encoder runs
    reads_instruction: bool = False

    @property
    def keeps_order(self) -> bool:
        """Whether the targets come back in ascending candidate order (survivors keep their
        sequence order). Only ToMe's official alternation hands them on in another order."""
        return True

    @property
    def decides_removals(self) -> bool:
        """Whether the filter decides from the data how many candidates each sample removes
        (:meth:`removals`), so that the schedule's count is nominal (SparseVLM's rank rule)."""
        return False

    def removals(self, tokens: TokenGroup, probe: AttentionProbe) -> list[int]:
        """Per sample, how many candidates it removes, when :attr:`decides_removals`; the caller
        then hands each sample its own count as ``num_sources``."""
        raise TypeError(f"{type(self).__name__} removes as many tokens as the schedule says")

    @abstractmethod
    def scores(self, tokens: TokenGroup, probe: AttentionProbe) -> Tensor:
        """``[B, N]`` redundancy scores; higher means more discardable."""

    def __call__(self, tokens: TokenGroup, probe: AttentionProbe, num_sources: int) -> FilterResult:
        s = self.scores(tokens, probe)
        return split_top(s, num_sources)

    def without_cls(self) -> "Filter":
        """This filter for an encoder without [CLS] (SigLIP, Qwen-VL): itself, or its stand-in."""
        return self

    def kept_counts(self, tokens: TokenGroup, probe: AttentionProbe) -> Tensor:
        """``[B]`` long: how many candidates each sample keeps, for an :attr:`adaptive` filter."""
        raise TypeError(f"{type(self).__name__} keeps the number of tokens it is given; it decides no count of its own")


def split_top(scores: Tensor, num_sources: int) -> FilterResult:
    """Sources = the ``num_sources`` highest scores; targets = the rest, in ascending order."""
    n = scores.shape[1]
    if not 0 <= num_sources <= n:
        raise ValueError(f"cannot discard {num_sources} of {n} tokens")
    sources = scores.topk(num_sources, dim=1, sorted=False).indices
    return FilterResult(sources=sources, targets=complement(sources, n), scores=scores)


def l2_normalize(x: Tensor) -> Tensor:
    """Divide ``[B, N]`` scores by their L2 norm over the token axis."""
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def local_penalty(scores: Tensor, positions: Tensor, grid: tuple[int, int], window: int = 2) -> Tensor:
    """FiCoCo-V's local penalty (docs/spec.md §3).

    Lays the scores on the patch grid, cuts it into non-overlapping ``window x window`` cells and,
    in each cell, makes the single most redundant present token more discardable: score x2 if
    positive, /2 if negative. Ties go to the lowest raster position. Tokens without a grid position
    are left alone.

    Args:
        scores: ``[B, N]`` redundancy scores.
        positions: ``[B, N]`` raster positions on ``grid`` (or ``NO_POSITION``).
    Returns:
        ``[B, N]`` penalised scores.
    """
    b, n = scores.shape
    gh, gw = grid
    cells_w = -(-gw // window)
    num_cells = -(-gh // window) * cells_w
    on_grid = positions != NO_POSITION
    pos = positions.clamp_min(0)
    cell = (pos // gw // window) * cells_w + (pos % gw) // window
    cell = torch.where(on_grid, cell, num_cells)  # off-grid tokens share a dummy cell
    s = scores.float()
    best = torch.full((b, num_cells + 1), float("-inf"), device=s.device).scatter_reduce(
        1, cell, s, reduce="amax", include_self=True
    )
    is_best = s == best.gather(1, cell)
    # among tied maxima keep the lowest raster position
    big = torch.iinfo(torch.long).max
    first = torch.full((b, num_cells + 1), big, device=s.device, dtype=torch.long).scatter_reduce(
        1, cell, torch.where(is_best, pos, big), reduce="amin", include_self=True
    )
    chosen = is_best & (pos == first.gather(1, cell)) & on_grid
    penalised = torch.where(s > 0, s * 2, s / 2)
    return torch.where(chosen, penalised, s).to(scores.dtype)


@dataclass
class FiCoCoVisionFilter(Filter):
    """FiCoCo-V filter: ``s_i = lam * v_i - (1 - lam) * c_i`` (docs/spec.md §3), then the local penalty.

    Attributes:
        lam: weight of the vision-aware term ``v`` (0.35).
        vision_term: ``"logits"`` (default): ``v_i = mean_j A~_ij``, O(N d); ``"received"``: the
            column mean of the softmax map (the appendix wording), O(N^2 d).
        semantic_term: ``"cls"`` (default): ``c_i`` = [CLS] attention; ``"key_proxy"``:
            ``c_i = -cos(mean key, k_i)`` for encoders without [CLS] (docs/spec.md §6).
        cls_term: what the [CLS] attention of ``semantic_term="cls"`` is: ``"softmax"`` (default,
            docs/spec.md §3): the head-averaged softmax row of [CLS]; ``"logits"``: the
            head-averaged pre-softmax logits of that row, as FiCoCo's official code takes it
            (docs/methods.md). Both cost one row. Ignored by ``"key_proxy"``.
        swap_weights: put ``lam`` on the semantic term instead (the reference code's assignment).
        normalize: L2-normalise both terms over the tokens before combining (reference behaviour).
        local_penalty: apply the 2x2 local penalty.
        window: penalty window side.
    """

    lam: float = 0.35
    vision_term: Literal["logits", "received"] = "logits"
    semantic_term: Literal["cls", "key_proxy"] = "cls"
    cls_term: Literal["softmax", "logits"] = "softmax"
    swap_weights: bool = False
    normalize: bool = True
    local_penalty: bool = True
    window: int = 2

    def __post_init__(self) -> None:
        if not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"lam must be in [0, 1], got {self.lam}")
        if self.vision_term not in ("logits", "received"):
            raise ValueError(f"vision_term must be 'logits' or 'received', got {self.vision_term!r}")
        if self.semantic_term not in ("cls", "key_proxy"):
            raise ValueError(f"semantic_term must be 'cls' or 'key_proxy', got {self.semantic_term!r}")
        if self.cls_term not in ("softmax", "logits"):
            raise ValueError(f"cls_term must be 'softmax' or 'logits', got {self.cls_term!r}")

    def scores(self, tokens: TokenGroup, probe: AttentionProbe) -> Tensor:
        v = probe.mean_logits if self.vision_term == "logits" else probe.received_attention
        if self.semantic_term == "key_proxy":
            c = key_proxy_semantic(probe)
        else:
            c = probe.cls_attention if self.cls_term == "softmax" else probe.cls_logits
        if self.normalize:
            v, c = l2_normalize(v), l2_normalize(c)
        w_v, w_c = (1 - self.lam, self.lam) if self.swap_weights else (self.lam, 1 - self.lam)
        s = w_v * v - w_c * c
        if self.local_penalty:
            s = local_penalty(s, tokens.positions, tokens.grid, self.window)
        return s

    def without_cls(self) -> "FiCoCoVisionFilter":
        """The mean-key stand-in for the [CLS] term (docs/spec.md §6)."""
        return replace(self, semantic_term="key_proxy") if self.semantic_term == "cls" else self


def key_proxy_semantic(probe: AttentionProbe) -> Tensor:
    """``[B, N]``: ``c_i = -cos(mu, k_i)`` with ``k_i`` the head-averaged key and ``mu`` the mean
    candidate key (docs/spec.md §6), a [CLS]-free stand-in for semantic importance."""
    k = probe.mean_keys
    mu = k.mean(dim=1, keepdim=True)
    return -F.cosine_similarity(k, mu, dim=-1)


@dataclass
class FiCoCoLanguageFilter(Filter):
    """FiCoCo-L filter (docs/spec.md §4): ``s_i = beta * mean_{j in V} A~_ij - (1 - beta) * (1/M) sum_k A_ki``.

    The text term is the attention candidate ``i`` receives from the text queries that follow the
    image. Attributes:
        beta: weight of the visual term (0.6).
        normalize: L2-normalise both terms over the tokens before combining, as FiCoCo-V does; the
            raw terms live on unrelated scales (logits vs probabilities).
    """

    beta: float = 0.6
    normalize: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {self.beta}")

    def scores(self, tokens: TokenGroup, probe: AttentionProbe) -> Tensor:
        v, t = probe.mean_logits, probe.text_received
        if self.normalize:
            v, t = l2_normalize(v), l2_normalize(t)
        return self.beta * v - (1 - self.beta) * t


@dataclass
class CLSAttentionFilter(Filter):
    """EViT's filter: the tokens [CLS] attends to least are discarded.

    Attributes:
        importance: ``"cls"``: the attention [CLS] pays each token; ``"received"``: the attention a
            token receives from all tokens (column mean of the softmax map), the stand-in for
            encoders without [CLS].
    """

    importance: Literal["cls", "received"] = "cls"

    def __post_init__(self) -> None:
        if self.importance not in ("cls", "received"):
            raise ValueError(f"importance must be 'cls' or 'received', got {self.importance!r}")

    def scores(self, tokens: TokenGroup, probe: AttentionProbe) -> Tensor:
        return -(probe.cls_attention if self.importance == "cls" else probe.received_attention)

    def without_cls(self) -> "CLSAttentionFilter":
        return replace(self, importance="received")


@dataclass
class LastTokenAttentionFilter(Filter):
    """FastV's filter: the visual tokens the last prompt token attends to least are discarded."""

    def scores(self, tokens: TokenGroup, probe: AttentionProbe) -> Tensor:
        return -probe.last_token_attention


@dataclass
class BipartiteSimilarityFilter(Filter):
    """ToMe's filter: alternate tokens form sets A and B; each token of A is scored by its best
    cosine similarity (head-averaged keys) to B; the ``r`` most similar tokens of A are discarded
    and only B may receive them.

    Attributes:
        alternation: how the sets alternate, and the order survivors are handed on in.
            ``"patches"`` (default, docs/spec.md §7): over the candidates only, A = even
            candidates, B = odd; ``r`` is at most ``ceil(N / 2)``; survivors keep their sequence
            order. ``"official"``: as ToMe's official ``bipartite_soft_matching`` (docs/methods.md):
            over the whole sequence with [CLS] (when the encoder has one, right before the
            candidates) at index 0, so A = [CLS] + odd candidates, [CLS] protected, and B = even
            candidates; ``r`` is at most ``floor(N / 2)``; survivors come back in ToMe's output
            order, the unmerged tokens of A then B, each in sequence order (without [CLS], the
            unmerged A in descending score order, as ToMe leaves them), and the next layer
            alternates over that order again. Adapters that must keep sequence order (the LLM
            side, Qwen-VL's packed towers) refuse it.
    """

    alternation: Literal["patches", "official"] = "patches"

    def __post_init__(self) -> None:
        if self.alternation not in ("patches", "official"):
            raise ValueError(f"alternation must be 'patches' or 'official', got {self.alternation!r}")

    @property
    def keeps_order(self) -> bool:
        return self.alternation == "patches"

    def max_sources(self, n: int) -> int:
        """Most tokens one step can discard from ``n`` candidates: the unprotected size of A
        (official ToMe's ``(t - protected) // 2`` is ``n // 2`` with and without [CLS])."""
        return (n + 1) // 2 if self.alternation == "patches" else n // 2

    def _a_parity(self, probe: AttentionProbe) -> int:
        """Candidate-index parity of set A: with [CLS] at sequence index 0 the official split's
        even sequence indices are the odd candidates."""
        if self.alternation == "patches":
            return 0
        return 1 if getattr(probe, "cls_index", None) is not None else 0

    def scores(self, tokens: TokenGroup, probe: AttentionProbe) -> Tensor:
        k = F.normalize(probe.mean_keys, dim=-1)
        a = self._a_parity(probe)
        set_a, set_b = k[:, a::2], k[:, 1 - a::2]
        if set_a.shape[1] and set_b.shape[1]:
            best = (set_a @ set_b.transpose(1, 2)).amax(dim=-1)
        else:
            best = torch.zeros_like(set_a[..., 0])
        s = torch.full(k.shape[:2], float("-inf"), device=k.device)
        s[:, a::2] = best
        return s

    def __call__(self, tokens: TokenGroup, probe: AttentionProbe, num_sources: int) -> FilterResult:
        n = tokens.num_tokens
        if num_sources > self.max_sources(n):
            raise ValueError(f"ToMe merges at most {self.max_sources(n)} of {n} tokens per layer: cannot remove "
                             f"{num_sources}")
        a = self._a_parity(probe)
        result = split_top(self.scores(tokens, probe), num_sources)
        targets = result.targets  # ascending
        in_a = targets % 2 == a
        if self.alternation == "official":
            if a == 1:  # with [CLS]: ToMe sorts the unmerged A back into sequence order
                key = (~in_a).to(torch.int8)
            else:  # without: they stay in ToMe's edge order, most similar first; B after them
                key = torch.where(in_a, -result.scores.gather(1, targets), float("inf"))
            order = torch.argsort(key, dim=1, stable=True)  # stable: B (and ties) keep sequence order
            targets, in_a = targets.gather(1, order), in_a.gather(1, order)
        return FilterResult(result.sources, targets, result.scores, ~in_a)


@dataclass
class RandomFilter(Filter):
    """A floor: discard tokens at random. The ranking is a fixed pseudo-random permutation of the
    grid positions drawn from ``seed`` by an integer hash computed on the device, so it is
    deterministic, independent of the batch composition and safe inside CUDA-graph capture."""

    seed: int = 0

    def scores(self, tokens: TokenGroup, probe: AttentionProbe) -> Tensor:
        gh, gw = tokens.grid
        # synthetic tokens (NO_POSITION) share the key just past the grid
        key = torch.where(tokens.positions == NO_POSITION, gh * gw, tokens.positions).long()
        return _hash_unit(key + 1 + (self.seed % 1_000_003) * 4099)


def _hash_unit(x: Tensor) -> Tensor:
    """Integer hash (xorshift-multiply, 32 bit) of ``x`` mapped to ``[0, 1)``."""
    mask = 0xFFFFFFFF
    x = (x * 0x9E3779B1) & mask
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & mask
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & mask
    x = x ^ (x >> 16)
    return x.float() / 4294967296.0


@dataclass
class TruncateFilter(Filter):
    """No scoring at all: the last ``r`` candidates in sequence order are discarded. With pruning
    this is the *oracle* of the speed benchmarks: the same hooks and shapes as a real method, with
    none of its attention work."""

    def scores(self, tokens: TokenGroup, probe: AttentionProbe) -> Tensor:
        n = tokens.num_tokens
        return torch.arange(n, device=tokens.features.device, dtype=torch.float32).expand(tokens.batch_size, n)


class SetSelectionFilter(Filter):
    """A filter that chooses the kept set as a whole, so that which tokens it keeps depends on how
    many (pooling bins, DivPrune's farthest points, CDPruner's DPP): subclasses define
    :meth:`select`; no per-token score ranks the tokens."""

    @abstractmethod
    def select(self, tokens: TokenGroup, probe, kept: int) -> Tensor:
        """``[B, kept]`` candidate indices to keep (any order)."""

    def scores(self, tokens: TokenGroup, probe) -> Tensor:
        raise TypeError(f"{type(self).__name__} chooses a set of tokens as a whole; it has no per-token score")

    def __call__(self, tokens: TokenGroup, probe, num_sources: int) -> FilterResult:
        n = tokens.num_tokens
        if not 0 <= num_sources <= n:
            raise ValueError(f"cannot discard {num_sources} of {n} tokens")
        targets = self.select(tokens, probe, n - num_sources).sort(dim=1).values
        chosen = torch.zeros(tokens.batch_size, n, device=targets.device).scatter_(1, targets, 1.0)
        return FilterResult(sources=complement(targets, n), targets=targets, scores=1.0 - chosen)


@dataclass
class DominantContextualFilter(Filter):
    """VisionZip's split (Yang et al., CVPR 2025): of ``kept`` tokens, ``round(kept x
    contextual_share)`` are *contextual* and the rest *dominant*. Dominant: the tokens [CLS] attends
    to most (head-averaged; without [CLS], the attention they receive). Contextual: of the other
    tokens in raster order, every ``step``-th from the first (``step = max(1, remaining //
    contextual)``); they are the only receivers of the rest (``FilterResult.receivers``), which
    merge into them. The official split is 54 + 10 at 64 tokens (the same share, 5/32, gives
    162 + 30 at 192 and 108 + 20 at 128).

    Attributes:
        contextual_share: share of the kept tokens that are contextual.
        importance: ``"cls"`` or ``"received"`` (the stand-in without [CLS]).
    """

    contextual_share: float = 10 / 64
    importance: Literal["cls", "received"] = "cls"

    def __post_init__(self) -> None:
        if not 0.0 <= self.contextual_share < 1.0:
            raise ValueError(f"contextual_share must lie in [0, 1), got {self.contextual_share}")
        if self.importance not in ("cls", "received"):
            raise ValueError(f"importance must be 'cls' or 'received', got {self.importance!r}")

    def scores(self, tokens: TokenGroup, probe: AttentionProbe) -> Tensor:
        """``[B, N]``: minus the dominance score (the attention a token gets)."""
        return -(probe.cls_attention if self.importance == "cls" else probe.received_attention)

    def __call__(self, tokens: TokenGroup, probe: AttentionProbe, num_sources: int) -> FilterResult:
        n = tokens.num_tokens
        if not 0 <= num_sources < n:
            raise ValueError(f"cannot discard {num_sources} of {n} tokens and keep any")
        kept = n - num_sources
        contextual = min(round(kept * self.contextual_share), num_sources)
        dominant = kept - contextual
        s = self.scores(tokens, probe)
        top = (-s).topk(dominant, dim=1, sorted=False).indices
        rest = complement(top, n)  # [B, N - dominant] the remaining tokens in sequence order
        # strided picks walk the grid in raster order, which the sequence need not follow (Qwen2.5-VL's
        # tower holds its tokens window by window); on a raster-ordered sequence this is the identity
        rest = rest.gather(1, tokens.positions.gather(1, rest).argsort(dim=1, stable=True))
        step = max(1, rest.shape[1] // contextual) if contextual else 1
        at = torch.arange(contextual, device=rest.device) * step
        targets_ctx = rest[:, at]
        targets = torch.cat([top, targets_ctx], dim=1).sort(dim=1).values
        sources = complement(targets, n)
        is_ctx = torch.zeros(tokens.batch_size, n, dtype=torch.bool, device=rest.device)
        is_ctx.scatter_(1, targets_ctx, True)
        return FilterResult(sources=sources, targets=targets, scores=s, receivers=is_ctx.gather(1, targets))

    def without_cls(self) -> "DominantContextualFilter":
        return replace(self, importance="received")


@dataclass
class OutlierAttentionFilter(Filter):
    """PruMerge's filter (Shang et al., ICCV 2025): keep the tokens whose [CLS] attention is an
    outlier of their image's, ``a_i > Q3 + iqr_multiplier x (Q3 - Q1)`` (quartiles of the sample's
    own ``a``, linearly interpolated as ``numpy.percentile``; at least its most attended token),
    so the count adapts to the image. PruMerge+ (``spatial_samples``) adds tokens spread over the
    grid: with ``o`` outliers of ``N``, every ``s``-th raster position from 0, ``s = (N // o) //
    3``, below ``N - 1`` (the official bound, which leaves out the last patch).

    With a budget (``adaptive=False``) the count is exact: PruMerge keeps the ``kept`` most attended
    tokens (the top of the same ranking, outliers first); PruMerge+ keeps its outliers (the
    ``kept`` most attended of them when there are more) and fills up with ``kept - o`` tokens
    evenly spaced in raster order among the others (ranks ``floor(i x (N - o) / (kept - o))``).

    Attributes:
        iqr_multiplier: the fence's multiple of the interquartile range (the official 1.5).
        spatial_samples: PruMerge+'s spread tokens.
        adaptive: the outliers decide each sample's count (:meth:`kept_counts`); a call must then
            remove exactly what they leave (all samples alike in one call).
        heads: ``"fused"``: the layer read as one head over all channels (the official code's
            ``softmax(q . k / sqrt(H * d))``, :attr:`AttentionProbe.fused_heads`); ``"mean"``: the
            mean of the layer's per-head softmax rows.
        importance: ``"cls"`` or ``"received"`` (the stand-in without [CLS]).
        order: ``"raster"`` (default): kept tokens in raster order; ``"official"``: in the official
            code's order, the attention-ranked tokens by descending attention, then PruMerge+'s
            spread tokens in raster order.
    """

    iqr_multiplier: float = 1.5
    spatial_samples: bool = False
    adaptive: bool = False
    heads: Literal["fused", "mean"] = "fused"
    importance: Literal["cls", "received"] = "cls"
    order: Literal["raster", "official"] = "raster"

    def __post_init__(self) -> None:
        if isinstance(self.iqr_multiplier, bool) or not isinstance(self.iqr_multiplier, (int, float)) \
                or self.iqr_multiplier < 0:
            raise ValueError(f"iqr_multiplier must be a number >= 0, got {self.iqr_multiplier!r}")
        if self.heads not in ("fused", "mean"):
            raise ValueError(f"heads must be 'fused' or 'mean', got {self.heads!r}")
        if self.importance not in ("cls", "received"):
            raise ValueError(f"importance must be 'cls' or 'received', got {self.importance!r}")
        if self.order not in ("raster", "official"):
            raise ValueError(f"order must be 'raster' or 'official', got {self.order!r}")

    @property
    def keeps_order(self) -> bool:
        return self.order == "raster"

    def attention(self, probe: AttentionProbe) -> Tensor:
        """``[B, N]`` float32: the attention each candidate gets (the ranking and the outliers' statistic)."""
        return token_importance(probe, self.heads, self.importance)

    def scores(self, tokens: TokenGroup, probe: AttentionProbe) -> Tensor:
        return -self.attention(probe)

    def outliers(self, attention: Tensor) -> Tensor:
        """``[B, N]`` bool: the upper-fence outliers of each row of ``attention``, or its largest
        entry where none is (the official code would then keep nothing, and PruMerge+ divide by
        zero)."""
        # q made on the device: a tensor from a Python list is copied from pageable memory, and on a
        # GPU that copy makes the host wait for all queued work (the encoder), leaving the GPU idle
        # while the host then launches the rest of the reduction (~2 ms at LLaVA-1.5-7B's batch 8)
        q = torch.linspace(0.25, 0.75, 2, device=attention.device, dtype=attention.dtype)  # exactly [0.25, 0.75]
        quartiles = torch.quantile(attention, q, dim=1)  # [2, B]
        fence = quartiles[1] + self.iqr_multiplier * (quartiles[1] - quartiles[0])
        above = attention > fence[:, None]
        top = torch.zeros_like(above).scatter_(1, attention.argmax(dim=1, keepdim=True), True)
        return torch.where(above.any(dim=1, keepdim=True), above, top)

    def _adaptive(self, attention: Tensor, outlier: Tensor) -> Tensor:
        """``[B, N]`` bool: the outliers, and PruMerge+'s strided tokens; never every token (the
        least attended one is then left to the extra token, where the official code would hand
        on ``N + 1`` tokens, the last one empty)."""
        if not self.spatial_samples:
            return outlier
        n = attention.shape[1]
        stride = ((n // outlier.sum(dim=1)) // 3).clamp_min(1)  # the official int(int(N / o) / 3), at least 1
        position = torch.arange(n, device=attention.device)
        chosen = outlier | ((position % stride[:, None] == 0) & (position < n - 1))
        least = torch.zeros_like(chosen).scatter_(1, attention.argmin(dim=1, keepdim=True), True)
        return chosen & ~(least & chosen.all(dim=1, keepdim=True))

    def _budget(self, attention: Tensor, kept: int) -> tuple[Tensor, Tensor]:
        """``([B, N] bool kept, [B, N] bool ranked by attention)`` with exactly ``kept`` per row."""
        top = torch.zeros_like(attention, dtype=torch.bool).scatter_(1, attention.topk(kept, dim=1).indices, True)
        if not self.spatial_samples:  # the top of the ranking: no fence needed
            return top, top
        outlier = self.outliers(attention)
        n = attention.shape[1]
        count = outlier.sum(dim=1, keepdim=True)  # [B, 1]
        rest = (n - count).clamp_min(1)  # rows where it is 0 take `top` below
        need = (kept - count).clamp_min(0)
        rank = (~outlier).cumsum(dim=1) - 1  # raster rank among the non-outliers
        # rank r is one of floor(i * rest / need), i < need, iff i = ceil(r * need / rest) maps back to r
        i = (rank * need + rest - 1) // rest
        fill = ~outlier & (i < need) & (i * rest // need.clamp_min(1) == rank)
        enough = count >= kept
        return torch.where(enough, top, outlier | fill), torch.where(enough, top, outlier)

    def kept_counts(self, tokens: TokenGroup, probe: AttentionProbe) -> Tensor:
        if not self.adaptive:
            return super().kept_counts(tokens, probe)
        attention = self.attention(probe)
        return self._adaptive(attention, self.outliers(attention)).sum(dim=1)

    def __call__(self, tokens: TokenGroup, probe: AttentionProbe, num_sources: int) -> FilterResult:
        n = tokens.num_tokens
        if not 0 <= num_sources <= n:
            raise ValueError(f"cannot discard {num_sources} of {n} tokens")
        kept = n - num_sources
        attention = self.attention(probe)
        if self.adaptive:
            ranked = self.outliers(attention)
            chosen = self._adaptive(attention, ranked)
            counts = chosen.sum(dim=1)
            if bool((counts != kept).any()):
                raise ValueError(f"the outliers keep {counts.tolist()} tokens per sample, not {kept}: an adaptive "
                                 f"reduction removes what kept_counts() leaves, one count per call")
        else:
            chosen, ranked = self._budget(attention, kept)
        targets = first_k_true(chosen, kept)  # ascending
        if self.order == "official":  # attention-ranked ones by descending attention, then the spread ones
            key = torch.where(ranked.gather(1, targets), -attention.gather(1, targets), float("inf"))
            targets = targets.gather(1, torch.argsort(key, dim=1, stable=True))
        return FilterResult(sources=complement(targets, n), targets=targets, scores=-attention)

    def without_cls(self) -> "OutlierAttentionFilter":
        return replace(self, importance="received")


@dataclass
class DuplicationFilter(Filter):
    """DART's filter (Wen et al., EMNLP 2025): keep *pivot* tokens and the tokens least duplicated
    by them. Pivots: the ``image_pivots`` visual tokens and the ``text_pivots`` text tokens after
    the image whose keys (every head) have the largest L1 norm, taken before RoPE (the official
    code takes it after, which ties the pivots to absolute positions and so to left padding). Then each pivot in
    turn (image pivots, then text pivots, each by descending norm) claims, among the visual tokens
    not yet kept, those whose hidden state is *least* similar to its own (cosine of the states
    normed by the decoder's final norm); the kept set is the image pivots and every claimed token.
    The ``kept - image_pivots`` claims are spread over the pivots as evenly as they divide, the
    first pivots taking one more (the official code gives each ``floor(budget / pivots)`` and so
    keeps 4 more or fewer tokens than asked).

    Attributes:
        image_pivots / text_pivots: the official 4 and 4.
    """

    image_pivots: int = 4
    text_pivots: int = 4

    def __post_init__(self) -> None:
        if self.image_pivots < 1 or self.text_pivots < 0:
            raise ValueError(f"DART needs at least one image pivot and no negative text pivots, got "
                             f"{self.image_pivots} and {self.text_pivots}")

    def scores(self, tokens: TokenGroup, probe: AttentionProbe) -> Tensor:
        """``[B, N]``: minus the L1 norm of each visual token's keys (its pivot rank)."""
        return -self._key_norms(probe, probe.candidates)

    @staticmethod
    def _key_norms(probe: AttentionProbe, rows: Tensor) -> Tensor:
        return gather_rows(probe.keys, rows).float().abs().sum(dim=(-1, -2))

    @staticmethod
    def _normed(probe: AttentionProbe, states: Tensor) -> Tensor:
        """``states`` ``[..., D]`` as the decoder's final norm would scale them, unit length."""
        states = states.float()
        if probe.hidden_weight is not None:
            states = states * probe.hidden_weight.float()
        return F.normalize(states, dim=-1)

    def __call__(self, tokens: TokenGroup, probe: AttentionProbe, num_sources: int) -> FilterResult:
        b, n = tokens.batch_size, tokens.num_tokens
        kept = n - num_sources
        if not self.image_pivots <= kept <= n:
            raise ValueError(f"DART keeps its {self.image_pivots} image pivots: cannot keep {kept} of {n} tokens")
        if self.text_pivots and probe.text_rows is None:
            raise ValueError("DART's text pivots are the text after the image: it runs inside the LLM")
        if probe.hidden is None:
            raise ValueError("DART compares hidden states, which this reduction point does not provide: it runs "
                             "inside the LLM")
        image_norms = self._key_norms(probe, probe.candidates)  # [B, N]
        states = self._normed(probe, gather_rows(probe.hidden, probe.candidates))  # [B, N, D]
        image = image_norms.argsort(dim=1, descending=True, stable=True)[:, :self.image_pivots]  # [B, P_image]
        pivots = gather_rows(states, image)  # [B, P_image, D]
        num_pivots = torch.full((b,), self.image_pivots, device=states.device)
        if self.text_pivots:
            # prompts differ in how much text follows the image, so in their number of text pivots
            text_norms = self._key_norms(probe, probe.text_rows).masked_fill(~probe.text_valid, float("-inf"))
            top = min(self.text_pivots, text_norms.shape[1])
            text = probe.text_rows.gather(1, text_norms.topk(top, dim=1).indices)  # [B, P_text], by norm
            pivots = torch.cat([pivots, self._normed(probe, gather_rows(probe.hidden, text))], dim=1)
            num_pivots = num_pivots + probe.text_valid.sum(dim=1).clamp(max=self.text_pivots)
        # pivot p of a sample claims share + (p < extra) tokens; a missing text pivot claims none
        share, extra = (kept - self.image_pivots) // num_pivots, (kept - self.image_pivots) % num_pivots
        index = torch.arange(pivots.shape[1], device=states.device)
        claims = torch.where(index < num_pivots[:, None], share[:, None] + (index < extra[:, None]), 0)  # [B, P]
        most = claims.max(dim=0).values.tolist()  # one host sync: each pivot's largest claim in the batch
        taken = torch.zeros(b, n, dtype=torch.bool, device=states.device).scatter_(1, image, True)
        similarity = torch.bmm(states, pivots.transpose(1, 2))  # [B, N, P]
        for p, k in enumerate(most):  # in turn: each pivot claims among the tokens not yet kept
            if k:
                ranked = (-similarity[:, :, p]).masked_fill(taken, float("-inf")).topk(k, dim=1).indices  # [B, k]
                claimed = torch.arange(k, device=states.device) < claims[:, p:p + 1]  # this sample's claim
                taken |= torch.zeros_like(taken).scatter_(1, ranked, claimed)
        targets = first_k_true(taken, kept)
        return FilterResult(sources=complement(targets, n), targets=targets, scores=-image_norms)
