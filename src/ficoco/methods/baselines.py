"""ToMe, EViT, FastV and random dropping recast as filter/correlate/compress compositions (docs/spec.md §7)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Literal

from ..stages import (
    AddMeanCompress,
    ArgmaxSimilarityCorrelate,
    BipartiteSimilarityFilter,
    CLSAttentionFilter,
    ConvergentCorrelate,
    DominantContextualFilter,
    DuplicationFilter,
    AveragingCompress,
    DropCompress,
    FuseCompress,
    KeyNeighbourCorrelate,
    LastTokenAttentionFilter,
    NearestReceiverCorrelate,
    NeighbourSupplementCompress,
    NoCorrelate,
    OutlierAttentionFilter,
    RandomFilter,
    RaterAttentionFilter,
    SizeWeightedCompress,
    TextRaters,
    TokenReduction,
    TruncateFilter,
)
from .base import LanguageReduction, Method, VisionReduction


def tome(
    retain: int | None = 192,
    *,
    schedule: Mapping[int, int] | None = None,
    start_layer: int = 12,
    end_layer: int | None = None,
    proportional_attention: bool = True,
    alternation: Literal["patches", "official"] = "patches",
) -> Method:
    """ToMe: bipartite soft matching in the encoder (K = 1), size-weighted merging, proportional
    attention on by default as in ToMe. Same default layers as FiCoCo-V for like-for-like budgets.

    ``alternation="official"`` splits A/B and orders the survivors as ToMe's official code does
    (see :class:`~ficoco.stages.BipartiteSimilarityFilter`, docs/methods.md); LLaVA only."""
    reduction = TokenReduction(BipartiteSimilarityFilter(alternation=alternation), ArgmaxSimilarityCorrelate(),
                               SizeWeightedCompress())
    vision = VisionReduction(reduction, None if schedule is not None else retain, start_layer, end_layer, schedule,
                             proportional_attention=proportional_attention)
    return Method("tome", vision=vision, description="ToMe: bipartite merging of the most similar tokens in the encoder")


def evit(
    retain: int | None = 192,
    *,
    schedule: Mapping[int, int] | None = None,
    start_layer: int = 12,
    end_layer: int | None = None,
    fused: Literal["average", "sum"] = "average",
) -> Method:
    """EViT: keep the tokens [CLS] attends to most; fuse the rest into one token (counted in ``retain``).

    ``fused="sum"`` builds that token as EViT's official code does, the unnormalised
    attention-weighted sum (see :class:`~ficoco.stages.FuseCompress`, docs/methods.md)."""
    reduction = TokenReduction(CLSAttentionFilter(), ConvergentCorrelate(), FuseCompress(fused=fused))
    vision = VisionReduction(reduction, None if schedule is not None else retain, start_layer, end_layer, schedule)
    return Method("evit", vision=vision, description="EViT: keep [CLS]-attentive tokens, fuse the rest into one")


def fastv(retain: int | None = 192, *, k: int = 2, schedule: Mapping[int, int] | None = None) -> Method:
    """FastV: after layer ``k - 1`` (0-based), drop the visual tokens the last token attends to
    least; layers ``k`` and later see ``retain`` visual tokens with their original positions."""
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"FastV's k must be an integer >= 1, got {k!r}")
    reduction = TokenReduction(LastTokenAttentionFilter(), NoCorrelate(), DropCompress())
    language = LanguageReduction(reduction, None if schedule is not None else retain, k - 1, k - 1, schedule)
    return Method("fastv", language=language, description="FastV: prune by last-token attention after LLM layer K-1")


def random_drop(
    retain: int | None = 192,
    *,
    side: Literal["vision", "language"] = "vision",
    seed: int = 0,
    layer: int | None = None,
    schedule: Mapping[int, int] | None = None,
) -> Method:
    """A floor: drop visual tokens at random, once, at ``layer`` (default: the encoder layer the
    LLM reads, so the LLM simply sees a random subset; or LLM layer 1 with ``side='language'``)."""
    reduction = TokenReduction(RandomFilter(seed=seed), NoCorrelate(), DropCompress())
    retain = None if schedule is not None else retain
    if side == "vision":
        layer = -1 if layer is None else layer
        return Method("random", vision=VisionReduction(reduction, retain, layer, layer, schedule),
                      description="random dropping (a floor)")
    if side == "language":
        layer = 1 if layer is None else layer
        return Method("random", language=LanguageReduction(reduction, retain, layer, layer, schedule),
                      description="random dropping (a floor)")
    raise ValueError(f"side must be 'vision' or 'language', got {side!r}")


def oracle(retain: int | None = 192, *, like: Method | None = None) -> Method:
    """The speed oracle: the same schedule as ``like`` (default: all removals at the encoder layer
    the LLM reads, so the LLM simply gets ``retain`` visual tokens), but no scoring, correlation
    or merging: the last tokens are truncated.

    ``like``'s budgets, layers and split are kept and only its stages are swapped, so every family
    resolves the oracle's schedule exactly as it resolves the method's (per crop, per frame, per
    image size), rather than copying one geometry's resolved counts."""
    trivial = TokenReduction(TruncateFilter(), NoCorrelate(), DropCompress())
    if like is None:
        return Method("oracle", vision=VisionReduction(trivial, retain, -1, -1), description="truncation oracle")
    if any(r is not None and r.adaptive for r in (like.vision, like.language)):
        raise ValueError(f"{like.name} decides its count per image at run time: there is no fixed schedule to copy")
    vision = replace(like.vision, reduction=trivial, proportional_attention=False) if like.vision else None
    language = replace(like.language, reduction=trivial, raters=None) if like.language else None
    # an LLM-input method's floor truncates the projected tokens: the projector still sees them all
    llm_input = replace(like.input, reduction=trivial) if like.input else None
    if vision is None and language is None and llm_input is None:
        raise ValueError(f"{like.name} reduces no tokens on a schedule (resolution or view reduction): it has no "
                         "truncation oracle")
    return Method(f"oracle[{like.name}]", vision=vision, language=language, input=llm_input,
                  vision_fraction=like.vision_fraction, description="truncation oracle")


