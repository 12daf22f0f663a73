"""ficoco's vLLM plugin: the ``vllm.general_plugins`` entry point (pyproject.toml).

vLLM calls :func:`register` once in each of its processes (the front end, the engine core, every
worker, the registry's inspection subprocess). It only names the architecture and the module
that defines it, by string: nothing is imported and no model changes until vLLM builds a model
whose config asks for that architecture (``--hf-overrides``, docs/serving.md).
"""

from __future__ import annotations

from .config import ARCHITECTURES

_MODULES = {
    "FicocoLlavaForConditionalGeneration": "ficoco.serving.vllm_llava:FicocoLlavaForConditionalGeneration",
    "FicocoQwen2_5_VLForConditionalGeneration":
        "ficoco.serving.vllm_qwen:FicocoQwen2_5_VLForConditionalGeneration",
}


def register() -> None:
    """Register ficoco's model architectures with vLLM (idempotent)."""
    from vllm import ModelRegistry

    supported = set(ModelRegistry.get_supported_archs())
    for architecture in ARCHITECTURES.values():
        if architecture not in supported:
            ModelRegistry.register_model(architecture, _MODULES[architecture])
