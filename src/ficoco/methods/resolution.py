"""The ``downsample`` control: the image itself at a lower resolution (docs/methods.md).

Independent comparisons found plain downsampling ahead of many published token-reduction methods,
so the control has to be the honest one: the vision encoder runs on the smaller image (fewer
patches, a cheaper tower) and the LLM gets one token per patch of it, nothing pooled or chosen.
``pool`` differs: it runs the whole tower at full resolution and averages the projected tokens.
"""

from __future__ import annotations

from .base import Method, ResolutionReduction


def downsample(retain: int | float = 144, *, max_aspect: float = 2.0) -> Method:
    """The image resized (bicubic, antialiased) to the patch grid of ``retain`` tokens before the
    encoder: on LLaVA-1.5 exactly ``retain`` (144 = 12x12 patches, a 168-px image; 192 = 16x12 and
    128 = 16x8, the image stretched at most ``max_aspect``), on Qwen-VL each image keeps its
    aspect and gets at most ``retain`` (a count or a share of its tokens)."""
    return Method("downsample", resolution=ResolutionReduction(retain, max_aspect),
                  description="the image at a lower resolution (fewer patches through the encoder)")