def topk(retain: int | None = 192, *, layer: int = -1) -> Method:
    """[CLS]-attention top-k (the ``TopK`` baseline; FasterVLM's rule): at the encoder layer the LLM
    reads (``layer``), keep the ``retain`` patches [CLS] attends to most (head-averaged softmax row)
    and drop the rest, in one step. Without [CLS] the attention each token receives stands in."""
    reduction = TokenReduction(CLSAttentionFilter(), NoCorrelate(), DropCompress())
    return Method("topk", vision=VisionReduction(reduction, retain, layer, layer),
                  description="TopK: keep the patches [CLS] attends to most at the feature layer")


def visionzip(retain: int | None = 64, *, contextual_share: float = 10 / 64, layer: int = -1) -> Method:
    """VisionZip: at the encoder layer the LLM reads, keep the *dominant* tokens [CLS] attends to
    most and merge the rest into a few *contextual* tokens (strided picks among them, each other
    token going to the one whose head-averaged key is most similar, added as a plain mean), on the
    layer's output as the official code does (``reduce_at="output"``). ``contextual_share`` of the
    ``retain`` tokens are contextual (the official 10 of 64). Without [CLS] (Qwen-VL: the last
    block's output, merge groups as tokens) the attention each token receives ranks them."""
    reduction = TokenReduction(DominantContextualFilter(contextual_share), ArgmaxSimilarityCorrelate(),
                               AddMeanCompress())
    return Method("visionzip", vision=VisionReduction(reduction, retain, layer, layer, reduce_at="output"),
                  description="VisionZip: dominant tokens by [CLS] attention + merged contextual tokens")


def _prumerge(name: str, retain: int | float | None, spatial_samples: bool, *, layer: int, neighbours: int,
              iqr_multiplier: float, heads: str, score_with_next_layer: bool, order: str, description: str) -> Method:
    reduction = TokenReduction(
        OutlierAttentionFilter(iqr_multiplier, spatial_samples, adaptive=retain is None, heads=heads, order=order),
        KeyNeighbourCorrelate(neighbours, heads=heads), NeighbourSupplementCompress())
    vision = VisionReduction(reduction, retain, layer, layer, reduce_at="output",
                             score_with_next_layer=score_with_next_layer)
    return Method(name, vision=vision, description=description)


