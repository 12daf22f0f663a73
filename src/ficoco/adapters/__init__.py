"""Model adapters: run methods inside Hugging Face multimodal models (:func:`apply`, :func:`attach`).

One module per model family (``llava.py``, ``llava_next.py`` with its anyres layout in
``anyres.py``, ``llava_onevision.py`` and ``llava_next_video.py`` on top of it with their pooled
videos in ``pooled_video.py``, ``video_llava.py``, ``qwen_vl.py``) behind :class:`ReductionHandle`
(``handle.py``); ``families.py`` picks the family; ``vision.py`` / ``packed_vision.py`` run
encoder-side reductions, ``language.py`` decoder-side ones.
"""

from .cuda_graph import (
    GraphedInputReduction,
    GraphedLanguageSteps,
    GraphedVisionTower,
    graph_input_reduction,
    graph_language_steps,
    graph_vision_tower,
)
from .families import FAMILIES, apply, attach, family_of, family_of_model_type
from .handle import ReductionHandle
from .varlen import FastVisionAttention, fast_vision_attention

__all__ = [
    "FAMILIES", "FastVisionAttention", "GraphedInputReduction", "GraphedLanguageSteps", "GraphedVisionTower",
    "ReductionHandle", "apply", "attach", "family_of", "family_of_model_type", "fast_vision_attention",
    "graph_input_reduction", "graph_language_steps", "graph_vision_tower",
]
