"""LLaVA-OneVision's and LLaVA-NeXT-Video's processors on machines without torchvision.

transformers' ``LlavaOnevisionProcessor`` and ``LlavaNextVideoProcessor`` cannot be built (nor
loaded with ``AutoProcessor``) without their video processors, which need torchvision. The classes
here do those video processors' work with torch alone (:mod:`ficoco.torch_video_processor`) on
frames that are already sampled (:mod:`ficoco.evaluation.video_frames`), and the processors are
transformers' own with them plugged in, so the text side and the placeholder counts stay
transformers':

* **LLaVA-OneVision** (``LlavaOnevisionVideoProcessor``): every frame resized to ``384 x 384``
  whatever its aspect, bicubic with antialiasing, no crop, rescaled and normalised with the
  checkpoint's mean and std (SigLIP's 0.5 in llava-hf's OneVision configurations; the class
  default is CLIP's). The processor counts ``T x 14 x 14 + 1`` placeholders for ``T`` frames
  (each frame's 27 x 27 patches pooled to 14 x 14, one newline after the video).
* **LLaVA-NeXT-Video** (``LlavaNextVideoVideoProcessor``): shorter side resized to the
  checkpoint's ``shortest_edge`` (336 for LLaVA-NeXT-Video-7B; the class default is 224), bicubic
  with antialiasing, centre-cropped to ``crop_size``, CLIP's mean and std. The processor counts
  ``T x (336/14)^2 / 4 = T x 144`` placeholders (each frame's 24 x 24 patches pooled 2 x 2).

The images of both go through the families' PIL image processors
(``LlavaOnevisionImageProcessorPil``, ``LlavaNextImageProcessorPil``), which need no torchvision.
Where torchvision is installed, ``AutoProcessor`` and transformers' own video processors are used
and this module is not; tests/test_pooled_video_eval.py compares the two where both exist.
"""

from __future__ import annotations

from pathlib import Path
from types import MappingProxyType

from .torch_video_processor import (
    CLIP_MEAN,
    CLIP_STD,
    TorchVideoProcessor,
    load_torch_processor,
    save_torch_processor,
    torch_processor,
)


class TorchLlavaOnevisionVideoProcessor(TorchVideoProcessor):
    """``LlavaOnevisionVideoProcessor``'s preprocessing of sampled frames, with torch alone."""

    transformers_class = "LlavaOnevisionVideoProcessor"
    family = "LLaVA-OneVision"
    defaults = MappingProxyType(dict(
        size={"height": 384, "width": 384}, crop_size=None, resample=3, do_resize=True, do_center_crop=False,
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True, image_mean=CLIP_MEAN, image_std=CLIP_STD))


class TorchLlavaNextVideoVideoProcessor(TorchVideoProcessor):
    """``LlavaNextVideoVideoProcessor``'s preprocessing of sampled frames, with torch alone."""

    transformers_class = "LlavaNextVideoVideoProcessor"
    family = "LLaVA-NeXT-Video"
    # its defaults are the base's (transformers' CLIP-224 ones)


def torch_llava_onevision_processor(image_processor, tokenizer, chat_template: str | None = None,
                                    video_processor: TorchLlavaOnevisionVideoProcessor | None = None, **settings):
    """``LlavaOnevisionProcessor`` with ficoco's torch-only video preprocessing; ``settings``: the
    processor's own (``num_image_tokens``, ``vision_feature_select_strategy``, ...)."""
    from transformers import LlavaOnevisionProcessor

    return torch_processor(LlavaOnevisionProcessor, image_processor, tokenizer,
                           video_processor or TorchLlavaOnevisionVideoProcessor(), chat_template, **settings)


def torch_llava_next_video_processor(image_processor, tokenizer, chat_template: str | None = None,
                                     video_processor: TorchLlavaNextVideoVideoProcessor | None = None, **settings):
    """``LlavaNextVideoProcessor`` with ficoco's torch-only video preprocessing; ``settings``: the
    processor's own (``patch_size``, ``vision_feature_select_strategy``, ...)."""
    from transformers import LlavaNextVideoProcessor

    return torch_processor(LlavaNextVideoProcessor, image_processor, tokenizer,
                           video_processor or TorchLlavaNextVideoVideoProcessor(), chat_template, **settings)


def load_torch_llava_onevision_processor(folder: str | Path):
    """:func:`torch_llava_onevision_processor` from what is saved in ``folder``."""
    from transformers import LlavaOnevisionProcessor
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    return load_torch_processor(folder, LlavaOnevisionProcessor, LlavaOnevisionImageProcessorPil,
                                TorchLlavaOnevisionVideoProcessor)


def load_torch_llava_next_video_processor(folder: str | Path):
    """:func:`torch_llava_next_video_processor` from what is saved in ``folder``."""
    from transformers import LlavaNextVideoProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import (
        LlavaNextImageProcessorPil,
    )

    return load_torch_processor(folder, LlavaNextVideoProcessor, LlavaNextImageProcessorPil,
                                TorchLlavaNextVideoVideoProcessor)


def save_torch_llava_onevision_processor(processor, folder: str | Path) -> None:
    """Save a :func:`torch_llava_onevision_processor` as transformers saves
    ``LlavaOnevisionProcessor`` (``AutoProcessor`` loads it where torchvision is installed)."""
    save_torch_processor(processor, folder, "LlavaOnevisionProcessor")


def save_torch_llava_next_video_processor(processor, folder: str | Path) -> None:
    """Save a :func:`torch_llava_next_video_processor` as transformers saves
    ``LlavaNextVideoProcessor`` (``AutoProcessor`` loads it where torchvision is installed)."""
    save_torch_processor(processor, folder, "LlavaNextVideoProcessor")
