"""ToMe, EViT, FastV and random dropping recast as filter/correlate/compress compositions (docs/spec.md §7)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from ..stages import (
    AddMeanCompress,
    ArgmaxSimilarityCorrelate,
    BipartiteSimilarityFilter,
    CLSAttentionFilter,
    ConvergentCorrelate,
    DominantContextualFilter,
    DuplicationFilter,
    DropCompress,
    FuseCompress,
    KeyNeighbourCorrelate,
    LastTokenAttentionFilter,
    NeighbourSupplementCompress,
    NoCorrelate,
    OutlierAttentionFilter,
    RandomFilter,
    SizeWeightedCompress,
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


def oracle(retain: int | None = 192, *, like: Method | None = None, geometry=None) -> Method:
    """The speed oracle: the same schedule as ``like`` (default: all removals at the encoder layer
    the LLM reads, so the LLM simply gets ``retain`` visual tokens), but no scoring, correlation
    or merging: the last tokens are truncated. Needs ``geometry`` (a ``ModelGeometry``) to copy a
    method's resolved schedule."""
    trivial = TokenReduction(TruncateFilter(), NoCorrelate(), DropCompress())
    if like is None:
        return Method("oracle", vision=VisionReduction(trivial, retain, -1, -1), description="truncation oracle")
    if geometry is None:
        raise ValueError("oracle(like=...) needs the model geometry to copy the schedule")
    plan = like.plan(geometry)
    vision = VisionReduction(trivial, schedule=plan.vision) if plan.vision else None
    language = LanguageReduction(trivial, schedule=plan.language) if plan.language else None
    return Method(f"oracle[{like.name}]", vision=vision, language=language, description="truncation oracle")


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
    ``retain`` tokens are contextual (the official 10 of 64)."""
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
