"""LLaVA-1.5 for vLLM with a visual-token reduction in the vision path (prototype).

Configuration travels in the HF config, set with ``--hf-overrides``::

    {"architectures": ["FicocoLlavaForConditionalGeneration"],
     "ficoco": {"method": "random", "retain": 64, "where": "output", "seed": 0}}

method: "first" | "random" (post-tower selection, plumbing only) or "ficoco:<name>" for a ficoco
        encoder method run inside vLLM's CLIP encoder (see ficoco_bridge.py)
where:  "output" (select after the tower) or "layer:<k>" (drop rows inside the encoder with a
        forward hook on encoder layer k: shows that hooks on vLLM's CLIP layers can shorten the
        sequence for the later layers)

Two things must agree: the processor's placeholder count per image (ProcessingInfo
.get_num_image_tokens, used by _get_prompt_updates and by the profiler's max-token budget) and
the number of rows embed_multimodal returns per image.
"""

from __future__ import annotations

import re

import torch
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
)
from vllm.model_executor.models.utils import WeightsMapper
from vllm.multimodal import MULTIMODAL_REGISTRY


def ficoco_options(hf_config) -> dict:
    opts = getattr(hf_config, "ficoco", None) or {}
    if not isinstance(opts, dict):
        opts = dict(opts)
    return {"method": "random", "retain": 64, "where": "output", "seed": 0, **opts}


def kept_tokens(hf_config) -> int:
    """LLM tokens per image after the reduction (content-independent, from the config alone)."""
    opts = ficoco_options(hf_config)
    method = opts["method"]
    if method.startswith("ficoco:"):
        from .ficoco_bridge import plan_for

        plan, cls_to_llm = plan_for(hf_config, opts)
        return plan.llm_input_visual + cls_to_llm
    retain = int(opts["retain"])
    vcfg = hf_config.vision_config
    num_patches = (vcfg.image_size // vcfg.patch_size) ** 2
    if not 0 < retain <= num_patches:
        raise ValueError(f"retain must be in 1..{num_patches}, got {retain}")
    return retain


class FicocoLlavaProcessingInfo(LlavaProcessingInfo):
    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        # LLaVA-1.5 resizes/crops every image to image_size, so the count is a constant.
        return kept_tokens(self.get_hf_config())


def _build_info(ctx):
    return FicocoLlavaProcessingInfo(ctx)


def _build_processor(info, dummy_inputs, **kwargs):
    return LlavaMultiModalProcessor(info, dummy_inputs, **kwargs)


@MULTIMODAL_REGISTRY.register_processor(_build_processor, info=_build_info, dummy_inputs=LlavaDummyInputsBuilder)
class FicocoLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    # lets --mm-encoder-tp-mode data replicate the vision tower on every TP rank (CLIP layers then
    # built with disable_tp): the reduction sees all heads and every rank keeps the same tokens
    supports_encoder_tp_data = True

    # ficoco's proxy checkpoint names the tower "vision_tower.X"; vLLM's CLIPVisionModel wants
    # "vision_tower.vision_model.X" (regexes run before the parent's prefix renames)
    hf_to_vllm_mapper = LlavaForConditionalGeneration.hf_to_vllm_mapper | WeightsMapper(
        orig_to_new_regex={
            re.compile(r"^((?:model\.)?vision_tower\.)(?=embeddings\.|encoder\.|pre_layrnorm\.|post_layernorm\.)"):
                r"\1vision_model.",
        }
    )

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        cfg = self.config
        self.ficoco = ficoco_options(cfg)
        self.n_keep = kept_tokens(cfg)
        self._generator = torch.Generator().manual_seed(int(self.ficoco["seed"]))
        self._bridge = None
        method, where = self.ficoco["method"], self.ficoco["where"]
        layers = self.vision_tower.vision_model.encoder.layers
        if method.startswith("ficoco:"):
            from .ficoco_bridge import VllmVisionBridge

            self._bridge = VllmVisionBridge(cfg, self.ficoco, layers)
        elif where.startswith("layer:"):
            k = int(where.split(":", 1)[1])
            layers[k].register_forward_hook(self._drop_rows_hook)
        self._stats = {"calls": 0, "images": 0}

    # -- selection of kept patch indices (plumbing prototype) ------------------------------------

    def _kept_index(self, batch: int, num_patches: int, device) -> torch.Tensor:
        n = self.n_keep
        if self.ficoco["method"] == "first":
            idx = torch.arange(n).expand(batch, n)
        else:
            idx = torch.stack([torch.randperm(num_patches, generator=self._generator)[:n].sort().values
                               for _ in range(batch)])
        return idx.to(device)

    def _drop_rows_hook(self, module, args, output):
        # output: [B, 1 + N, C] (CLS first). Keep CLS + n_keep patches, in raster order.
        b, l, c = output.shape
        idx = self._kept_index(b, l - 1, output.device) + 1
        idx = torch.cat([torch.zeros(b, 1, dtype=idx.dtype, device=idx.device), idx], 1)
        return output.gather(1, idx[..., None].expand(-1, -1, c))

    # -- the override point: pixel values -> per-image features ---------------------------------

    def _image_pixels_to_features(self, vision_tower, pixel_values):
        feats = super()._image_pixels_to_features(vision_tower, pixel_values)  # [B, N', C]
        self._stats["calls"] += 1
        self._stats["images"] += feats.shape[0]
        if self._bridge is not None or self.ficoco["where"].startswith("layer:"):
            assert feats.shape[1] == self.n_keep, (feats.shape, self.n_keep)
            return feats
        idx = self._kept_index(feats.shape[0], feats.shape[1], feats.device)
        return feats.gather(1, idx[..., None].expand(-1, -1, feats.shape[-1]))