def prumerge(
    retain: int | float | None = None,
    *,
    layer: int = -1,
    neighbours: int = 32,
    iqr_multiplier: float = 1.5,
    heads: Literal["fused", "mean"] = "fused",
    score_with_next_layer: bool = True,
    order: Literal["raster", "official"] = "raster",
) -> Method:
    """PruMerge (LLaVA-PruMerge): on the output of the encoder layer the LLM reads (``layer``),
    scored with the attention of the layer after it (``score_with_next_layer``; the official code
    reads layer 23's queries and keys of layer 22's output, its heads fused into one, ``heads``),
    keep the tokens whose [CLS] attention is an IQR outlier (:class:`~ficoco.stages.OutlierAttentionFilter`);
    each kept token adds its ``neighbours`` most key-similar tokens weighted by their attention,
    and the discarded ones become one extra token, their attention-weighted sum.

    ``retain=None`` (default): the official adaptive count, per image (images in a batch may keep
    different counts); a count or share: exactly that many tokens to the LLM, the extra token
    counted (the ``retain - 1`` most attended kept). ``order="official"``: kept tokens by descending
    attention, as the official code hands them on."""
    return _prumerge("prumerge", retain, False, layer=layer, neighbours=neighbours, iqr_multiplier=iqr_multiplier,
                     heads=heads, score_with_next_layer=score_with_next_layer, order=order,
                     description="PruMerge: IQR outliers of [CLS] attention, each merged with its key neighbours")


def prumerge_plus(
    retain: int | float | None = None,
    *,
    layer: int = -1,
    neighbours: int = 32,
    iqr_multiplier: float = 1.5,
    heads: Literal["fused", "mean"] = "fused",
    score_with_next_layer: bool = True,
    order: Literal["raster", "official"] = "raster",
) -> Method:
    """PruMerge+: PruMerge with tokens spread evenly over the image added to the outliers (the
    official stride with ``retain=None``; with a budget, the outliers filled up to ``retain - 1``
    by tokens evenly spaced among the others). Options as :func:`prumerge`."""
    return _prumerge("prumerge+", retain, True, layer=layer, neighbours=neighbours, iqr_multiplier=iqr_multiplier,
                     heads=heads, score_with_next_layer=score_with_next_layer, order=order,
                     description="PruMerge+: PruMerge's outliers plus spatially uniform tokens, merged with their "
                                 "key neighbours")


def dart(retain: int | None = 192, *, k: int = 2, image_pivots: int = 4, text_pivots: int = 4) -> Method:
    """DART: before LLM layer ``k`` (on layer ``k - 1``'s output), keep pivot tokens and the visual
    tokens least duplicated by them (:class:`~ficoco.stages.DuplicationFilter`); kept tokens keep
    their original positions, as in the official code."""
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"DART's k must be an integer >= 1, got {k!r}")
    reduction = TokenReduction(DuplicationFilter(image_pivots, text_pivots), NoCorrelate(), DropCompress())
    language = LanguageReduction(reduction, retain, k - 1, k - 1, reduce_at="output")
    return Method("dart", language=language, description="DART: pivots and the tokens they duplicate least, "
                                                          "before LLM layer K")


def pdrop(retain: int | None = 72, *, layers: tuple[int | float, ...] = (0.25, 0.5, 0.75)) -> Method:
    """PyramidDrop: before each LLM layer of ``layers``, drop the visual tokens the last prompt
    token attends to least, as that layer's queries and keys see them (computed from the previous
    layer's output); each stage keeps the same share, down to ``retain`` after the last one (the
    official 576 -> 288 -> 144 -> 72 is ``retain=72``). ``layers``: layer indices, or shares of the
    LLM's depth (the default: before layers 8 / 16 / 24 of a 32-layer LLM, the official ones; 7 /
    14 / 21 of Qwen2.5-VL-7B's 28)."""
    if not layers or len(set(layers)) != len(layers) or any(
            isinstance(x, bool) or not (isinstance(x, int) and x >= 1 or isinstance(x, float) and 0.0 < x < 1.0)
            for x in layers):
        raise ValueError(f"PyramidDrop's layers must be distinct layer indices >= 1 or shares of the depth in (0, 1), "
                         f"got {layers!r}")
    reduction = TokenReduction(LastTokenAttentionFilter(), NoCorrelate(), DropCompress())
    stages = tuple(x - 1 if isinstance(x, int) else x for x in layers)
    language = LanguageReduction(reduction, retain, reduce_at="output", stages=stages, score_with_next_layer=True)
    return Method("pdrop", language=language,
                  description="PyramidDrop: staged drops by the last token's attention before layers 8/16/24")


