"""Model adapters: run methods inside Hugging Face LLaVA models (:func:`apply`, :func:`attach`)."""

from .llava import ReductionHandle, apply, attach

__all__ = ["ReductionHandle", "apply", "attach"]
