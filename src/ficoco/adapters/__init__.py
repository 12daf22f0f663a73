"""Model adapters: run methods inside Hugging Face LLaVA models (:func:`apply`, :func:`attach`)."""

from .cuda_graph import GraphedLanguageSteps, GraphedVisionTower, graph_language_steps, graph_vision_tower
from .llava import ReductionHandle, apply, attach

__all__ = [
    "GraphedLanguageSteps", "GraphedVisionTower", "ReductionHandle", "apply", "attach", "graph_language_steps",
    "graph_vision_tower",
]
