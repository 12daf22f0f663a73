"""The LLaVA-NeXT-Video family: ``LlavaNextVideoForConditionalGeneration`` / ``LlavaNextVideoModel``.

LLaVA-NeXT-Video is LLaVA-NeXT (the same CLIP-336/14 tower, anyres images with unpadding and
``image_newline`` tokens, the same packing) plus videos, so images run exactly as on
:class:`~.llava_next.LlavaNextHandle` (``retain`` per crop), and videos as
:class:`~.pooled_video.PooledVideos` describes:

- every frame goes through the tower as one crop (its [CLS] dropped, the ``default`` strategy),
  its 24 x 24 patch grid is pooled by ``vision_resampler`` (``spatial_pool_mode`` average / max /
  conv, stride ``spatial_pool_stride`` = 2) to 12 x 12 = 144 tokens **before** the projector,
  and a video hands the LLM ``frames x 144`` tokens with no newline token (transformers'
  ``get_video_features``);
- decoder-side methods take videos, alone or with images in the same batch or sample, ``retain``
  per frame: a video of ``F`` frames keeps ``F x min(k, 144)`` (a share: of its 144);
- methods that reduce before the LLM (in the tower or on the projector's output) are refused for
  videos in one line: the pooling needs each frame's full 24 x 24 grid.
"""

from __future__ import annotations

from torch import nn

from ..methods import Method
from .llava_next import LlavaNextHandle, split_model
from .pooled_video import PooledVideos


def _parts(model: nn.Module) -> tuple[nn.Module, nn.Module | None]:
    """``(LlavaNextVideoModel, LlavaNextVideoForConditionalGeneration or None)`` or a clear error."""
    return split_model(model, "LlavaNextVideoForConditionalGeneration", "LlavaNextVideoModel", "LLaVA-NeXT-Video")


class LlavaNextVideoHandle(PooledVideos, LlavaNextHandle):
    """A method attached to a Hugging Face LLaVA-NeXT-Video model (see the module docstring).

    Attributes:
        frame_grid: ``(rows, cols)`` of a video frame's pooled tokens (12 x 12).
    """

    family = "llava-next-video"
    family_name = "LLaVA-NeXT-Video"
    video_newlines = 0
    pooling = "pooled 2x2 before the projector"

    @staticmethod
    def _parts(model: nn.Module) -> tuple[nn.Module, nn.Module | None]:
        return _parts(model)

    def __init__(self, model: nn.Module, method: Method, *, record: bool = False) -> None:
        llava, _ = _parts(model)
        config = llava.config
        side = config.vision_config.image_size // config.vision_config.patch_size
        stride = int(getattr(config, "spatial_pool_stride", 2))
        self.pooling = f"pooled {stride}x{stride} before the projector"
        # nn.AvgPool2d / MaxPool2d / Conv2d with kernel = stride: floor(side / stride) per side
        self._init_videos(config.video_token_id, (side // stride, side // stride))
        super().__init__(model, method, record=record)
