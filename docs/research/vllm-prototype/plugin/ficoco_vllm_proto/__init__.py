"""vLLM general plugin (entry point group ``vllm.general_plugins``).

``register()`` runs in every vLLM process (front end, engine core, workers); it must be idempotent
and must not import torch-heavy modules eagerly: the model class is registered lazily by string.
"""

ARCH = "FicocoLlavaForConditionalGeneration"


def register() -> None:
    from vllm import ModelRegistry

    if ARCH not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCH, "ficoco_vllm_proto.llava:FicocoLlavaForConditionalGeneration")
