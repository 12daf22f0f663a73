"""FLOPs of Qwen-VL models (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) for one image of a given size.

Counting follows :mod:`ficoco.measure.flops` (2 FLOPs per multiply-add, matrix products only) on
the Qwen towers:

* the image is resized as the Qwen processors do (:func:`smart_resize`: both sides a multiple of
  ``patch x merge`` pixels, area within ``[min_pixels, max_pixels]``), cut into ``P`` patches of
  ``temporal_patch x patch x patch`` pixels; every ``merge x merge`` patches become one LLM token;
* patch embedding ``2 * P * C * T * p^2 * D`` (a stride-``p`` 3-D convolution);
* per block with ``P`` patches: ``q, k, v, o`` projections ``8 * P * D^2``, the MLP ``2 * m * P * D
  * H`` (``m`` = 2 matrices, or 3 for Qwen2.5-VL's SwiGLU), attention ``4 * S^2 * D`` summed over
  its segments (the whole image; Qwen2.5-VL's window blocks, its windows of ``window_size``
  pixels);
* the merger ``2 * (P / 4) * (4D * 4D + 4D * D_out)`` (LayerNorm, two linears); Qwen3-VL adds one
  DeepStack merger of the same shape per DeepStack block;
* the LLM as for LLaVA (:func:`~ficoco.measure.flops.llm_prefill_flops`, GQA-aware).

After an encoder-side reduction, a window block's windows are taken to shrink alike (each keeps
the image's share), which a reduction that spreads its removals evenly comes close to.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .flops import LanguageModelShape, VisionFlops, _check_tokens, _positive_int


@dataclass(frozen=True)
class QwenVisionShape:
    """A Qwen-VL vision tower.

    Attributes:
        num_layers: blocks.
        hidden_size: tower width ``D``.
        intermediate_size: MLP width ``H``.
        mlp_matrices: 2 (fc1, fc2) or 3 (SwiGLU gate, up, down).
        patch_size / temporal_patch_size / merge_size: pixels per patch side, frames per patch,
            patches per LLM token side.
        out_hidden_size: the merger's output (the LLM width).
        window_size: pixels per attention window side, or 0 (no windows).
        full_attention_blocks: the blocks that attend over the whole image when there are windows.
        deepstack_blocks: blocks whose features also go, through their own merger, to the LLM.
        num_channels: image channels.
        num_heads: attention heads (the benchmark builds the model from this shape).
    """

    num_layers: int
    hidden_size: int
    intermediate_size: int
    mlp_matrices: int
    patch_size: int
    temporal_patch_size: int
    merge_size: int
    out_hidden_size: int
    window_size: int = 0
    full_attention_blocks: tuple[int, ...] = ()
    deepstack_blocks: tuple[int, ...] = ()
    num_channels: int = 3
    num_heads: int = 16

    @property
    def factor(self) -> int:
        """Pixels per LLM token side, ``patch x merge``."""
        return self.patch_size * self.merge_size

    def full_attention(self, block: int) -> bool:
        return not self.window_size or block in self.full_attention_blocks

    @classmethod
    def from_config(cls, vcfg) -> "QwenVisionShape":
        """From a ``Qwen2VLVisionConfig`` / ``Qwen2_5_VLVisionConfig`` / ``Qwen3VLVisionConfig``."""
        width = getattr(vcfg, "embed_dim", None) or vcfg.hidden_size  # Qwen2-VL names its width embed_dim
        mlp = getattr(vcfg, "intermediate_size", None) or int(width * vcfg.mlp_ratio)
        swiglu = getattr(vcfg, "model_type", "") == "qwen2_5_vl_vision"
        out = getattr(vcfg, "out_hidden_size", None) or vcfg.hidden_size
        return cls(vcfg.depth, width, mlp, 3 if swiglu else 2, vcfg.patch_size, vcfg.temporal_patch_size,
                   vcfg.spatial_merge_size, out, getattr(vcfg, "window_size", 0) or 0,
                   tuple(getattr(vcfg, "fullatt_block_indexes", ()) or ()),
                   tuple(getattr(vcfg, "deepstack_visual_indexes", ()) or ()),
                   getattr(vcfg, "in_channels", None) or getattr(vcfg, "in_chans", None) or 3, vcfg.num_heads)


@dataclass(frozen=True)
class QwenVLShape:
    """A Qwen-VL model (tower + LLM) and the image size it is costed at.

    Attributes:
        image_size: ``(width, height)`` of the image in pixels before resizing.
        min_pixels / max_pixels: the processor's bounds on the resized area.
    """

    vision: QwenVisionShape
    language: LanguageModelShape
    image_size: tuple[int, int] = (1280, 720)
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280

    @property
    def grid(self) -> tuple[int, int]:
        """``(rows, columns)`` of patches of the resized image."""
        width, height = self.image_size
        h, w = smart_resize(height, width, self.vision.factor, self.min_pixels, self.max_pixels)
        return h // self.vision.patch_size, w // self.vision.patch_size

    @property
    def num_patches_in_tower(self) -> int:
        rows, columns = self.grid
        return rows * columns

    @property
    def num_patches(self) -> int:
        """LLM tokens of the image (merge groups): the candidates of every method."""
        return self.num_patches_in_tower // self.vision.merge_size ** 2

    def windows(self) -> list[int]:
        """Patches in each attention window of a window block (one entry: the whole image)."""
        rows, columns = self.grid
        if not self.vision.window_size:
            return [rows * columns]
        side = self.vision.window_size // self.vision.patch_size
        return [min(side, rows - r) * min(side, columns - c) for r in range(0, rows, side)
                for c in range(0, columns, side)]

    def with_image(self, width: int, height: int) -> "QwenVLShape":
        return QwenVLShape(self.vision, self.language, (width, height), self.min_pixels, self.max_pixels)

    @classmethod
    def from_config(cls, cfg, image_size: tuple[int, int] = (1280, 720)) -> "QwenVLShape":
        return cls(QwenVisionShape.from_config(cfg.vision_config), LanguageModelShape.from_config(cfg.text_config),
                   image_size)


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """``(height, width)`` the Qwen processors resize an image to: each side rounded to a multiple of
    ``factor``, the area scaled into ``[min_pixels, max_pixels]`` keeping the aspect ratio."""
    height, width = _positive_int("height", height), _positive_int("width", width)
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def qwen_vision_flops(shape: QwenVLShape, groups_per_layer: Sequence[int] | None = None,
                      num_llm_tokens: int | None = None) -> VisionFlops:
    """FLOPs of the tower and mergers for one image.

    Args:
        groups_per_layer: merge groups entering each block (default: all of them everywhere).
        num_llm_tokens: tokens leaving the merger (default: what the last block holds).
    """
    v = shape.vision
    full = shape.num_patches
    if groups_per_layer is None:
        groups_per_layer = [full] * v.num_layers
    groups = _check_tokens(groups_per_layer, v.num_layers, "groups_per_layer")
    unit = v.merge_size ** 2
    d, h = v.hidden_size, v.intermediate_size
    patch = 2 * shape.num_patches_in_tower * v.num_channels * v.temporal_patch_size * v.patch_size ** 2 * d
    windows = shape.windows()
    per_layer = []
    for block, g in enumerate(groups):
        p = g * unit
        share = g / full
        segments = [p] if v.full_attention(block) else [w * share for w in windows]
        attention = sum(4 * s * s * d for s in segments)
        per_layer.append(float(8 * p * d * d + 2 * v.mlp_matrices * p * d * h + attention))
    tokens = groups[-1] if num_llm_tokens is None else num_llm_tokens

    def merger(n: int) -> float:
        return 2 * n * (unit * d * unit * d + unit * d * v.out_hidden_size)

    mergers = merger(tokens)
    for block in v.deepstack_blocks:  # DeepStack features leave the tower at their block's size
        mergers += merger(groups[block + 1] if block + 1 < len(groups) else tokens)
    return VisionFlops(patch_embedding=float(patch), encoder=float(sum(per_layer)), encoder_per_layer=tuple(per_layer),
                       projector=float(mergers))


def _qwen2_llm() -> LanguageModelShape:
    """Qwen2-7B: 28 layers, D = 3584, H = 18944, 28 query heads and 4 key/value heads of 128."""
    return LanguageModelShape(num_layers=28, hidden_size=3584, intermediate_size=18944, num_heads=28, num_kv_heads=4,
                              head_dim=128, vocab_size=152064)


def qwen2_vl_7b() -> QwenVLShape:
    """Qwen2-VL-7B: a 32-block, 1280-wide tower (MLP 5120, 16 heads, patch 14, merge 2) + Qwen2-7B."""
    vision = QwenVisionShape(32, 1280, 5120, 2, 14, 2, 2, 3584)
    return QwenVLShape(vision, _qwen2_llm(), min_pixels=3136, max_pixels=12845056)


def qwen2_5_vl_7b() -> QwenVLShape:
    """Qwen2.5-VL-7B: a 32-block, 1280-wide tower (SwiGLU 3420, 16 heads, patch 14, merge 2, 112-pixel
    windows, full attention in blocks 7/15/23/31) + Qwen2-7B."""
    vision = QwenVisionShape(32, 1280, 3420, 3, 14, 2, 2, 3584, 112, (7, 15, 23, 31))
    return QwenVLShape(vision, _qwen2_llm(), min_pixels=3136, max_pixels=12845056)


def qwen3_vl_8b() -> QwenVLShape:
    """Qwen3-VL-8B: a 27-block, 1152-wide tower (MLP 4304, 16 heads, patch 16, merge 2, DeepStack from
    blocks 8/16/24) + Qwen3-8B (36 layers, D = 4096, H = 12288, 32 query and 8 key/value heads of 128)."""
    vision = QwenVisionShape(27, 1152, 4304, 2, 16, 2, 2, 4096, deepstack_blocks=(8, 16, 24))
    language = LanguageModelShape(num_layers=36, hidden_size=4096, intermediate_size=12288, num_heads=32,
                                  num_kv_heads=8, head_dim=128, vocab_size=151936)
    return QwenVLShape(vision, language, min_pixels=65536, max_pixels=16777216)


PRESETS: tuple[tuple[str, Callable[[], QwenVLShape]], ...] = (
    ("qwen2-vl-7b", qwen2_vl_7b),
    ("qwen2.5-vl-7b", qwen2_5_vl_7b),
    ("qwen3-vl-8b", qwen3_vl_8b),
)
