"""Video-LLaVA's processor on machines without torchvision.

transformers' ``VideoLlavaProcessor`` cannot be built (nor loaded with ``AutoProcessor``) without
a video processor, and ``VideoLlavaVideoProcessor`` is built on torchvision, which ficoco does not
require. :class:`TorchVideoLlavaVideoProcessor` does its work with torch alone
(:mod:`ficoco.torch_video_processor`), on frames that are already sampled
(:mod:`ficoco.evaluation.video_frames` samples Video-LLaVA's 8):

1. each video of ``T`` frames is resized as one block so that its shorter side is
   ``shortest_edge`` (224) pixels, the longer ``int(224 * long / short)``, bicubic with
   antialiasing on the ``uint8`` frames;
2. centre-cropped to ``crop_size`` (224 x 224; offsets truncated, as transformers' ``center_crop``);
3. normalised as the video processor's fused rescale-and-normalise does, CLIP's mean and std.

The result is ``pixel_values_videos`` of shape ``(videos, T, 3, 224, 224)``, from which the
processor counts ``T x (256 + 1)`` video placeholders. Where torchvision is installed,
``AutoProcessor`` and transformers' own video processor are used and this module is not;
tests/test_video_llava_processor.py compares the two where both exist.
"""

from __future__ import annotations

from pathlib import Path

from .torch_video_processor import (
    TorchVideoProcessor,
    load_torch_processor,
    save_torch_processor,
    torch_processor,
)


class TorchVideoLlavaVideoProcessor(TorchVideoProcessor):
    """``VideoLlavaVideoProcessor``'s preprocessing of sampled frames, with torch alone. A
    checkpoint without a video processor configuration shares its image processor's
    (``preprocessor_config.json``), as transformers reads it."""

    transformers_class = "VideoLlavaVideoProcessor"
    family = "Video-LLaVA"
    # its defaults are the base's (transformers' CLIP-224 ones)


def torch_video_llava_processor(image_processor, tokenizer, chat_template: str | None = None,
                                video_processor: TorchVideoLlavaVideoProcessor | None = None, **settings):
    """``VideoLlavaProcessor`` built from an image processor and a tokenizer, with ficoco's
    torch-only video preprocessing; ``settings``: the processor's own (``patch_size``, ...)."""
    from transformers import VideoLlavaProcessor

    return torch_processor(VideoLlavaProcessor, image_processor, tokenizer,
                           video_processor or TorchVideoLlavaVideoProcessor(), chat_template, **settings)


def load_torch_video_llava_processor(folder: str | Path):
    """:func:`torch_video_llava_processor` from the image processor, tokenizer, chat template and
    processor settings saved in ``folder``."""
    from transformers import VideoLlavaImageProcessor, VideoLlavaProcessor

    return load_torch_processor(folder, VideoLlavaProcessor, VideoLlavaImageProcessor, TorchVideoLlavaVideoProcessor)


def save_torch_video_llava_processor(processor, folder: str | Path) -> None:
    """Save a :func:`torch_video_llava_processor` as transformers saves ``VideoLlavaProcessor``, so
    that ``AutoProcessor`` loads it where torchvision is installed and
    :func:`load_torch_video_llava_processor` where it is not."""
    save_torch_processor(processor, folder, "VideoLlavaProcessor")
