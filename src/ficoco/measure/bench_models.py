"""The benchmark's random-weight models and inputs, per preset (the timing loop: :mod:`.bench`).

Three LLaVA layouts, each built as the real transformers class from a configuration with the
FLOPs preset's shapes (:mod:`.flops`, :mod:`.multiview`):

- ``llava-1.5-7b`` / ``llava-1.5-13b``: ``LlavaForConditionalGeneration``, one 336 px image,
  576 placeholders;
- ``llava-next-7b``: ``LlavaNextForConditionalGeneration`` (llava-v1.6-vicuna-7b's layout), one
  672x672 image: the base crop and 2x2 tiles, ``pixel_values`` ``[B, 5, 3, 336, 336]`` and
  ``image_sizes``; the prompt holds what ``LlavaNextProcessor`` gives that image: 576 base tokens,
  the 48x48 tile grid (nothing to unpad at a square image) and a newline token per row, 2928;
- ``video-llava-7b``: ``VideoLlavaForConditionalGeneration``, one 8-frame video through the
  CLIP-L/14-224 video tower, ``pixel_values_videos`` ``[B, 8, 3, 224, 224]``; each frame hands
  on its [CLS] and 256 patches, as ``VideoLlavaProcessor`` counts them: 8 x 257 = 2056.

Token ids are those of the llava-hf / LanguageBind checkpoints (``<image>`` 32000, ``<video>``
32001, a 32064-word vocabulary).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..adapters.anyres import anyres_layout
from .flops import LlavaShape, preset_names
from .flops import preset as flops_preset

IMAGE_TOKEN = 32000
VIDEO_TOKEN = 32001
#: system-prompt tokens before the visual placeholders (the rest of ``text_tokens`` comes after)
TEXT_BEFORE = 35
#: the image every ``llava-next-7b`` sample carries, ``(height, width)``: 2x2 tiles + the base crop
LLAVA_NEXT_IMAGE = (672, 672)


@dataclass(frozen=True)
class Layout:
    """What one preset's benchmark builds.

    Attributes:
        family: ``"llava"``, ``"llava-next"`` or ``"video-llava"``.
        shape: the FLOPs shape (``num_views`` crops or frames per sample; costs come from it).
        batches: default batch sizes; retains: default per-view budgets (the multiview presets':
            :data:`.multiview.DEFAULTS`).
    """

    family: str
    shape: LlavaShape
    batches: tuple[int, ...]
    retains: tuple[int, ...]


def layout(preset: str) -> Layout:
    """The benchmark layout of a preset, or one clear error."""
    from .multiview import preset_defaults

    try:
        shape = flops_preset(preset)
    except ValueError:
        raise ValueError(f"unknown preset {preset!r}; available: {', '.join(preset_names())}") from None
    if not isinstance(shape, LlavaShape):
        raise ValueError(f"{preset} is a Qwen-VL preset: ficoco.measure.bench_qwen benchmarks it")
    defaults = preset_defaults(preset.strip().lower())
    if defaults is None:
        return Layout("llava", shape, (1, 8, 32), (192, 128, 64))
    retains = tuple(int(x) for x in defaults[1].split(","))
    family = "llava-next" if shape.grid_pinpoints else "video-llava"
    return Layout(family, shape, (1, 8), retains)


def _clip(shape: LlavaShape):
    from transformers import CLIPVisionConfig

    v = shape.vision
    return CLIPVisionConfig(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                            num_hidden_layers=v.num_layers, num_attention_heads=v.hidden_size // 64,
                            image_size=v.image_size, patch_size=v.patch_size, projection_dim=768,
                            hidden_act="quick_gelu")


def _vicuna(shape: LlavaShape):
    from transformers import LlamaConfig

    t = shape.language
    return LlamaConfig(hidden_size=t.hidden_size, intermediate_size=t.intermediate_size, num_hidden_layers=t.num_layers,
                       num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads, vocab_size=t.vocab_size,
                       max_position_embeddings=4096, rms_norm_eps=1e-5, pad_token_id=0)


def model_config(preset: str):
    """The transformers configuration with a preset's exact shapes: ``LlavaConfig``,
    ``LlavaNextConfig`` (llava-v1.6's grid pinpoints) or ``VideoLlavaConfig`` (one CLIP config for
    both towers)."""
    from transformers import LlavaConfig, LlavaNextConfig, VideoLlavaConfig

    target = layout(preset)
    shape = target.shape
    vision, text = _clip(shape), _vicuna(shape)
    common = dict(vision_feature_layer=shape.vision_feature_layer, vision_feature_select_strategy="default")
    if target.family == "llava":
        return LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN,
                           image_seq_length=shape.num_patches, **common)
    if target.family == "llava-next":
        return LlavaNextConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN,
                               image_grid_pinpoints=[list(p) for p in shape.grid_pinpoints],
                               image_seq_length=shape.num_patches, **common)
    frames = shape.num_views
    return VideoLlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_index=IMAGE_TOKEN,
                            video_token_index=VIDEO_TOKEN, image_seq_length=shape.num_patches,
                            video_seq_length=frames * (shape.num_patches + 1), **common)


def model_class(config) -> type[nn.Module]:
    """The ``...ForConditionalGeneration`` class of a :func:`model_config` configuration."""
    import transformers

    classes = {"llava": transformers.LlavaForConditionalGeneration,
               "llava_next": transformers.LlavaNextForConditionalGeneration,
               "video_llava": transformers.VideoLlavaForConditionalGeneration}
    return classes[config.model_type]


def visual_placeholders(preset: str) -> int:
    """Visual placeholders of one sample's prompt, as the model's processor writes them."""
    target = layout(preset)
    shape = target.shape
    if target.family == "llava-next":
        pinpoints = [list(p) for p in shape.grid_pinpoints]
        return anyres_layout(LLAVA_NEXT_IMAGE, pinpoints, shape.vision.image_size, shape.vision.patch_size).full_tokens
    if target.family == "video-llava":
        return shape.num_views * (shape.num_patches + 1)  # every frame's [CLS] too
    return shape.num_patches


def make_inputs(preset: str, batch: int, text_tokens: int, device: str, dtype: torch.dtype, seed: int = 0) -> dict:
    """``batch`` prompts: :data:`TEXT_BEFORE` system tokens, one sample's visual placeholders,
    the rest of ``text_tokens`` after (at least one), and the pixels they stand for.

    Returns ``input_ids`` / ``attention_mask`` ``[B, L]`` and, by family, ``pixel_values``
    ``[B, 3, S, S]``; ``pixel_values`` ``[B, crops, 3, S, S]`` with ``image_sizes`` ``[B, 2]``;
    or ``pixel_values_videos`` ``[B, frames, 3, S, S]``.
    """
    target = layout(preset)
    shape = target.shape
    gen = torch.Generator().manual_seed(seed)
    visual = visual_placeholders(preset)
    after = max(text_tokens - TEXT_BEFORE, 1)
    ids = torch.randint(3, IMAGE_TOKEN, (batch, TEXT_BEFORE + visual + after), generator=gen)
    ids[:, 0] = 1
    ids[:, TEXT_BEFORE:TEXT_BEFORE + visual] = VIDEO_TOKEN if target.family == "video-llava" else IMAGE_TOKEN
    side = shape.vision.image_size
    out = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}
    if target.family == "llava":
        out["pixel_values"] = torch.randn(batch, 3, side, side, generator=gen).to(device, dtype)
    elif target.family == "llava-next":
        pinpoints = [list(p) for p in shape.grid_pinpoints]
        crops = anyres_layout(LLAVA_NEXT_IMAGE, pinpoints, side, shape.vision.patch_size).crops
        out["pixel_values"] = torch.randn(batch, crops, 3, side, side, generator=gen).to(device, dtype)
        out["image_sizes"] = torch.tensor([list(LLAVA_NEXT_IMAGE)] * batch, device=device)
    else:
        out["pixel_values_videos"] = torch.randn(batch, shape.num_views, 3, side, side, generator=gen).to(device, dtype)
    return out


def encode_visual(model: nn.Module, inputs: dict, handle=None, prompt: dict | None = None):
    """The model's vision side on ``inputs``' pixels (tower, projector, and LLaVA-NeXT's packing):
    ``get_image_features`` or ``get_video_features``, through any attached handle's hooks. An
    LLM-input reduction that reads the instruction is first handed the cut ``prompt``, which a bare
    call of the vision side does not carry."""
    core = model.model
    if "pixel_values_videos" in inputs:
        side = getattr(handle, "video_input", None) if handle is not None else None
        if side is not None and prompt is not None:
            side.remember_prompt(prompt["input_ids"], prompt["attention_mask"],
                                 per_run=inputs["pixel_values_videos"].shape[1])
        return core.get_video_features(pixel_values_videos=inputs["pixel_values_videos"])
    if handle is not None and handle.input is not None and prompt is not None:
        handle.input.remember_prompt(prompt["input_ids"], prompt["attention_mask"])
    if "image_sizes" in inputs:
        return core.get_image_features(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"])
    return core.get_image_features(pixel_values=inputs["pixel_values"])