#: SparseVLM v1.5 (the ICML 2025 version): per budget, the visual tokens of a 576-token image kept
#: by score at each of its three stages (after LLM layers 2, 6, 15 of 32); the merged tokens of
#: the recycled ones come on top (``sparse_token_dict`` of ``score.py`` at Gumpest/SparseVLMs@b9619e61)
SPARSEVLM_COUNTS: Mapping[int, tuple[int, ...]] = MappingProxyType(
    {192: (300, 200, 110), 128: (303, 110, 36), 64: (66, 30, 17)})
#: SparseVLM v1's rank rule per budget, ``(scale, bias)``: keep ``min(int(rank * scale + bias), N - 1)``
#: (its README and eval scripts at Gumpest/SparseVLMs@b72c5d62)
SPARSEVLM_RANK_RULE: Mapping[int, tuple[float, float]] = MappingProxyType(
    {192: (13.5, 0.0), 128: (9.0, 6.0), 64: (0.8, 0.0)})
#: the visual tokens of one LLaVA-1.5 image, which the tables count
SPARSEVLM_TOKENS = 576


@dataclass(frozen=True)
class SparseVLMCounts:
    """SparseVLM's schedule (``LanguageReduction.stage_counts``): the visual tokens left after each
    stage, for a budget.

    A budget of the table on a 576-token image keeps the table's counts by score. Any other budget
    (or image size) interpolates: each stage's share of the tokens (count / 576) runs linearly in
    the budget's share (``retain / tokens``) between the neighbouring budgets of the table, and
    from share 0 (nothing kept) below the smallest up to share 1 (everything kept) above the
    largest; it is rounded to the image's tokens. A stage keeps at most what it gets; the merged
    tokens of its recycled ones (``filter.survivors``) come on top. Under the rank rule the counts
    are known only when a layer runs: the plan then counts one token per stage (nominal).

    Attributes:
        table: ``((budget, counts kept by score per stage), ...)``, budgets of 576 tokens.
        filter: the filter whose recycling arithmetic turns kept counts into survivors.
    """

    table: tuple[tuple[int, tuple[int, ...]], ...]
    filter: RaterAttentionFilter

    def kept_by_score(self, available: int, keep: int, stages: int) -> list[int]:
        """Tokens kept by score at each of ``stages`` stages of ``available`` for budget ``keep``."""
        table = dict(self.table)
        if available == SPARSEVLM_TOKENS and keep in table:
            return list(table[keep])
        anchors = {0.0: (0.0,) * stages, 1.0: (1.0,) * stages}
        anchors.update({budget / SPARSEVLM_TOKENS: tuple(c / SPARSEVLM_TOKENS for c in counts)
                        for budget, counts in table.items()})
        points = sorted(anchors.items())
        share = keep / available
        for (low, low_counts), (high, high_counts) in zip(points, points[1:]):
            if low <= share <= high:
                t = (share - low) / (high - low)
                return [round((a + t * (b - a)) * available) for a, b in zip(low_counts, high_counts)]
        # a table budget above 576 tokens: beyond it every stage keeps its largest share
        return [round(min(1.0, s) * available) for s in points[-1][1]]

    def __call__(self, available: int, keep: int, stages: int) -> list[int]:
        if self.filter.rank_adaptive:
            return [max(1, available - stage) for stage in range(1, stages + 1)]
        left, counts = available, []
        least = 0 if self.filter.recycle else 1  # recycling always leaves a merged token
        for kept in self.kept_by_score(available, keep, stages):
            kept = max(least, min(kept, left))
            left = self.filter.survivors(left, kept)
            counts.append(left)
        return counts


def _check_sparsevlm_counts(counts: Mapping[int, Sequence[int]], stages: int) -> tuple:
    table = []
    for budget, kept in counts.items():
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1 or isinstance(kept, (str, bytes)) \
                or len(kept) != stages or any(isinstance(k, bool) or not isinstance(k, int) or k < 0 for k in kept):
            raise ValueError(f"SparseVLM's counts map each budget (a positive integer) to one non-negative count per "
                             f"stage ({stages} stages); got {budget!r}: {kept!r}")
        table.append((budget, tuple(kept)))
    if not table:
        raise ValueError("SparseVLM's counts table is empty")
    return tuple(sorted(table))


