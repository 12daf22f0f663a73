"""Text-guided sparsification with recycling: SparseVLM (Zhang et al., ICML 2025, arXiv 2410.04417).

- :class:`TextRaters`: the text tokens that rate the visual tokens (the paper's §3.2.2), chosen once
  per prompt from the LLM's input embeddings;
- :class:`RaterAttentionFilter`: keep the visual tokens the raters attend to most; of the deleted
  ones, the most attended share is *recycled*: clustered by density peaks (:func:`density_peaks`,
  DPC-kNN as TCFormer clusters), each cluster's centre staying as a target that its cluster merges
  into (§3.3);
- :class:`NearestReceiverCorrelate`: every recycled token goes to its nearest centre.

With :class:`~ficoco.stages.AveragingCompress` each centre becomes the plain mean of its cluster,
itself included: the merged token of the official code. The official code appends merged tokens
after the kept visual tokens; here each one takes its centre's place (and position id), so kept
tokens keep their order and positions (docs/methods.md lists every departure).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .correlates import Correlate
from .filters import Filter
from .probe import AttentionProbe
from .tokens import Correlation, FilterResult, TokenGroup, complement, first_k_true, gather_rows


@dataclass
class TextRaters:
    """SparseVLM's text raters: of the text that follows the image, the tokens most related to it.

    With ``v_i`` the LLM input embedding of visual token ``i`` and ``t_m`` that of text token ``m``
    (every token after the last visual token), ``p_im = softmax_m(v_i . t_m)`` (plain dot products,
    softmax over the text); the relevance of ``m`` is ``mean_i p_im`` and the raters are the text
    tokens whose relevance exceeds the mean relevance (strictly), as the official code selects them.

    When every text token is equally relevant (one text token, say), all of them rate (the
    official code would average over no rows). A prompt with no text after its image has no
    rater here; the probe then rates by its last token (:attr:`AttentionProbe.rater_attention_rows`).
    """

    def __call__(self, embeds: Tensor, is_visual: Tensor, is_text: Tensor) -> Tensor:
        """Raters of each prompt.

        Args:
            embeds: ``[B, L, D]`` the LLM's input embeddings (visual tokens already in place).
            is_visual / is_text: ``[B, L]`` bool: visual tokens, and the (real) text after the
                last visual token.
        Returns:
            ``[B, L]`` bool, true at the raters.
        """
        b, l, _ = embeds.shape
        n, m = torch.stack([is_visual.sum(dim=1).amax(), is_text.sum(dim=1).amax()]).tolist()  # one host sync
        visual, text = first_k_true(is_visual, n), first_k_true(is_text, m)
        visual_valid, text_valid = is_visual.gather(1, visual), is_text.gather(1, text)
        # float32: half-precision dot products of raw embeddings would round the softmax's inputs
        logits = gather_rows(embeds, visual).float() @ gather_rows(embeds, text).float().transpose(1, 2)  # [B, N, M]
        logits = logits.masked_fill(~text_valid[:, None, :], float("-inf"))
        p = torch.softmax(logits, dim=-1).nan_to_num_(0.0) * visual_valid[:, :, None]
        relevance = p.sum(dim=1) / visual_valid.sum(dim=1, keepdim=True).clamp_min(1)  # [B, M]
        mean = (relevance * text_valid).sum(dim=1, keepdim=True) / text_valid.sum(dim=1, keepdim=True).clamp_min(1)
        chosen = (relevance > mean) & text_valid
        chosen = torch.where(chosen.any(dim=1, keepdim=True), chosen, text_valid)  # all equal: every text token
        return torch.zeros(b, l, dtype=torch.bool, device=embeds.device).scatter_(1, text, chosen) & is_text


def density_peaks(x: Tensor, centres: int) -> Tensor:
    """DPC-kNN cluster centres (TCFormer's clustering, which SparseVLM recycles with).

    With ``d_ij = ||x_i - x_j|| / sqrt(D)``: the density of ``i`` is ``exp(-mean of d_ij^2 over
    its k nearest tokens)`` with ``k = centres`` (itself included, as the official code counts
    it); ``delta_i`` is the distance to the nearest denser token (for the densest, the largest
    distance of all); the centres are the ``centres`` largest ``delta_i * density_i``. The
    official code breaks ties in density with unseeded noise of 1e-6; here a token with the same
    density and a lower index counts as denser, so the result is deterministic.

    Args:
        x: ``[B, n, D]`` the tokens to cluster.
        centres: how many centres (at most ``n``).
    Returns:
        ``[B, centres]`` indices into ``n``, by descending score.
    """
    n, width = x.shape[1], x.shape[2]
    # the exact pairwise norm, not the matrix-product expansion, whose cancellation could reorder
    # near-equal distances
    dist = torch.cdist(x.float(), x.float(), compute_mode="donot_use_mm_for_euclid_dist") / math.sqrt(width)
    nearest = dist.topk(centres, dim=-1, largest=False).values  # [B, n, k]
    density = (-(nearest ** 2).mean(dim=-1)).exp()  # [B, n]
    index = torch.arange(n, device=x.device)
    denser = (density[:, None, :] > density[:, :, None]) | (
        (density[:, None, :] == density[:, :, None]) & (index[None, :] < index[:, None]))  # [B, i, j]: j denser than i
    farthest = dist.flatten(1).amax(dim=1)[:, None, None]
    delta = torch.where(denser, dist, farthest).amin(dim=-1)
    score = delta * density
    return score.argsort(dim=1, descending=True, stable=True)[:, :centres]


@dataclass
class RaterAttentionFilter(Filter):
    """SparseVLM's filter: the relevance of a visual token is the attention the text raters pay
    it (head-averaged, softmax over all keys, averaged over the raters:
    :attr:`AttentionProbe.rater_attention`); the ``k`` most relevant are kept.

    With ``recycle``, of the ``r = N - k`` deleted tokens the ``int(r * recycle_ratio) + 1`` most
    relevant are recycled into ``int(recycled * cluster_ratio) + 1`` clusters
    (:func:`density_peaks` on the tokens' hidden states); the clusters' centres are kept too, as
    the only receivers, and the other recycled tokens are the sources that pass their
    information on (``FilterResult.passing``); every other deleted token is dropped. A step asked
    to remove ``num_sources`` tokens therefore keeps ``k`` by score with ``k + clusters(N - k) =
    N - num_sources``; where two ``k`` give that count (the cluster count steps up by one), the
    larger ``k``.

    With ``rank_adaptive`` (SparseVLM v1) the step decides ``k`` per sample: with ``rho`` the rank
    of the raters' ``R x N`` attention matrix (float32, ``torch.linalg.matrix_rank``'s default
    tolerance), ``k = min(int(rho * scale + bias), N - 1)`` when ``rho < N``, else nothing is
    removed; at least one token is kept when nothing is recycled.

    Attributes:
        recycle: recycle deleted tokens into merged ones (the paper's §3.3); else they are dropped.
        recycle_ratio: share of the deleted tokens recycled (official 0.3, "top 30%").
        cluster_ratio: clusters per recycled token (official 0.1).
        rank_adaptive: SparseVLM v1's rank rule for ``k`` instead of the schedule's count.
        scale / bias: the rank rule's (official 13.5 / 0 for 192 tokens, 9 / 6 for 128, 0.8 / 0
            for 64).
    """

    recycle: bool = True
    recycle_ratio: float = 0.3
    cluster_ratio: float = 0.1
    rank_adaptive: bool = False
    scale: float = 13.5
    bias: float = 0.0

    def __post_init__(self) -> None:
        for name in ("recycle_ratio", "cluster_ratio"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"SparseVLM's {name} must lie in [0, 1], got {value!r}")
        for name in ("scale", "bias"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"SparseVLM's {name} must be a finite number, got {value!r}")
        if self.scale <= 0:
            raise ValueError(f"SparseVLM's scale must be positive, got {self.scale}")

    # -- counts (host integers, as the official code computes them) --------------------------------

    def recycled(self, deleted: int) -> tuple[int, int]:
        """``(recycled, clusters)`` for ``deleted`` tokens: ``int(deleted * recycle_ratio) + 1``
        recycled into ``int(recycled * cluster_ratio) + 1`` clusters (none without recycling)."""
        if not self.recycle or deleted <= 0:
            return 0, 0
        recycled = min(deleted, int(deleted * self.recycle_ratio) + 1)
        return recycled, min(recycled, int(recycled * self.cluster_ratio) + 1)

    def survivors(self, available: int, kept: int) -> int:
        """Visual tokens after a step that keeps ``kept`` of ``available`` by score: the kept
        ones and the merged tokens of the recycled."""
        return kept + self.recycled(available - kept)[1]

    def kept_for(self, available: int, removed: int) -> int:
        """Tokens kept by score when a step removes ``removed`` of ``available`` in all (the
        largest ``k`` with ``available - survivors(available, k) == removed``)."""
        for deleted in range(removed, available + 1):
            if deleted - self.recycled(deleted)[1] == removed:
                return available - deleted
        raise ValueError(f"SparseVLM cannot remove {removed} of {available} tokens: recycling keeps at least "
                         f"{self.recycled(available)[1]} merged tokens")

    # -- the rank rule -----------------------------------------------------------------------------

    @property
    def decides_removals(self) -> bool:
        return self.rank_adaptive

    def _rank_kept(self, probe: AttentionProbe) -> list[int]:
        """Per sample, the tokens kept by score under the rank rule (one host sync)."""
        rows = probe.rater_attention_rows  # [B, R, N], padding rows zero (they add no rank)
        n = rows.shape[2]
        raters = probe.rater_count
        sv = torch.linalg.svdvals(rows.float())  # [B, min(R, N)], descending
        # matrix_rank's default tolerance for each sample's own R_b x N matrix: eps * max(R_b, N) * sigma_max
        tolerance = sv[:, :1] * torch.finfo(torch.float32).eps * raters.clamp_min(n)[:, None].to(sv.device)
        ranks = (sv > tolerance).sum(dim=1).tolist()
        least = 0 if self.recycle else 1  # without recycling a sample keeps at least one visual token
        return [n if rank >= n else max(least, min(int(rank * self.scale + self.bias), n - 1)) for rank in ranks]

    def removals(self, tokens: TokenGroup, probe: AttentionProbe) -> list[int]:
        """Per sample, the tokens the rank rule removes (kept by score minus the merged tokens)."""
        if not self.rank_adaptive:
            return super().removals(tokens, probe)
        n = tokens.num_tokens
        return [n - self.survivors(n, kept) for kept in self._rank_kept(probe)]

    # -- the split ---------------------------------------------------------------------------------

    def scores(self, tokens: TokenGroup, probe: AttentionProbe) -> Tensor:
        """``[B, N]``: minus the raters' attention."""
        return -probe.rater_attention

    def __call__(self, tokens: TokenGroup, probe: AttentionProbe, num_sources: int) -> FilterResult:
        b, n = tokens.batch_size, tokens.num_tokens
        relevance = probe.rater_attention  # [B, N]
        if self.rank_adaptive:
            kept = self._rank_kept(probe)
            if any(n - self.survivors(n, k) != num_sources for k in kept):
                raise RuntimeError(f"SparseVLM's rank rule asks these samples to remove "
                                   f"{[n - self.survivors(n, k) for k in kept]} tokens, the step {num_sources}: "
                                   f"samples must be grouped by Filter.removals first")
        else:
            kept = [self.kept_for(n, num_sources)] * b
        order = relevance.argsort(dim=1, descending=True, stable=True)  # most relevant first, ties by index
        rows_of: dict[int, list[int]] = {}
        for row, k in enumerate(kept):
            rows_of.setdefault(k, []).append(row)
        if len(rows_of) == 1:  # every sample alike (always, but for the rank rule)
            return self._split(tokens.features, relevance, order, kept[0])
        # the rank rule may keep different counts by score that leave the same count in all
        out: dict[str, Tensor | None] = {}
        for k, rows in rows_of.items():
            index = torch.tensor(rows, device=order.device)
            part = self._split(tokens.features[index], relevance[index], order[index], k)
            for name in ("sources", "targets", "receivers", "passing"):
                value = getattr(part, name)
                if value is not None:
                    if name not in out:
                        out[name] = value.new_empty((b, *value.shape[1:]))
                    out[name][index] = value
        return FilterResult(out["sources"], out["targets"], -relevance, out.get("receivers"), out.get("passing"))

    def _split(self, features: Tensor, relevance: Tensor, order: Tensor, kept: int) -> FilterResult:
        """The split of samples that keep ``kept`` by score: ``features`` ``[G, N, D]``,
        ``relevance`` and ``order`` (candidates by descending relevance) ``[G, N]``."""
        g, n = order.shape
        top, deleted = order[:, :kept], order[:, kept:]  # the deleted ones most relevant first
        recycled, clusters = self.recycled(n - kept)
        if not clusters:  # nothing recycled: a plain top-k
            targets = top.sort(dim=1).values
            return FilterResult(complement(targets, n), targets, -relevance)
        pool = deleted[:, :recycled]  # [G, recycled]
        centres = pool.gather(1, density_peaks(gather_rows(features, pool), clusters))
        targets = torch.cat([top, centres], dim=1).sort(dim=1).values
        sources = complement(targets, n)
        is_centre = torch.zeros(g, n, dtype=torch.bool, device=order.device).scatter_(1, centres, True)
        is_recycled = torch.zeros(g, n, dtype=torch.bool, device=order.device).scatter_(1, pool, True)
        return FilterResult(sources, targets, -relevance, is_centre.gather(1, targets), is_recycled.gather(1, sources))


@dataclass
class NearestReceiverCorrelate(Correlate):
    """Each source that passes its information on (``FilterResult.passing``; all of them when it
    is ``None``) goes to the receiver nearest to it by the Euclidean distance of their features,
    weight 1: DPC-kNN's assignment of a token to its nearest cluster centre. Ties go to the lower
    target index (the official code's to the centre of higher score; exact ties do not occur in
    practice). Sources that pass nothing on get no target."""

    def __call__(self, tokens: TokenGroup, probe: AttentionProbe, split: FilterResult) -> Correlation:
        x = tokens.features.float()
        dist = torch.cdist(gather_rows(x, split.sources), gather_rows(x, split.targets),
                           compute_mode="donot_use_mm_for_euclid_dist")  # [B, r, T]
        if split.receivers is not None:
            dist = dist.masked_fill(~split.receivers[:, None, :], float("inf"))
        weights = torch.zeros_like(dist).scatter_(-1, dist.argmin(dim=-1, keepdim=True), 1.0)
        if split.passing is not None:
            weights = weights * split.passing[:, :, None]
        return Correlation(weights)
