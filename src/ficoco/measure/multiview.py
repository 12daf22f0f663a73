"""FLOPs presets for LLaVA models whose LLM sees several tower passes per sample.

* **LLaVA-NeXT-7B** (llava-v1.6-vicuna-7b): CLIP ViT-L/14-336 runs on the image resized to 336 px
  (the base view) and on each 336 px tile of the image resized to the best of its anyres grid
  resolutions.  The FiCoCo paper costs it at 5 views x 576 = 2880 visual tokens (2x2 tiles + the
  base, the most the standard grid gives), counting neither the padding rows LLaVA-NeXT unpads
  nor its ``image_newline`` tokens (at 672x672 the model itself feeds 2304 + 48 + 576 = 2928).
* **Video-LLaVA-7B**: 8 frames, each through a CLIP ViT-L/14 at 224 px (LanguageBind's video
  tower, a plain CLIP vision model in transformers' ``VideoLlava``), 256 patch tokens per frame,
  2048 in all as the paper counts them.  (transformers' ``VideoLlava`` keeps each frame's class
  token, 8 x 257 = 2056 placeholders; the paper's count drops it, as the original code does.)

Both decoders are Vicuna-7B v1.5 (LLaVA-1.5-7B's).  The paper states no text-token count for
them; 64 text tokens reproduce all of its figures, to its one decimal: 42.7 TFLOPs for
LLaVA-NeXT (2880 + 64 tokens; 63-68 also round to 42.7, 60 gives 42.6), 2.9 for its FiCoCo rows
(32 per crop, 160 + 64), and 29.7 for Video-LLaVA (2048 + 64; 62-67 also do, 60 gives 29.6).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from .flops import LlavaShape, VisionTowerShape, _positive_int, llava_1_5_7b

#: llava-v1.6's ``image_grid_pinpoints``, ``(height, width)`` in pixels
LLAVA_NEXT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))


def select_best_resolution(width: int, height: int, pinpoints) -> tuple[int, int]:
    """The ``(height, width)`` pinpoint an image of ``width x height`` pixels is resized into, as
    LLaVA-NeXT's processor picks it: the one keeping the most of the image's pixels once it is
    scaled to fit (aspect ratio kept, never more than the original's pixel count), ties to the
    one wasting the fewest pixels."""
    width, height = _positive_int("width", width), _positive_int("height", height)
    best, best_kept, best_wasted = None, -1, 0
    for pin_h, pin_w in pinpoints:
        scale = min(pin_w / width, pin_h / height)
        kept = min(int(width * scale) * int(height * scale), width * height)
        wasted = pin_w * pin_h - kept
        if kept > best_kept or (kept == best_kept and wasted < best_wasted):
            best, best_kept, best_wasted = (pin_h, pin_w), kept, wasted
    if best is None:
        raise ValueError("the model has no grid pinpoints: it sees every image at one fixed size")
    return best


def with_image(shape: LlavaShape, width: int, height: int) -> LlavaShape:
    """``shape`` for an image of ``width x height`` pixels: the base view plus one view per tile
    of the pinpoint :func:`select_best_resolution` picks (672x672 -> 2x2 tiles -> 5 views)."""
    if not shape.grid_pinpoints:
        raise ValueError(f"this model sees every {shape.view} at {shape.vision.image_size} px; "
                         f"only an anyres model (LLaVA-NeXT) has views that depend on the image size")
    pin_h, pin_w = select_best_resolution(width, height, shape.grid_pinpoints)
    tile = shape.vision.image_size
    return replace(shape, num_views=1 + (pin_h // tile) * (pin_w // tile), image_size=(width, height))


def llava_next_7b() -> LlavaShape:
    """LLaVA-NeXT-7B (llava-v1.6-vicuna-7b): LLaVA-1.5-7B's tower, projector and Vicuna-7B, at the
    paper's 5 crops of 576 tokens (a 672x672 image: 2x2 tiles + the base)."""
    return replace(llava_1_5_7b(), num_views=5, view="crop", grid_pinpoints=LLAVA_NEXT_PINPOINTS)


def video_llava_7b() -> LlavaShape:
    """Video-LLaVA-7B: 8 frames through a CLIP ViT-L/14-224 (24 layers, 1024 wide, MLP 4096, 256
    patches + [CLS]), features from layer -2, projector 1024 -> 4096 -> 4096, Vicuna-7B v1.5."""
    base = llava_1_5_7b()
    tower = VisionTowerShape(num_layers=24, hidden_size=1024, intermediate_size=4096, image_size=224, patch_size=14,
                             num_channels=3, projector_hidden=4096, projector_out=4096)
    return replace(base, vision=tower, num_views=8, view="frame")


#: the ``model_type`` of the checkpoints :func:`shape_from_config` reads
CHECKPOINT_MODEL_TYPES = ("llava_next", "video_llava")
#: frames Video-LLaVA samples per video
VIDEO_LLAVA_FRAMES = 8


def shape_from_config(config) -> LlavaShape:
    """The FLOPs shape of a LLaVA-NeXT or Video-LLaVA checkpoint's config (a transformers
    ``LlavaNextConfig`` / ``VideoLlavaConfig``): LLaVA-NeXT with its own ``image_grid_pinpoints`` at
    a 672x672 image (the paper's setting; :func:`with_image` for another size), Video-LLaVA at its
    8 frames (as many as ``video_seq_length`` holds frames of patches + [CLS], where it says)."""
    model_type = getattr(config, "model_type", None)
    if model_type not in CHECKPOINT_MODEL_TYPES:
        raise ValueError(f"not a LLaVA-NeXT or Video-LLaVA config: model_type {model_type!r}")
    base = LlavaShape.from_config(config)
    if model_type == "llava_next":
        pinpoints = tuple((int(h), int(w)) for h, w in config.image_grid_pinpoints)
        return with_image(replace(base, view="crop", grid_pinpoints=pinpoints), 672, 672)
    frames = VIDEO_LLAVA_FRAMES
    per_frame = base.num_patches + 1
    length = getattr(config, "video_seq_length", None)
    if isinstance(length, int) and length > 0 and length % per_frame == 0:
        frames = length // per_frame
    return replace(base, num_views=frames, view="frame")


PRESETS: tuple[tuple[str, Callable[[], LlavaShape]], ...] = (
    ("llava-next-7b", llava_next_7b),
    ("video-llava-7b", video_llava_7b),
)

#: the paper's text tokens and ``ficoco flops``'s default per-view budgets for these presets:
#: 32 per crop is the paper's 160-token LLaVA-NeXT row, 17 per frame its 136-token Video-LLaVA one
DEFAULTS: tuple[tuple[str, int, str], ...] = (
    ("llava-next-7b", 64, "128,64,32"),
    ("video-llava-7b", 64, "64,32,17"),
)


def preset_defaults(name: str) -> tuple[int, str] | None:
    """``(text_tokens, retains)`` for a preset of this module, else None."""
    for preset_name, text_tokens, retains in DEFAULTS:
        if name == preset_name:
            return text_tokens, retains
    return None
