"""Which model family a model belongs to, and attaching a method to it.

One module per family implements :class:`~ficoco.adapters.handle.ReductionHandle` for its models;
this registry maps Hugging Face classes and ``config.model_type`` values to them, so that
:func:`attach` and the command line pick the family from the model or checkpoint. Adding a family
is one new module and one row here.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from types import MappingProxyType

from torch import nn

from ..methods import Method
from .handle import ReductionHandle


@dataclass(frozen=True)
class Family:
    """A model family ficoco runs.

    Attributes:
        name: the family's name in messages and ``ficoco`` output.
        model_types: the ``config.model_type`` values of its checkpoints.
        classes: names of the Hugging Face model classes it attaches to.
        handle: builds the handle (imported on first use).
        resolution_handle: the handle of a method that changes the image's resolution
            (``downsample``), where the family has one of its own (``None``: ``handle`` runs it).
    """

    name: str
    model_types: tuple[str, ...]
    classes: tuple[str, ...]
    handle: Callable[[], type[ReductionHandle]]
    resolution_handle: Callable[[], type[ReductionHandle]] | None = None


def _llava() -> type[ReductionHandle]:
    from .llava import LlavaHandle

    return LlavaHandle


def _llava_next() -> type[ReductionHandle]:
    from .llava_next import LlavaNextHandle

    return LlavaNextHandle


def _llava_next_video() -> type[ReductionHandle]:
    from .llava_next_video import LlavaNextVideoHandle

    return LlavaNextVideoHandle


def _llava_onevision() -> type[ReductionHandle]:
    from .llava_onevision import LlavaOnevisionHandle

    return LlavaOnevisionHandle


def _video_llava() -> type[ReductionHandle]:
    from .video_llava import VideoLlavaHandle

    return VideoLlavaHandle


def _qwen_vl() -> type[ReductionHandle]:
    from .qwen_vl import QwenVLHandle

    return QwenVLHandle


def _qwen_resolution() -> type[ReductionHandle]:
    from .qwen_resolution import QwenResolutionHandle

    return QwenResolutionHandle


#: ``config.model_type`` of the Qwen-VL generations ficoco runs
QWEN_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")

FAMILIES: tuple[Family, ...] = (
    Family("LLaVA-1.5", ("llava",), ("LlavaForConditionalGeneration", "LlavaModel"), _llava),
    Family("LLaVA-NeXT", ("llava_next",), ("LlavaNextForConditionalGeneration", "LlavaNextModel"), _llava_next),
    Family("LLaVA-NeXT-Video", ("llava_next_video",),
           ("LlavaNextVideoForConditionalGeneration", "LlavaNextVideoModel"), _llava_next_video),
    Family("LLaVA-OneVision", ("llava_onevision",),
           ("LlavaOnevisionForConditionalGeneration", "LlavaOnevisionModel"), _llava_onevision),
    Family("Video-LLaVA", ("video_llava",), ("VideoLlavaForConditionalGeneration", "VideoLlavaModel"), _video_llava),
    Family("Qwen2-VL / Qwen2.5-VL / Qwen3-VL", QWEN_MODEL_TYPES,
           ("Qwen2VLForConditionalGeneration", "Qwen2VLModel", "Qwen2_5_VLForConditionalGeneration",
            "Qwen2_5_VLModel", "Qwen3VLForConditionalGeneration", "Qwen3VLModel"), _qwen_vl, _qwen_resolution),
)
#: ``model_type`` -> family
BY_MODEL_TYPE = MappingProxyType({t: f for f in FAMILIES for t in f.model_types})


def supported() -> str:
    """``"LLaVA-1.5 (llava); Qwen2-VL / ... (qwen2_vl, ...)"``, for messages."""
    return "; ".join(f"{f.name} ({', '.join(f.model_types)})" for f in FAMILIES)


def family_of_model_type(model_type: str | None, where: object = "this checkpoint") -> Family:
    """The family of a checkpoint's ``config.model_type``, or one line naming the supported ones."""
    family = BY_MODEL_TYPE.get(model_type)
    if family is None:
        raise ValueError(f"{where} is a {model_type!r} model; ficoco runs {supported()}")
    return family


def family_of(model: nn.Module) -> Family:
    """The family of a loaded Hugging Face model, by class."""
    name = type(model).__name__
    ancestry = {cls.__name__ for cls in type(model).__mro__}
    for family in FAMILIES:
        if ancestry & set(family.classes):
            return family
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    raise TypeError(f"ficoco supports {supported()}; got {name}"
                    + (f" ({model_type})" if model_type else ""))


def attach(model: nn.Module, method: Method | str, *, record: bool = False, **options) -> ReductionHandle:
    """Attach ``method`` (a :class:`Method` or a registered name with ``options``) to ``model``."""
    if isinstance(method, str):
        from ..methods import get_method

        method = get_method(method, **options)
    elif options:
        raise ValueError("options are only accepted together with a method name")
    family = family_of(model)
    load = family.resolution_handle if method.resolution is not None and family.resolution_handle else family.handle
    return load()(model, method, record=record)


@contextmanager
def apply(model: nn.Module, method: Method | str, *, record: bool = False, **options):
    """Context manager: ``with apply(model, "ficoco-v", retain=192): model.generate(...)``."""
    handle = attach(model, method, record=record, **options)
    try:
        yield handle
    finally:
        handle.remove()
