"""The LLaVA-OneVision family: ``LlavaOnevisionForConditionalGeneration`` / ``LlavaOnevisionModel``.

LLaVA-OneVision is LLaVA-NeXT's anyres layout on a SigLIP tower, so this family is
:class:`~.llava_next.LlavaNextHandle` with three differences (docs/methods.md, "LLaVA-OneVision"):

- **tower**: SigLIP-384/14 (27 x 27 = 729 patches per crop, no [CLS]), features from the last
  layer kept, ``vision_feature_select_strategy="full"`` (every patch). Methods needing [CLS] run
  their stand-ins (:meth:`~ficoco.methods.Method.without_cls`);
- **anyres_max_N** (``config.vision_aspect_ratio``): an unpadded tiles' grid larger than
  ``1.1² x N`` crops' worth of patches is resized (bilinear) before the newline tokens are added
  (:class:`~.anyres.OnevisionLayout`). Inside the LLM the resized tokens are the candidates;
  before it, reduced crops are packed as on LLaVA-NeXT (no unpadding, no resize, no newlines), so
  ``retain`` stays per crop: ``crops x k``;
- **what is refused** besides LLaVA-NeXT's refusals: videos (``pixel_values_videos``: frames are
  pooled 2 x 2 after the projector, a per-frame budget is not built yet) and samples of several
  images (``batch_num_images`` above 1: OneVision then encodes each image as its base crop only).
"""

from __future__ import annotations

from torch import Tensor, nn

from ..methods import Method
from .anyres import OnevisionLayout, onevision_layout
from .llava_next import LlavaNextHandle


def _parts(model: nn.Module) -> tuple[nn.Module, nn.Module | None]:
    """``(LlavaOnevisionModel, LlavaOnevisionForConditionalGeneration or None)`` or a clear error."""
    from transformers import LlavaOnevisionForConditionalGeneration, LlavaOnevisionModel

    if isinstance(model, LlavaOnevisionForConditionalGeneration):
        return model.model, model
    if isinstance(model, LlavaOnevisionModel):
        return model, None
    raise TypeError(f"ficoco's LLaVA-OneVision family takes LlavaOnevisionForConditionalGeneration and "
                    f"LlavaOnevisionModel; got {type(model).__name__}")


def max_crops(vision_aspect_ratio: str) -> int:
    """``N`` of ``"anyres_max_N"``, or a clear error."""
    digits = str(vision_aspect_ratio).removeprefix("anyres_max_")
    if not digits.isdigit() or int(digits) < 1:
        raise ValueError(f"vision_aspect_ratio={vision_aspect_ratio!r} is not 'anyres_max_N', the only layout "
                         f"LLaVA-OneVision's packing knows")
    return int(digits)


class LlavaOnevisionHandle(LlavaNextHandle):
    """A method attached to a Hugging Face LLaVA-OneVision model (images; see the module docstring).

    Attributes:
        max_crops: ``N`` of the model's ``anyres_max_N``.
    """

    family = "llava-onevision"
    family_name = "LLaVA-OneVision"

    @staticmethod
    def _parts(model: nn.Module) -> tuple[nn.Module, nn.Module | None]:
        return _parts(model)

    def __init__(self, model: nn.Module, method: Method, *, record: bool = False) -> None:
        llava, _ = _parts(model)
        self.max_crops = max_crops(getattr(llava.config, "vision_aspect_ratio", "anyres_max_9"))
        super().__init__(model, method, record=record)

    def _install(self) -> None:
        # registered first, so that the refusal comes before any rewriting hook runs
        self.hooks.pre(self.llava, self._refuse_unsupported, with_kwargs=True)
        if self.outer is not None:
            self.hooks.pre(self.outer, self._refuse_unsupported, with_kwargs=True)
        # the encoder itself refuses too, whatever runs before it (decoder-side hooks, generate)
        self._wrap(self.llava, "get_video_features", self._refuse_videos)
        super()._install()

    def _refuse_videos(self, original):
        def get_video_features(*args, **kwargs):
            self._check({"pixel_values_videos": True})
            return original(*args, **kwargs)

        return get_video_features

    def _layout(self, size: tuple[int, int]) -> OnevisionLayout:
        return onevision_layout(size, self.pinpoints, self.crop_size, self.patch_size, self.max_crops)

    def _refuse_unsupported(self, module, args, kwargs) -> None:
        bound = self._signatures[id(module)].bind_partial(module, *args, **kwargs).arguments
        self._check({**bound.get("kwargs", {}), **bound})

    def _check(self, inputs: dict) -> None:
        if inputs.get("pixel_values_videos") is not None:
            raise ValueError(f"{self.method.name} on LLaVA-OneVision takes images only; videos (pixel_values_videos, "
                             f"frames pooled 2x2 after the projector) are not supported yet")
        counts = inputs.get("batch_num_images")
        if counts is not None and any(int(n) != 1 for n in (counts.tolist() if isinstance(counts, Tensor) else counts)):
            raise ValueError(f"{self.method.name} on LLaVA-OneVision takes one image per sample; batch_num_images="
                             f"{[int(n) for n in counts]} makes the model encode each image of a multi-image sample "
                             f"as its base crop only, which is not supported yet")

    def _rewrite(self, inputs: dict, default_side: str = "right") -> dict:
        self._check(inputs)
        return super()._rewrite(inputs, default_side)
