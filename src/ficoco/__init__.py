"""ficoco: training-free visual token reduction for LLaVA-style models.

Two lines to use it::

    import ficoco
    with ficoco.apply(model, "ficoco-v", retain=192):
        out = model.generate(**inputs)

Layout: :mod:`ficoco.stages` (filter / correlate / compress), :mod:`ficoco.methods` (compositions
and the registry), :mod:`ficoco.adapters` (running them inside HF models), :mod:`ficoco.measure` (FLOPs, budgets, benchmarks).

The names below are imported on first use, so that ``import ficoco.cli`` (and ``ficoco --help``)
does not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

#: public name -> the module that defines it
_EXPORTS = {
    "ReductionHandle": "adapters", "apply": "adapters", "attach": "adapters", "graph_language_steps": "adapters",
    "fast_vision_attention": "adapters", "graph_input_reduction": "adapters",
    "graph_vision_tower": "adapters", "LanguageReduction": "methods", "Method": "methods",
    "VisionReduction": "methods", "available_methods": "methods", "get_method": "methods",
    "TokenReduction": "stages",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ficoco' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # for type checkers and IDEs: the eager imports
    from .adapters import (
        ReductionHandle,
        apply,
        attach,
        fast_vision_attention,
        graph_input_reduction,
        graph_language_steps,
        graph_vision_tower,
    )
    from .methods import LanguageReduction, Method, VisionReduction, available_methods, get_method
    from .stages import TokenReduction
