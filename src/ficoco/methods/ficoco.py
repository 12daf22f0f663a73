"""FiCoCo-V, FiCoCo-L and FiCoCo-VL (docs/spec.md §3–§5) as compositions of the three stages."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Literal

from ..stages import (
    AttentionQuantileCorrelate,
    AveragingCompress,
    DropCompress,
    FiCoCoLanguageFilter,
    FiCoCoVisionFilter,
    NoCorrelate,
    SelfPreservingCompress,
    TextMediatedQuantileCorrelate,
    TokenReduction,
)
from .base import LanguageReduction, Method, VisionReduction, check_retain_value


def _compressor(compress: str):
    if compress == "self_preserving":
        return SelfPreservingCompress()
    if compress == "average":
        return AveragingCompress()
    raise ValueError(f"compress must be 'self_preserving' or 'average', got {compress!r}")


def _with_targets(filter_, correlate: Callable[[int | None], object], compress: str,
                  fixed_k: int | None) -> TokenReduction:
    """``filter_`` followed by ``correlate(fixed_k)`` and ``compress``; ``fixed_k = 0`` is the
    paper's "fixed K = 0" ablation: no targets, the discarded tokens are dropped."""
    if fixed_k is not None and (not isinstance(fixed_k, int) or fixed_k < 0):
        raise ValueError(f"fixed_k must be None (token-adaptive targets) or an integer >= 0 (0: drop the discarded "
                         f"tokens), got {fixed_k!r}")
    if fixed_k == 0:
        return TokenReduction(filter_, NoCorrelate(), DropCompress())
    return TokenReduction(filter_, correlate(fixed_k), _compressor(compress))


def ficoco_v_reduction(
    *,
    lam: float = 0.35,
    eps: float = 0.998,
    fixed_k: int | None = None,
    vision_term: Literal["logits", "received"] = "logits",
    semantic_term: Literal["cls", "key_proxy"] = "cls",
    cls_term: Literal["softmax", "logits"] = "softmax",
    swap_weights: bool = False,
    local_penalty: bool = True,
    compress: str = "self_preserving",
    correlation_map: Literal["mean_softmax", "mean_logits_softmax"] = "mean_softmax",
) -> TokenReduction:
    """FiCoCo-V's filter (+ local penalty), token-adaptive attention correlate, self-preserving
    compress. ``fixed_k``: each discarded token goes to its ``fixed_k`` most correlated kept tokens
    instead of the ``eps`` quantile's (0: they are dropped), as in the paper's ablation.

    Options that reproduce FiCoCo's official code (docs/methods.md): ``swap_weights=True`` (its
    ``lam`` placement), ``cls_term="logits"`` (its [CLS] term: pre-softmax logits; see
    :class:`~ficoco.stages.FiCoCoVisionFilter`) and ``correlation_map="mean_logits_softmax"`` (its
    correlation: softmax of the head-averaged logits; see
    :class:`~ficoco.stages.AttentionQuantileCorrelate`)."""
    vision_filter = FiCoCoVisionFilter(lam=lam, vision_term=vision_term, semantic_term=semantic_term,
                                       cls_term=cls_term, swap_weights=swap_weights, local_penalty=local_penalty)
    # built here, not only when fixed_k leaves a correlate, so that a bad value fails whatever fixed_k is
    correlate = AttentionQuantileCorrelate(eps=eps, correlation_map=correlation_map)
    return _with_targets(vision_filter, lambda k: replace(correlate, fixed_k=k), compress, fixed_k)


def ficoco_l_reduction(
    *, beta: float = 0.6, gamma: float = 0.6, eps: float = 0.998, fixed_k: int | None = None,
    compress: str = "self_preserving",
) -> TokenReduction:
    """FiCoCo-L's filter (visual logits + text attention received), text-mediated correlate,
    self-preserving compress; ``fixed_k`` as in :func:`ficoco_v_reduction`."""
    return _with_targets(FiCoCoLanguageFilter(beta=beta),
                         lambda k: TextMediatedQuantileCorrelate(gamma=gamma, eps=eps, fixed_k=k), compress, fixed_k)


def ficoco_v(
    retain: int | None = 192,
    *,
    schedule: Mapping[int, int] | None = None,
    start_layer: int = 12,
    end_layer: int | None = None,
    proportional_attention: bool = False,
    **stage_options,
) -> Method:
    """FiCoCo-V: reduction in the vision encoder from layer 12 (0-based) on.

    ``stage_options`` go to :func:`ficoco_v_reduction` (``lam``, ``eps``, ``fixed_k``, ``vision_term``,
    ``semantic_term``, ``cls_term``, ``swap_weights``, ``local_penalty``, ``compress``,
    ``correlation_map``).
    """
    retain = None if schedule is not None else retain
    vision = VisionReduction(ficoco_v_reduction(**stage_options), retain, start_layer, end_layer, schedule,
                             proportional_attention=proportional_attention)
    return Method("ficoco-v", vision=vision, description="FiCoCo-V: filter/correlate/compress inside the vision encoder")


def ficoco_l(
    retain: int | None = 192,
    *,
    schedule: Mapping[int, int] | None = None,
    start_layer: int = 5,
    end_layer: int | None = None,
    **stage_options,
) -> Method:
    """FiCoCo-L: reduction in the LLM decoder from layer 5 (0-based) on, spread to ``end_layer``
    (default: the second-to-last layer). ``stage_options``: ``beta``, ``gamma``, ``eps``, ``fixed_k``,
    ``compress``."""
    retain = None if schedule is not None else retain
    language = LanguageReduction(ficoco_l_reduction(**stage_options), retain, start_layer, end_layer, schedule)
    return Method("ficoco-l", language=language, description="FiCoCo-L: filter/correlate/compress inside the LLM decoder")


def ficoco_vl(
    retain: int | float = 64,
    *,
    vision_retain: int | float | None = None,
    vision_fraction: float = 0.5,
    vision_start_layer: int = 12,
    language_start_layer: int = 5,
    language_end_layer: int | None = None,
    vision_options: Mapping | None = None,
    language_options: Mapping | None = None,
) -> Method:
    """FiCoCo-VL: FiCoCo-V in the encoder down to ``vision_retain`` tokens, then FiCoCo-L in the
    decoder down to ``retain``. Without ``vision_retain`` the encoder makes ``vision_fraction`` of
    the removals, resolved per image size when the method is attached (the paper does not publish
    its split)."""
    if not 0.0 <= vision_fraction <= 1.0:
        raise ValueError(f"vision_fraction must be in [0, 1], got {vision_fraction}")
    check_retain_value(retain)
    if vision_retain is not None:
        check_retain_value(vision_retain)
        if type(vision_retain) is type(retain) and vision_retain < retain:
            raise ValueError(f"vision_retain={vision_retain} is below the final retain={retain}")
    vision = VisionReduction(ficoco_v_reduction(**dict(vision_options or {})), vision_retain, vision_start_layer)
    language = LanguageReduction(ficoco_l_reduction(**dict(language_options or {})), retain, language_start_layer,
                                 language_end_layer)
    return Method("ficoco-vl", vision=vision, language=language,
                  description="FiCoCo-VL: FiCoCo-V in the encoder, then FiCoCo-L in the decoder",
                  vision_fraction=None if vision_retain is not None else vision_fraction)
