"""The LLaVA-OneVision family: ``LlavaOnevisionForConditionalGeneration`` / ``LlavaOnevisionModel``.

LLaVA-OneVision is LLaVA-NeXT's anyres layout on a SigLIP tower, plus videos, so this family is
:class:`~.llava_next.LlavaNextHandle` with these differences (docs/methods.md, "LLaVA-OneVision"):

- **tower**: SigLIP-384/14 (27 x 27 = 729 patches per crop, no [CLS]), features from the last
  layer kept, ``vision_feature_select_strategy="full"`` (every patch). Methods needing [CLS] run
  their stand-ins (:meth:`~ficoco.methods.Method.without_cls`);
- **anyres_max_N** (``config.vision_aspect_ratio``): an unpadded tiles' grid larger than
  ``1.1² x N`` crops' worth of patches is resized (bilinear) before the newline tokens are added
  (:class:`~.anyres.OnevisionLayout`). Inside the LLM the resized tokens are the candidates;
  before it, reduced crops are packed as on LLaVA-NeXT (no unpadding, no resize, no newlines), so
  ``retain`` stays per crop: ``crops x k``;
- **videos** (``pixel_values_videos``, ``[videos, frames, 3, 384, 384]``): every frame goes through
  the tower as one crop, is projected, then pooled (bilinear) to ``ceil(27/2)² = 14 x 14 = 196``
  tokens; a video hands the LLM ``frames x 196`` tokens and one newline token after its last frame
  (transformers' ``get_video_features``). Decoder-side methods take videos, alone or with images in
  the same batch or sample: a frame's pooled tokens are candidates, ``retain`` is per frame (as
  Video-LLaVA's), so a video of ``F`` frames keeps ``F x min(k, 196)`` (a share: of its 196), and
  its newline token is kept, never a candidate. Methods that reduce before the LLM (in the tower or
  on the projector's output) are refused for videos: the pooling runs after the projector on each
  frame's full 27 x 27 grid, which a reduced frame no longer has;
- **also refused**: samples of several images (``batch_num_images`` above 1: OneVision then
  encodes each image as its base crop only).
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from ..methods import Method
from .anyres import OnevisionLayout, onevision_layout
from .llava_next import LlavaNextHandle, split_model
from .pooled_video import PooledVideos


def _parts(model: nn.Module) -> tuple[nn.Module, nn.Module | None]:
    """``(LlavaOnevisionModel, LlavaOnevisionForConditionalGeneration or None)`` or a clear error."""
    return split_model(model, "LlavaOnevisionForConditionalGeneration", "LlavaOnevisionModel", "LLaVA-OneVision")


def max_crops(vision_aspect_ratio: str) -> int:
    """``N`` of ``"anyres_max_N"``, or a clear error."""
    digits = str(vision_aspect_ratio).removeprefix("anyres_max_")
    if not digits.isdigit() or int(digits) < 1:
        raise ValueError(f"vision_aspect_ratio={vision_aspect_ratio!r} is not 'anyres_max_N', the only layout "
                         f"LLaVA-OneVision's packing knows")
    return int(digits)


class LlavaOnevisionHandle(PooledVideos, LlavaNextHandle):
    """A method attached to a Hugging Face LLaVA-OneVision model (see the module docstring; videos:
    :class:`~.pooled_video.PooledVideos`).

    Attributes:
        max_crops: ``N`` of the model's ``anyres_max_N``.
        frame_grid: ``(rows, cols)`` of a video frame's pooled tokens (14 x 14).
    """

    family = "llava-onevision"
    family_name = "LLaVA-OneVision"
    video_newlines = 1
    pooling = "pooled 2x2 after the projector"

    @staticmethod
    def _parts(model: nn.Module) -> tuple[nn.Module, nn.Module | None]:
        return _parts(model)

    def __init__(self, model: nn.Module, method: Method, *, record: bool = False) -> None:
        llava, _ = _parts(model)
        config = llava.config
        self.max_crops = max_crops(getattr(config, "vision_aspect_ratio", "anyres_max_9"))
        side = config.vision_config.image_size // config.vision_config.patch_size
        # transformers' apply_pooling: bilinear to ceil(side / 2) per side
        self._init_videos(config.video_token_id, (math.ceil(side / 2), math.ceil(side / 2)))
        super().__init__(model, method, record=record)

    def _layout(self, size: tuple[int, int]) -> OnevisionLayout:
        return onevision_layout(size, self.pinpoints, self.crop_size, self.patch_size, self.max_crops)

    def _check(self, inputs: dict) -> None:
        super()._check(inputs)
        counts = inputs.get("batch_num_images")
        if counts is not None and any(int(n) != 1 for n in (counts.tolist() if isinstance(counts, Tensor) else counts)):
            raise ValueError(f"{self.method.name} on LLaVA-OneVision takes one image per sample; batch_num_images="
                             f"{[int(n) for n in counts]} makes the model encode each image of a multi-image sample "
                             f"as its base crop only, which is not supported yet")
