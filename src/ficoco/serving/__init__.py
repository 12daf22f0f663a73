"""Serving ficoco's pre-LLM methods with vLLM (docs/serving.md).

- :mod:`.config`: the method a served model runs, from its HF config (``--hf-overrides``), and
  :func:`hf_overrides` to write that setting; no vLLM import;
- :mod:`.checkpoint`: the exact head-size padding (LLaVA) or LLM widening (Qwen2.5-VL) that
  vLLM's CPU attention needs for ficoco's small proxy models;
- :mod:`.plugin`: the ``vllm.general_plugins`` entry point;
- :mod:`.vllm_llava`, :mod:`.vllm_qwen` (its tower hooks: :mod:`.vllm_qwen_tower`): the LLaVA-1.5
  and Qwen2.5-VL model classes vLLM builds (they import vLLM).

Nothing in ficoco imports this package except the command line.
"""

from .config import (
           ARCHITECTURES,
           OVERRIDE_KEY,
           ServedQwenReduction,
           ServedReduction,
           hf_overrides,
           served_reduction,
)

__all__ = ["ARCHITECTURES", "OVERRIDE_KEY", "ServedQwenReduction", "ServedReduction", "hf_overrides",
           "served_reduction"]
