"""LLaVA-1.5 for vLLM with a ficoco reduction before the LLM (imported by vLLM, through the
plugin's registration, only in processes that build this architecture).

Two things must agree, and both come from :func:`ficoco.serving.config.served_reduction`, which
reads the model's HF config alone:

- the multimodal processor puts ``tokens_per_image`` placeholders per image in the prompt
  (:class:`FicocoLlavaProcessingInfo`), so the scheduler, the paged KV cache and the positions
  see the short sequence from the start;
- the model's vision path hands that many features per image to the LLM: ficoco's own
  :class:`~ficoco.adapters.vision.VisionSide` runs the method's stages inside vLLM's CLIP
  encoder layers (hooks), and :class:`~ficoco.adapters.input_side.InputSide` runs an LLM-input
  reduction (pooling, DivPrune) on vLLM's projector output.

vLLM's CLIP layers differ from Hugging Face's in two places, handled by :class:`VllmVisionSide`:
q, k and v come from one fused ``qkv_proj``, and the attention takes no mask (ToMe's
proportional attention replaces the attention module's ``forward`` on the instance, restored by
:meth:`ServedLlava.remove`). Everything else (the ``layer_norm2`` pre-hook that reduces the
residual stream in place, the layer hook that drops rows) is ficoco's own, unchanged: vLLM's
``CLIPEncoderLayer`` keeps the tensor it hands ``layer_norm2`` as its MLP residual, as HF's does.
"""

from __future__ import annotations

import re
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
)
from vllm.model_executor.models.utils import WeightsMapper
from vllm.multimodal import MULTIMODAL_REGISTRY

from ..adapters.hooks import HookSet
from ..adapters.input_side import InputSide
from ..adapters.vision import VisionSide
from .config import ServedReduction, served_reduction


class FicocoLlavaProcessingInfo(LlavaProcessingInfo):
    """LLaVA's processing info with the reduced number of placeholders per image (LLaVA-1.5
    resizes every image to one square, so it is one number)."""

    @cached_property
    def served(self) -> ServedReduction | None:
        # the config as loaded, without get_hf_config's LlavaConfig type check: a Qwen-VL checkpoint
        # sent to this class then gets ficoco's one line instead of a type error
        return served_reduction(self.ctx.model_config.hf_config)

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        if self.served is None:
            return super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        return self.served.tokens_per_image


