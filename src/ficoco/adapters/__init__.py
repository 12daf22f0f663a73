"""Model adapters: run methods inside Hugging Face LLaVA models (:func:`apply`, :func:`attach`)."""

from .cuda_graph import GraphedVisionTower, graph_vision_tower
from .llava import ReductionHandle, apply, attach

__all__ = ["GraphedVisionTower", "ReductionHandle", "apply", "attach", "graph_vision_tower"]
