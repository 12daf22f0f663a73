"""FLOPs and KV-cache calculator for LLaVA-style models.

The model is a vision tower (ViT, e.g. CLIP ViT-L/14-336), a two-layer MLP projector and a
Llama-style decoder (e.g. Vicuna).  Counting follows the paper (which used LLM-Viewer):

* 2 FLOPs per multiply-accumulate; only matrix multiplications are counted.  Norms, rotary
  embeddings, softmax, activations, residual adds and biases are ignored.
* Per decoder layer processing ``P`` tokens (hidden ``D``, MLP ``H``, ``D_kv`` =
  ``num_kv_heads * head_dim``)::

      q, o projections         4 * P * D^2
      k, v projections         4 * P * D * D_kv        (MHA: D_kv = D, so 8 P D^2 in total)
      SwiGLU MLP (3 matrices)  6 * P * D * H
      scores + weighted sum    4 * P^2 * D             (full P x P, causality not halved)

* Per vision encoder layer with ``P`` tokens (hidden ``D``, MLP ``H``; 2-matrix GELU MLP)::

      8 * P * D^2 + 4 * P * D * H + 4 * P^2 * D

* Patch embedding (a stride-``p`` convolution): ``2 * num_patches * C * p^2 * D``.
* Projector ``Linear(Dv -> Dh), GELU, Linear(Dh -> Dout)`` on ``N`` visual tokens:
  ``2 * N * (Dv * Dh + Dh * Dout)``.

All FLOP counts are for one sequence (batch size 1) and are returned in FLOPs (not TFLOPs);
divide by ``1e12`` for TFLOPs.  KV-cache sizes are in bytes (divide by ``1e6`` for MB).

A token reduction applied inside the LLM after layer ``l`` is expressed through
``tokens_per_layer``: the first ``l`` layers see the full length, the rest the reduced one
(see :func:`reduced_tokens`).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "LanguageModelShape",
    "VisionTowerShape",
    "LlavaShape",
    "VisionFlops",
    "llava_1_5_7b",
    "llava_1_5_13b",
    "preset",
    "preset_names",
    "llm_prefill_flops",
    "llm_layer_flops",
    "vision_flops",
    "kv_cache_bytes",
    "uniform_tokens",
    "reduced_tokens",
    "solve_largest",
]


# --------------------------------------------------------------------------------------------
# Shapes
# --------------------------------------------------------------------------------------------


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    try:
        ivalue = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be a positive integer, got {value!r}") from None
    if ivalue <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return ivalue


@dataclass(frozen=True)
class LanguageModelShape:
    """Dimensions of a Llama-style decoder (the LLM of LLaVA).

    Attributes:
        num_layers: number of decoder layers.
        hidden_size: model width ``D``.
        intermediate_size: SwiGLU MLP width ``H`` (gate/up project ``D -> H``, down ``H -> D``).
        num_heads: number of query heads.
        num_kv_heads: number of key/value heads (``num_heads`` for MHA, fewer for GQA).
        head_dim: per-head dimension; q/o projections are ``D x num_heads*head_dim``.
        vocab_size: size ``V`` of the LM head (``D -> V``).
    """

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int

    def __post_init__(self) -> None:
        for f in (
            "num_layers",
            "hidden_size",
            "intermediate_size",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "vocab_size",
        ):
            _positive_int(f, getattr(self, f))
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )

    @property
    def q_dim(self) -> int:
        """Width of the query projection output, ``num_heads * head_dim``."""
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        """Width ``D_kv`` of each of the key/value projections, ``num_kv_heads * head_dim``."""
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_config(cls, cfg: Any) -> "LanguageModelShape":
        """Build from a transformers ``LlamaConfig``-like object.

        Reads ``num_hidden_layers``, ``hidden_size``, ``intermediate_size``,
        ``num_attention_heads``, ``num_key_value_heads`` (missing/None -> ``num_attention_heads``),
        ``head_dim`` (missing/None -> ``hidden_size // num_attention_heads``) and ``vocab_size``.
        """
        heads = cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        return cls(
            num_layers=cfg.num_hidden_layers,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            vocab_size=cfg.vocab_size,
        )


@dataclass(frozen=True)
class VisionTowerShape:
    """Dimensions of a ViT vision tower plus the LLaVA projector that follows it.

    Attributes:
        num_layers: number of encoder layers.
        hidden_size: encoder width ``Dv``.
        intermediate_size: encoder MLP width (2-matrix GELU MLP ``Dv -> H -> Dv``).
        image_size: input resolution in pixels (square).
        patch_size: patch size ``p`` in pixels (the patch-embedding conv has stride ``p``).
        num_channels: image channels ``C``.
        projector_hidden: output width of the projector's first Linear (``Dv -> projector_hidden``);
            0 means no projector.
        projector_out: output width of the projector's second Linear
            (``projector_hidden -> projector_out``); 0 means no second Linear.
    """

    num_layers: int
    hidden_size: int
    intermediate_size: int
    image_size: int
    patch_size: int
    num_channels: int
    projector_hidden: int
    projector_out: int

    def __post_init__(self) -> None:
        for f in ("num_layers", "hidden_size", "intermediate_size", "image_size", "patch_size", "num_channels"):
            _positive_int(f, getattr(self, f))
        for f in ("projector_hidden", "projector_out"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{f} must be a non-negative integer, got {v!r}")
        if self.patch_size > self.image_size:
            raise ValueError(f"patch_size ({self.patch_size}) exceeds image_size ({self.image_size})")

    @property
    def num_patches(self) -> int:
        """Number of patch tokens, ``(image_size // patch_size) ** 2`` (576 for 336 px / 14)."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_positions(self) -> int:
        """Tokens an encoder layer of a CLIP-style tower processes: patches plus one class token."""
        return self.num_patches + 1

    @classmethod
    def from_config(cls, cfg: Any, projector_hidden: int = 0, projector_out: int = 0) -> "VisionTowerShape":
        """Build from a transformers ``CLIPVisionConfig``-like object.

        Reads ``num_hidden_layers``, ``hidden_size``, ``intermediate_size``, ``image_size``,
        ``patch_size`` and ``num_channels`` (missing -> 3).  A bare vision config carries no
        projector, so its widths are given here (0 = none; :meth:`LlavaShape.from_config` fills
        them from the text config).
        """
        return cls(
            num_layers=cfg.num_hidden_layers,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            image_size=cfg.image_size,
            patch_size=cfg.patch_size,
            num_channels=getattr(cfg, "num_channels", None) or 3,
            projector_hidden=projector_hidden,
            projector_out=projector_out,
        )


@dataclass(frozen=True)
class LlavaShape:
    """A LLaVA model: vision tower (+ projector) and language model.

    Attributes:
        vision: the vision tower and projector dimensions.
        language: the decoder dimensions.
        vision_feature_layer: index into the tower's hidden states whose features are projected
            (LLaVA-1.5: -2, the penultimate layer).  All encoder layers are still run by the
            transformers implementation, so it does not change the FLOP count.
        num_views: tower passes per sample, each handing ``num_patches`` tokens to the LLM
            (LLaVA-1.5: 1 image; LLaVA-NeXT: the base image and its tiles; Video-LLaVA: the frames).
            Methods budget each view alike: ``retain`` is per view.
        view: what one view is, for messages ("image", "crop", "frame").
        grid_pinpoints: LLaVA-NeXT's anyres resolutions, ``(height, width)`` in pixels, from which
            :func:`ficoco.measure.multiview.with_image` picks an image's tile grid; empty when
            every image is seen at one fixed size.
        image_size: the ``(width, height)`` the views were derived from, or None (the preset's
            assumption).
    """

    vision: VisionTowerShape
    language: LanguageModelShape
    vision_feature_layer: int | tuple[int, ...] = -2
    num_views: int = 1
    view: str = "image"
    grid_pinpoints: tuple[tuple[int, int], ...] = ()
    image_size: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        _positive_int("num_views", self.num_views)
        tile = self.vision.image_size
        for pinpoint in self.grid_pinpoints:
            if (not isinstance(pinpoint, tuple) or len(pinpoint) != 2
                    or any(isinstance(x, bool) or not isinstance(x, int) or x <= 0 or x % tile for x in pinpoint)):
                raise ValueError(f"grid_pinpoints must be (height, width) pairs of positive multiples of the "
                                 f"tower's {tile} px, got {pinpoint!r}")

    @property
    def num_patches(self) -> int:
        """Visual tokens per view entering the LLM (patch tokens, class token dropped)."""
        return self.vision.num_patches

    @property
    def visual_tokens(self) -> int:
        """Visual tokens of one sample entering the LLM: ``num_views * num_patches``."""
        return self.num_views * self.num_patches

    @classmethod
    def from_config(cls, cfg: Any) -> "LlavaShape":
        """Build from a transformers ``LlavaConfig``-like object.

        Uses ``cfg.vision_config``, ``cfg.text_config`` and ``cfg.vision_feature_layer``
        (default -2).  The projector is ``Linear(vision_hidden -> text_hidden), GELU,
        Linear(text_hidden -> text_hidden)``.
        """
        language = LanguageModelShape.from_config(cfg.text_config)
        vision = VisionTowerShape.from_config(
            cfg.vision_config, projector_hidden=language.hidden_size, projector_out=language.hidden_size
        )
        layer = getattr(cfg, "vision_feature_layer", -2)
        if layer is None:
            layer = -2
        if isinstance(layer, (list, tuple)):
            layer = tuple(int(x) for x in layer)
        return cls(vision=vision, language=language, vision_feature_layer=layer)


# --------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------


def _clip_vit_l_14_336(text_hidden: int) -> VisionTowerShape:
    return VisionTowerShape(
        num_layers=24,
        hidden_size=1024,
        intermediate_size=4096,
        image_size=336,
        patch_size=14,
        num_channels=3,
        projector_hidden=text_hidden,
        projector_out=text_hidden,
    )


def _llava_1_5(layers: int, hidden: int, mlp: int) -> LlavaShape:
    """CLIP ViT-L/14-336 + a Vicuna decoder (MHA, head size 128, vocabulary 32064), features from layer -2."""
    heads = hidden // 128
    language = LanguageModelShape(num_layers=layers, hidden_size=hidden, intermediate_size=mlp, num_heads=heads,
                                  num_kv_heads=heads, head_dim=128, vocab_size=32064)
    return LlavaShape(vision=_clip_vit_l_14_336(hidden), language=language, vision_feature_layer=-2)


def llava_1_5_7b() -> LlavaShape:
    """LLaVA-1.5-7B: CLIP ViT-L/14-336 + Vicuna-7B (32 layers, D=4096, H=11008, 32 heads, V=32064)."""
    return _llava_1_5(32, 4096, 11008)


def llava_1_5_13b() -> LlavaShape:
    """LLaVA-1.5-13B: CLIP ViT-L/14-336 + Vicuna-13B (40 layers, D=5120, H=13824, 40 heads, V=32064)."""
    return _llava_1_5(40, 5120, 13824)


_PRESETS: tuple[tuple[str, Callable[[], LlavaShape]], ...] = (
    ("llava-1.5-7b", llava_1_5_7b),
    ("llava-1.5-13b", llava_1_5_13b),
)


def _all_presets() -> tuple:
    from .multiview import PRESETS as MULTIVIEW_PRESETS
    from .qwen import PRESETS as QWEN_PRESETS

    return _PRESETS + MULTIVIEW_PRESETS + QWEN_PRESETS


def preset_names() -> tuple[str, ...]:
    """Names accepted by :func:`preset`."""
    return tuple(name for name, _ in _all_presets())


def preset(name: str):
    """A new shape for a preset name: :class:`LlavaShape` ("llava-1.5-7b", "llava-1.5-13b";
    "llava-next-7b", 5 crops, and "video-llava-7b", 8 frames, from :mod:`ficoco.measure.multiview`)
    or :class:`~ficoco.measure.qwen.QwenVLShape` ("qwen2-vl-7b", "qwen2.5-vl-7b", "qwen3-vl-8b",
    costed at a 1280x720 image).

    Matching ignores case and surrounding whitespace.  Raises ``ValueError`` listing the valid
    names for anything else.
    """
    key = name.strip().lower() if isinstance(name, str) else name
    for preset_name, factory in _all_presets():
        if key == preset_name:
            return factory()
    raise ValueError(f"unknown preset {name!r}; valid names: {', '.join(preset_names())}")


# --------------------------------------------------------------------------------------------
# Token schedules
# --------------------------------------------------------------------------------------------


def uniform_tokens(num_layers: int, tokens: int) -> list[int]:
    """``[tokens] * num_layers``: every layer processes the same number of tokens."""
    num_layers = _positive_int("num_layers", num_layers)
    return _check_tokens([tokens] * num_layers, num_layers, "tokens")


def reduced_tokens(num_layers: int, before: int, after: int, at_layer: int) -> list[int]:
    """Token schedule for a reduction applied after layer ``at_layer`` (0-based count).

    The first ``at_layer`` layers process ``before`` tokens, the remaining
    ``num_layers - at_layer`` process ``after``.  ``at_layer=0`` means the reduction happens
    before the LLM (all layers see ``after``).
    """
    num_layers = _positive_int("num_layers", num_layers)
    if isinstance(at_layer, bool) or not isinstance(at_layer, int) or not 0 <= at_layer <= num_layers:
        raise ValueError(f"at_layer must be an integer in [0, {num_layers}], got {at_layer!r}")
    return _check_tokens([before] * at_layer + [after] * (num_layers - at_layer), num_layers, "tokens")


def _check_tokens(tokens_per_layer: Sequence[int], num_layers: int, what: str) -> list[int]:
    if isinstance(tokens_per_layer, (str, bytes)) or not isinstance(tokens_per_layer, Sequence):
        raise ValueError(
            f"{what} must be a sequence with one token count per layer "
            f"(got {type(tokens_per_layer).__name__}; use uniform_tokens(num_layers, n))"
        )
    if len(tokens_per_layer) != num_layers:
        raise ValueError(
            f"{what} has {len(tokens_per_layer)} entries but the model has {num_layers} layers "
            f"(one token count per layer is required)"
        )
    out: list[int] = []
    for i, p in enumerate(tokens_per_layer):
        if isinstance(p, bool):
            raise ValueError(f"{what}[{i}] must be an integer, got {p!r}")
        try:
            ip = operator.index(p)
        except TypeError:
            raise ValueError(f"{what}[{i}] must be an integer, got {p!r}") from None
        if ip < 0:
            raise ValueError(f"{what}[{i}] must be non-negative, got {ip}")
        out.append(ip)
    return out


def _language(shape) -> LanguageModelShape:
    if isinstance(shape, LanguageModelShape):
        return shape
    language = getattr(shape, "language", None)  # LlavaShape, QwenVLShape
    if isinstance(language, LanguageModelShape):
        return language
    raise TypeError(f"expected LanguageModelShape or a model shape, got {type(shape).__name__}")


def _vision(shape: VisionTowerShape | LlavaShape) -> VisionTowerShape:
    if isinstance(shape, LlavaShape):
        return shape.vision
    if isinstance(shape, VisionTowerShape):
        return shape
    raise TypeError(f"expected VisionTowerShape or LlavaShape, got {type(shape).__name__}")


# --------------------------------------------------------------------------------------------
# Language model
# --------------------------------------------------------------------------------------------


def llm_layer_flops(shape: LanguageModelShape | LlavaShape, tokens: int) -> int:
    """FLOPs of one decoder layer processing ``tokens`` tokens (prefill, batch 1).

    ``2*P*D*q_dim`` (q) + ``2*P*q_dim*D`` (o) + ``4*P*D*D_kv`` (k, v) + ``6*P*D*H`` (SwiGLU)
    + ``4*P^2*q_dim`` (scores and weighted sum); ``q_dim = num_heads*head_dim`` (= D for Llama).
    """
    s = _language(shape)
    (p,) = _check_tokens([tokens], 1, "tokens")
    d, h = s.hidden_size, s.intermediate_size
    proj = 4 * p * d * s.q_dim + 4 * p * d * s.kv_dim
    mlp = 6 * p * d * h
    attn = 4 * p * p * s.q_dim
    return proj + mlp + attn


def llm_prefill_flops(
    shape: LanguageModelShape | LlavaShape,
    tokens_per_layer: Sequence[int],
    include_lm_head: bool = False,
    lm_head_tokens: int | None = None,
) -> float:
    """Prefill FLOPs of the decoder (batch 1), in FLOPs.

    Args:
        shape: the decoder (or a :class:`LlavaShape`, whose ``language`` is used).
        tokens_per_layer: one entry per decoder layer, the number of tokens (visual + text)
            that layer processes.
        include_lm_head: add the LM head, ``2 * P_last * D * V``.
        lm_head_tokens: ``P_last`` for the LM head; default: the tokens of the last layer.

    Raises:
        ValueError: wrong number of entries, or a negative/non-integer entry.
    """
    s = _language(shape)
    tokens = _check_tokens(tokens_per_layer, s.num_layers, "tokens_per_layer")
    total = sum(llm_layer_flops(s, p) for p in tokens)
    if include_lm_head:
        if lm_head_tokens is None:
            p_last = tokens[-1]
        else:
            (p_last,) = _check_tokens([lm_head_tokens], 1, "lm_head_tokens")
        total += 2 * p_last * s.hidden_size * s.vocab_size
    return float(total)


def kv_cache_bytes(
    shape: LanguageModelShape | LlavaShape,
    tokens_per_layer: Sequence[int],
    bytes_per_value: int | float = 2,
) -> int | float:
    """KV-cache size in bytes after prefill (batch 1): ``sum_l 2 * P_l * D_kv * bytes_per_value``.

    ``bytes_per_value`` is 2 for fp16/bf16.  Returns an ``int`` when ``bytes_per_value`` is an
    int.  Divide by ``1e6`` for MB (LLaVA-1.5-7B fp16: 524288 bytes = 0.524 MB per token).
    """
    s = _language(shape)
    tokens = _check_tokens(tokens_per_layer, s.num_layers, "tokens_per_layer")
    if isinstance(bytes_per_value, bool) or not isinstance(bytes_per_value, (int, float)) or bytes_per_value <= 0:
        raise ValueError(f"bytes_per_value must be a positive number, got {bytes_per_value!r}")
    return sum(tokens) * 2 * s.kv_dim * bytes_per_value


# --------------------------------------------------------------------------------------------
# Vision tower
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VisionFlops:
    """FLOPs (batch 1, one image) of the vision side of LLaVA.

    Attributes:
        patch_embedding: patch-embedding convolution, ``2 * num_patches * C * p^2 * Dv``.
        encoder: sum over encoder layers of ``8 P Dv^2 + 4 P Dv H + 4 P^2 Dv``.
        encoder_per_layer: the per-layer terms of ``encoder``.
        projector: ``2 * N * (Dv * Dh + Dh * Dout)`` for ``N`` visual tokens sent to the LLM.
    """

    patch_embedding: float
    encoder: float
    encoder_per_layer: tuple[float, ...]
    projector: float

    @property
    def tower(self) -> float:
        """Patch embedding plus encoder: what the vision model itself computes."""
        return self.patch_embedding + self.encoder

    @property
    def total(self) -> float:
        """Patch embedding + encoder + projector."""
        return self.patch_embedding + self.encoder + self.projector

    def as_dict(self) -> dict[str, float]:
        """``{"patch_embedding", "encoder", "projector", "total"}`` as floats."""
        return {
            "patch_embedding": self.patch_embedding,
            "encoder": self.encoder,
            "projector": self.projector,
            "total": self.total,
        }


def vision_flops(
    shape: VisionTowerShape | LlavaShape,
    tokens_per_layer: Sequence[int] | None = None,
    num_llm_tokens: int | None = None,
    num_patches: int | None = None,
) -> VisionFlops:
    """FLOPs of the vision tower and projector for one image.

    Args:
        shape: the tower (or a :class:`LlavaShape`, whose ``vision`` is used).
        tokens_per_layer: one entry per encoder layer (all layers run in LLaVA, whatever
            ``vision_feature_layer`` is); default: ``num_positions`` (patches + class token,
            577 for CLIP ViT-L/14-336) at every layer.
        num_llm_tokens: visual tokens passed through the projector; default ``num_patches``.
        num_patches: patches the patch embedding cuts the image into; default the shape's
            (fewer for an image at a lower resolution, the ``downsample`` control).
    """
    s = _vision(shape)
    if tokens_per_layer is None:
        tokens_per_layer = [s.num_positions] * s.num_layers
    tokens = _check_tokens(tokens_per_layer, s.num_layers, "tokens_per_layer")
    embedded = s.num_patches if num_patches is None else _positive_int("num_patches", num_patches)
    if num_llm_tokens is None:
        n = embedded
    else:
        (n,) = _check_tokens([num_llm_tokens], 1, "num_llm_tokens")
    d, h = s.hidden_size, s.intermediate_size
    patch = 2 * embedded * s.num_channels * s.patch_size**2 * d
    per_layer = tuple(float(8 * p * d * d + 4 * p * d * h + 4 * p * p * d) for p in tokens)
    proj = 2 * n * (d * s.projector_hidden + s.projector_hidden * s.projector_out)
    return VisionFlops(
        patch_embedding=float(patch),
        encoder=float(sum(per_layer)),
        encoder_per_layer=per_layer,
        projector=float(proj),
    )


# --------------------------------------------------------------------------------------------
# Budget solver
# --------------------------------------------------------------------------------------------


def solve_largest(target: float, cost: Callable[[int], float], lo: int, hi: int) -> int:
    """Largest integer ``n`` in ``[lo, hi]`` with ``cost(n) <= target`` (binary search).

    ``cost`` must be non-decreasing in ``n``.  Typical use: the largest number of visual tokens
    whose prefill FLOPs fit a TFLOPs budget.

    Raises:
        ValueError: ``lo > hi``, or even ``cost(lo)`` exceeds ``target`` (the message names the
            target and the minimum reachable cost).
    """
    lo = operator.index(lo)
    hi = operator.index(hi)
    if lo > hi:
        raise ValueError(f"empty search range: lo ({lo}) > hi ({hi})")
    lo_cost = cost(lo)
    if lo_cost > target:
        raise ValueError(
            f"target {target:.6g} is unreachable: the minimum cost, at n={lo}, is {lo_cost:.6g}"
        )
    if cost(hi) <= target:
        return hi
    # invariant: cost(lo) <= target < cost(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if cost(mid) <= target:
            lo = mid
        else:
            hi = mid
    return lo
