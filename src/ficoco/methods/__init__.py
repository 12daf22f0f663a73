"""Method registry: every method by name, each a short composition of the stages.

``get_method("ficoco-v", retain=128)`` builds a :class:`Method`; ``available_methods()`` lists
them with a one-line summary. Custom compositions are built directly from
:class:`VisionReduction` / :class:`LanguageReduction` and :class:`~ficoco.stages.TokenReduction`.
"""

from __future__ import annotations

from collections.abc import Callable
from types import MappingProxyType

from .base import InputReduction, LanguageReduction, Method, ModelGeometry, ResolvedPlan, VisionReduction
from .baselines import evit, fastv, random_drop, tome, topk, visionzip
from .input_pruning import cdpruner, divprune, pool, zero
from .ficoco import ficoco_l, ficoco_l_reduction, ficoco_v, ficoco_v_reduction, ficoco_vl

_REGISTRY: MappingProxyType[str, tuple[Callable[..., Method], str]] = MappingProxyType({
    "ficoco-v": (ficoco_v, "FiCoCo-V: local-penalty filter, token-adaptive correlate, self-preserving merge in the "
                           "vision encoder; without [CLS] (SigLIP, Qwen-VL) its [CLS] term is the mean-key stand-in"),
    "ficoco-l": (ficoco_l, "FiCoCo-L: text-aware filter and text-mediated correlate inside the LLM decoder"),
    "ficoco-vl": (ficoco_vl, "FiCoCo-VL: FiCoCo-V in the encoder followed by FiCoCo-L in the decoder (FiCoCo-V's "
                             "stand-in without [CLS])"),
    "tome": (tome, "ToMe: bipartite matching of similar keys, size-weighted merging (encoder)"),
    "evit": (evit, "EViT: keep tokens [CLS] attends to, fuse the rest into one token (encoder); without [CLS] "
                   "it ranks and weights tokens by the attention they receive"),
    "fastv": (fastv, "FastV: drop visual tokens the last token ignores, after LLM layer K-1"),
    "random": (random_drop, "random dropping, a floor for every other method"),
    "topk": (topk, "TopK: keep the patches [CLS] attends to most at the feature layer (encoder); without [CLS] "
                   "the attention they receive"),
    "visionzip": (visionzip, "VisionZip: dominant tokens by [CLS] attention + merged contextual tokens (encoder "
                             "output at the feature layer; LLaVA-1.5)"),
    "pool": (pool, "spatial average pooling of the projected visual tokens (LLM input)"),
    "divprune": (divprune, "DivPrune: max-min diverse subset of the projected visual tokens (LLM input)"),
    "cdpruner": (cdpruner, "CDPruner: DPP selection by diversity and relevance to the instruction (LLM input)"),
    "zero": (zero, "no visual tokens: the text-only floor (LLM input)"),
})


#: the paper's methods and baselines by where they reduce, in the order tables list them
#: (FiCoCo-VL, which reduces in both, with the decoder side)
ENCODER_METHODS = ("ficoco-v", "tome", "evit", "random")
#: methods that prune the projected tokens at the LLM input, and the encoder-side TopK
INPUT_METHODS = ("topk", "visionzip", "pool", "divprune", "cdpruner", "zero")
DECODER_METHODS = ("ficoco-l", "fastv", "ficoco-vl")


def available_methods() -> dict[str, str]:
    """``{name: one-line summary}`` of every registered method."""
    return {name: summary for name, (_, summary) in _REGISTRY.items()}


def takes_budget(name: str) -> bool:
    """Whether method ``name`` takes a ``retain`` budget (the ``zero`` control does not)."""
    import inspect

    try:
        factory, _ = _REGISTRY[name.lower()]
    except (KeyError, AttributeError):
        raise ValueError(f"unknown method {name!r}; available: {', '.join(_REGISTRY)}") from None
    return "retain" in inspect.signature(factory).parameters


def get_method(name: str, **options) -> Method:
    """Build the method ``name`` with ``options`` (e.g. ``retain=128``, ``schedule={12: 40}``)."""
    try:
        factory, _ = _REGISTRY[name.lower()]
    except (KeyError, AttributeError):
        raise ValueError(f"unknown method {name!r}; available: {', '.join(_REGISTRY)}") from None
    try:
        return factory(**options)
    except TypeError as err:  # an option the factory does not take
        raise ValueError(f"bad option for method {name!r}: {err}") from None


__all__ = [
    "DECODER_METHODS", "ENCODER_METHODS", "INPUT_METHODS", "InputReduction", "LanguageReduction", "Method", "ModelGeometry", "ResolvedPlan",
    "VisionReduction", "available_methods",
    "evit", "fastv", "ficoco_l", "ficoco_l_reduction", "ficoco_v", "ficoco_v_reduction", "ficoco_vl",
    "cdpruner", "divprune", "get_method", "pool", "random_drop", "takes_budget", "tome", "topk", "visionzip", "zero",
]
