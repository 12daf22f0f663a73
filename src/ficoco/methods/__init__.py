"""Method registry: every method by name, each a short composition of the stages.

``get_method("ficoco-v", retain=128)`` builds a :class:`Method`; ``available_methods()`` lists
them with a one-line summary. Custom compositions are built directly from
:class:`VisionReduction` / :class:`LanguageReduction` and :class:`~ficoco.stages.TokenReduction`.

A name may carry keyword options in brackets, so that one string (a command-line list, a table
row) can name a variant: ``get_method("ficoco-v[swap_weights=true,cls_term=logits]")`` is
``get_method("ficoco-v", swap_weights=True, cls_term="logits")``, and ``NAME[official]`` gives the
options with which the method computes what its official code computes (:data:`OFFICIAL_OPTIONS`,
docs/methods.md).
"""

from __future__ import annotations

import inspect

import re
from collections.abc import Callable
from dataclasses import replace
from types import MappingProxyType

from .base import (InputReduction, LanguageReduction, Method, ModelGeometry, ResolutionReduction, ResolvedPlan,
                   VisionReduction)
from .baselines import dart, evit, fastv, pdrop, prumerge, prumerge_plus, random_drop, sparsevlm, tome, topk, visionzip
from .input_pruning import cdpruner, divprune, pool, zero
from .resolution import downsample
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
                             "output at the feature layer); without [CLS] the attention they receive"),
    "prumerge": (prumerge, "PruMerge: IQR outliers of [CLS] attention (adaptive count, or a budget), each merged with "
                           "its 32 key neighbours, the rest summed into one token (encoder output; LLaVA-1.5)"),
    "prumerge+": (prumerge_plus, "PruMerge+: PruMerge's outliers plus spatially uniform tokens (adaptive count, or a "
                                 "budget) (encoder output; LLaVA-1.5)"),
    "dart": (dart, "DART: keep pivot tokens and the tokens they duplicate least, before LLM layer K (K = 2)"),
    "pdrop": (pdrop, "PyramidDrop: staged drops by the last token's attention before LLM layers 8/16/24, each stage "
                     "keeping the same share"),
    "sparsevlm": (sparsevlm, "SparseVLM: keep visual tokens the text raters attend to, recycle the most attended "
                             "deleted ones into cluster means, after LLM layers 2/6/15"),
    "pool": (pool, "spatial average pooling of the projected visual tokens (LLM input)"),
    "divprune": (divprune, "DivPrune: max-min diverse subset of the projected visual tokens (LLM input)"),
    "cdpruner": (cdpruner, "CDPruner: DPP selection by diversity and relevance to the instruction (LLM input)"),
    "zero": (zero, "no visual tokens: the text-only floor (LLM input)"),
    "downsample": (downsample, "the image at a lower resolution: the encoder runs on the patches of the budget's grid "
                               "(before the encoder)"),
})


#: the paper's methods and baselines by where they reduce, in the order tables list them
#: (FiCoCo-VL, which reduces in both, with the decoder side)
ENCODER_METHODS = ("ficoco-v", "tome", "evit", "random")
#: methods that prune the projected tokens at the LLM input, and the encoder-side TopK; the
#: ``downsample`` control (a smaller image, before the encoder) is listed with them
INPUT_METHODS = ("topk", "visionzip", "prumerge", "prumerge+", "pool", "divprune", "cdpruner", "zero", "downsample")
DECODER_METHODS = ("ficoco-l", "fastv", "ficoco-vl")
#: the later decoder-side baselines (not in the paper's tables)
LATER_DECODER_METHODS = ("dart", "pdrop", "sparsevlm")


#: ``NAME[official]``: the options with which a method computes what its official code computes
#: where ficoco's default departs from it (docs/methods.md has the sources and commits). FastV has
#: none: its default is the official KV-cache mode.
OFFICIAL_OPTIONS: MappingProxyType[str, MappingProxyType[str, object]] = MappingProxyType({
    "ficoco-v": MappingProxyType({"swap_weights": True, "cls_term": "logits",
                                  "correlation_map": "mean_logits_softmax"}),
    "tome": MappingProxyType({"alternation": "official"}),
    "evit": MappingProxyType({"fused": "sum"}),
    "prumerge": MappingProxyType({"order": "official"}),
    "prumerge+": MappingProxyType({"order": "official"}),
})