class VllmVisionSide(VisionSide):
    """ficoco's vision-side hooks on vLLM's CLIP encoder layers (fused qkv, mask-less attention)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.patched: list[nn.Module] = []

    def _install_query_key_capture(self, hooks: HookSet, attn: nn.Module) -> None:
        if attn.num_heads_per_partition != attn.num_heads:
            # each rank would score with its own heads and keep different tokens
            raise ValueError("ficoco: the vision tower is split over tensor-parallel ranks; replicate it with "
                             "mm_encoder_tp_mode='data' (--mm-encoder-tp-mode data)")
        hooks.post(attn.qkv_proj, self._keep_fused_queries_keys)

    def _keep_fused_queries_keys(self, module, args, output) -> None:
        # QKVParallelLinear returns (out [B, L, 3 x heads x head_dim], bias)
        fused = output[0] if isinstance(output, tuple) else output
        self.queries, self.keys, _ = fused.chunk(3, dim=-1)

    def _install_size_bias(self, hooks: HookSet, layer: nn.Module) -> None:
        attention = layer.self_attn.attn  # MMEncoderAttention: forward(query, key, value, ...) and no mask
        original = attention.forward

        def forward(query: Tensor, key: Tensor, value: Tensor, *args, **kwargs) -> Tensor:
            bias = self._key_bias()  # [B, L] log-size of every key, or None before the first reduction
            if bias is None:
                return original(query, key, value, *args, **kwargs)
            b, length = query.shape[:2]
            heads, dim = attention.num_heads, attention.head_size
            q, k, v = (x.reshape(b, x.shape[1], heads, dim).transpose(1, 2) for x in (query, key, value))
            mask = bias.to(q.dtype)[:, None, None, :]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attention.scale)
            return out.transpose(1, 2).reshape(b, length, heads * dim)  # [B, L, heads x head_dim]

        attention.forward = forward  # on the instance: nn.Module.__call__ finds it before the class's
        self.patched.append(attention)

    def uninstall(self) -> None:
        """Restore the attention modules whose ``forward`` proportional attention replaced."""
        for attention in self.patched:
            del attention.forward
        self.patched.clear()


class ServedLlava:
    """A ficoco reduction attached to a vLLM LLaVA model's own modules.

    Args:
        model: the vLLM ``LlavaForConditionalGeneration`` (its CLIP ``vision_tower`` built up to
            the feature layer, its ``multi_modal_projector``).
        served: the resolved method (:func:`~ficoco.serving.config.served_reduction`).
    """

    def __init__(self, model: nn.Module, served: ServedReduction) -> None:
        self.served, self.hooks = served, HookSet()
        self.vision: VllmVisionSide | None = None
        self.input: InputSide | None = None
        plan, method = served.plan, served.method
        tower = getattr(model.vision_tower, "vision_model", None)
        if type(tower).__name__ != "CLIPVisionTransformer":
            raise ValueError(f"ficoco: the vLLM plugin reduces in CLIP towers (LLaVA-1.5), not in "
                             f"{type(model.vision_tower).__name__}")
        try:
            if plan.vision:
                self.vision = VllmVisionSide(tower.encoder.layers, method.vision, plan.vision, grid=served.grid,
                                             has_cls=served.has_cls)
                self.vision.install(self.hooks)
            if plan.input_removed:
                self.input = InputSide(method.input, plan.input_removed, grid=served.grid,
                                       leading=served.tokens_per_image - plan.llm_input_visual,
                                       image_token_id=model.config.image_token_index,
                                       # read only for an instruction, which no served method uses
                                       embed=model.get_language_model().model.embed_tokens,
                                       token_state=self._encoder_state if self.vision is not None else None)
                self.input.install(self.hooks, model.multi_modal_projector)
        except BaseException:
            self.remove()
            raise

    def _encoder_state(self, images: int, n: int, device) -> tuple[Tensor, Tensor] | None:
        """Sizes and grid positions ``[I, N]`` of the tokens the encoder handed the projector."""
        trace = self.vision.last if self.vision is not None else None
        if trace is None or trace.sizes.shape != (images, n):
            return None
        return trace.sizes.to(device), trace.positions.to(device)

    def remove(self) -> None:
        """Detach: every hook removed, every replaced ``forward`` restored."""
        self.hooks.remove()
        if self.vision is not None:
            self.vision.uninstall()


@MULTIMODAL_REGISTRY.register_processor(LlavaMultiModalProcessor, info=FicocoLlavaProcessingInfo,
                                        dummy_inputs=LlavaDummyInputsBuilder)
class FicocoLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    """vLLM's LLaVA with the ficoco method of ``hf_config.ficoco`` (none: vLLM's LLaVA as it is)."""

    # lets mm_encoder_tp_mode="data" replicate the tower on every tensor-parallel rank, so that the
    # reduction scores with every head and all ranks keep the same tokens
    supports_encoder_tp_data = True

    # checkpoints saved without CLIPVisionModel's "vision_model." level (ficoco's proxy) load too;
    # regexes run before the parent's prefix renames
    hf_to_vllm_mapper = LlavaForConditionalGeneration.hf_to_vllm_mapper | WeightsMapper(
        orig_to_new_regex={
            re.compile(r"^((?:model\.)?vision_tower\.)(?=embeddings\.|encoder\.|pre_layrnorm\.|post_layernorm\.)"):
                r"\1vision_model.",
        }
    )

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        served = served_reduction(self.config)
        compilation = vllm_config.compilation_config
        if served is not None and (getattr(compilation, "compile_mm_encoder", False)
                                   or getattr(compilation, "cudagraph_mm_encoder", False)):
            # a compiled or graph-captured tower would not run the hooks (nor cut rows in Python)
            raise ValueError("ficoco: the reduction runs in the vision tower's Python forward; leave "
                             "compile_mm_encoder and cudagraph_mm_encoder off")
        self.ficoco = ServedLlava(self, served) if served is not None else None

    def _image_pixels_to_features(self, vision_tower, pixel_values):
        features = super()._image_pixels_to_features(vision_tower, pixel_values)  # [B, N', C]
        if self.ficoco is not None and isinstance(features, torch.Tensor):
            expected = self.ficoco.served.tokens_per_image + self.ficoco.served.plan.input_removed
            if features.shape[1] != expected:
                raise RuntimeError(f"ficoco: the vision tower handed {features.shape[1]} tokens per image, the plan "
                                   f"{expected}")
        return features
