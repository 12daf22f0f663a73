"""ficoco: training-free visual token reduction for LLaVA-style models.

Two lines to use it::

    import ficoco
    with ficoco.apply(model, "ficoco-v", retain=192):
        out = model.generate(**inputs)

Layout: :mod:`ficoco.stages` (filter / correlate / compress), :mod:`ficoco.methods` (compositions
and the registry), :mod:`ficoco.adapters` (running them inside HF models), :mod:`ficoco.flops`.
"""

from .adapters import ReductionHandle, apply, attach, graph_language_steps, graph_vision_tower
from .methods import LanguageReduction, Method, VisionReduction, available_methods, get_method
from .stages import TokenReduction

__version__ = "0.1.0"

__all__ = [
    "LanguageReduction", "Method", "ReductionHandle", "TokenReduction", "VisionReduction", "apply", "attach",
    "available_methods", "get_method", "graph_language_steps", "graph_vision_tower",
]