_SPEC = re.compile(r"^\s*([^\[\]]+?)\s*(?:\[([^\[\]]*)\])?\s*$")


def available_methods() -> dict[str, str]:
    """``{name: one-line summary}`` of every registered method."""
    return {name: summary for name, (_, summary) in _REGISTRY.items()}


def parse_option_value(text: str) -> object:
    """An option value written as text: ``true``/``false``, ``none``, an int, a float, else the text."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "none":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            continue
    return text.strip()


def parse_method_spec(spec: str) -> tuple[str, dict]:
    """``"NAME"``, ``"NAME[KEY=VALUE,...]"`` or ``"NAME[official]"`` → ``(NAME, options)``; values
    as :func:`parse_option_value` reads them, ``official`` expanded from :data:`OFFICIAL_OPTIONS`
    (and combinable: ``tome[official,proportional_attention=false]``)."""
    match = _SPEC.match(spec) if isinstance(spec, str) else None
    if match is None:
        raise ValueError(f"bad method {spec!r}: expected NAME or NAME[KEY=VALUE,...] or NAME[official]")
    name, inside = match.group(1).lower(), match.group(2)
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(_REGISTRY)}")
    options: dict = {}
    for item in [] if inside is None else [part.strip() for part in inside.split(",")]:
        key, eq, text = item.partition("=")
        key = key.strip()
        if not eq and key == "official":
            if name not in OFFICIAL_OPTIONS:
                raise ValueError(f"method {name!r} has no official-code options; {', '.join(OFFICIAL_OPTIONS)} have")
            new = dict(OFFICIAL_OPTIONS[name])
        elif eq and key.isidentifier():
            new = {key: parse_option_value(text)}
        else:
            raise ValueError(f"bad option {item!r} in method {spec!r}: expected KEY=VALUE or official")
        twice = set(new) & set(options)
        if twice:
            raise ValueError(f"method {spec!r} sets {', '.join(sorted(twice))} twice")
        options.update(new)
    return name, options


def split_methods(text: str) -> list[str]:
    """A comma-separated list of methods, commas inside brackets kept:
    ``"ficoco-v,ficoco-v[lam=0.5,swap_weights=true]"`` → two methods."""
    parts, depth, current = [], 0, []
    for char in text:
        depth += char == "["
        depth -= char == "]"
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return [part.strip() for part in parts if part.strip()]


def takes_budget(name: str) -> bool:
    """Whether method ``name`` (options in brackets allowed) takes a ``retain`` budget (the ``zero``
    control does not)."""
    base, _ = parse_method_spec(name)
    return "retain" in inspect.signature(_REGISTRY[base][0]).parameters


def get_method(name: str, **options) -> Method:
    """Build the method ``name`` with ``options`` (e.g. ``retain=128``, ``schedule={12: 40}``).

    ``name`` may carry options in brackets (:func:`parse_method_spec`); the method is then named
    by the whole string, so that tables and traces tell the variants apart."""
    base, inline = parse_method_spec(name)
    factory, _ = _REGISTRY[base]
    twice = set(inline) & set(options)
    if twice:
        raise ValueError(f"method {name!r} sets {', '.join(sorted(twice))} in brackets and as a keyword")
    try:
        method = factory(**inline, **options)
    except TypeError as err:  # an option the factory does not take
        raise ValueError(f"bad option for method {base!r}: {err}") from None
    return replace(method, name=name.strip()) if inline else method


__all__ = [
    "DECODER_METHODS", "ENCODER_METHODS", "INPUT_METHODS", "InputReduction", "LanguageReduction", "Method",
    "ModelGeometry", "OFFICIAL_OPTIONS", "ResolutionReduction", "ResolvedPlan", "VisionReduction", "available_methods", "parse_method_spec",
    "parse_option_value", "split_methods",
    "evit", "fastv", "ficoco_l", "ficoco_l_reduction", "ficoco_v", "ficoco_v_reduction", "ficoco_vl",
    "LATER_DECODER_METHODS", "cdpruner", "dart", "divprune", "downsample", "pdrop", "get_method", "pool", "prumerge", "prumerge_plus", "random_drop", "sparsevlm", "takes_budget", "tome", "topk", "visionzip", "zero",
]