def sparsevlm(
    retain: int | float = 192,
    *,
    layers: tuple[int | float, ...] = (3 / 32, 7 / 32, 16 / 32),
    counts: Mapping[int, Sequence[int]] | None = None,
    recycle: bool = True,
    recycle_ratio: float = 0.3,
    cluster_ratio: float = 0.1,
    rank_adaptive: bool = False,
    scale: float | None = None,
    bias: float | None = None,
) -> Method:
    """SparseVLM (ICML 2025): text raters (the text after the image most related to it, chosen
    from the LLM's input embeddings) rate the visual tokens by their attention in the LLM layers of
    ``layers``; after each of those layers the most attended are kept and, with ``recycle``, the
    most attended ``recycle_ratio`` of the deleted ones merge into ``cluster_ratio`` as many
    density-peak clusters (each merged token in its centre's place); the rest are dropped.

    ``retain`` names SparseVLM's budget, the official settings 192 / 128 / 64 (an average over the
    LLM's layers in the paper's accounting, not the final count): each keeps the official v1.5
    counts by score per stage (``counts``, default :data:`SPARSEVLM_COUNTS`), other budgets
    interpolate (:class:`SparseVLMCounts`). ``layers``: the layers whose attention rates and after
    which tokens go, as indices or as shares of the depth (``f``: after layer ``round(f x depth) -
    1``; the default, the official 2 / 6 / 15 of 32, is 2 / 5 / 13 of Qwen2.5-VL-7B's 28).

    ``rank_adaptive=True`` is v1's rule: each sample keeps ``min(int(rank * scale + bias), N - 1)``
    by score (``rank`` of the raters' attention to the visual tokens), a count known only when the
    layer runs; ``scale`` / ``bias`` default to v1's for 192 / 128 / 64 (:data:`SPARSEVLM_RANK_RULE`).
    """
    if not layers or len(set(layers)) != len(layers) or any(
            isinstance(x, bool) or not (isinstance(x, int) and x >= 0 or isinstance(x, float) and 0.0 < x < 1.0)
            for x in layers):
        raise ValueError(f"SparseVLM's layers must be distinct layer indices >= 0 or shares of the depth in (0, 1), "
                         f"got {layers!r}")
    if rank_adaptive:
        if scale is None and bias is None:
            if retain not in SPARSEVLM_RANK_RULE:
                raise ValueError(f"SparseVLM's rank rule has official scale and bias for budgets "
                                 f"{sorted(SPARSEVLM_RANK_RULE)}; give scale= and bias= for retain={retain!r}")
            scale, bias = SPARSEVLM_RANK_RULE[retain]
        elif scale is None or bias is None:
            raise ValueError("give both of SparseVLM's scale= and bias= (the rank rule), or neither")
    elif scale is not None or bias is not None:
        raise ValueError("scale= and bias= set SparseVLM's rank rule: give rank_adaptive=True too")
    rule = {} if scale is None else {"scale": scale, "bias": bias}
    rater_filter = RaterAttentionFilter(recycle=recycle, recycle_ratio=recycle_ratio, cluster_ratio=cluster_ratio,
                                        rank_adaptive=rank_adaptive, **rule)
    table = SPARSEVLM_COUNTS if counts is None else counts
    # the rank rule leaves the table unused: any number of layers (v1 prunes after 2, 6, 15, 19)
    table = tuple(sorted(table.items())) if rank_adaptive and counts is None else \
        _check_sparsevlm_counts(table, len(layers))
    reduction = TokenReduction(rater_filter, NearestReceiverCorrelate(), AveragingCompress()) if recycle else \
        TokenReduction(rater_filter, NoCorrelate(), DropCompress())
    language = LanguageReduction(reduction, retain, reduce_at="output", stages=tuple(layers),
                                 stage_counts=SparseVLMCounts(table, rater_filter), raters=TextRaters())
    return Method("sparsevlm", language=language,
                  description="SparseVLM: visual tokens rated by the attention of text raters, deleted ones "
                              "recycled into clusters, after LLM layers 2/6/15")
