"""transformers' video preprocessing of the LLaVA video families, with torch alone.

transformers' video processors (``BaseVideoProcessor`` and the classes built on it:
``VideoLlavaVideoProcessor``, ``LlavaOnevisionVideoProcessor``, ``LlavaNextVideoVideoProcessor``)
need torchvision, which ficoco does not require, and without a video processor ``AutoProcessor``
cannot build those families' processors. :class:`TorchVideoProcessor` does the work of
``BaseVideoProcessor._preprocess`` on frames that are already sampled
(:mod:`ficoco.evaluation.video_frames`), read from transformers 5.17-5.24's
``video_processing_utils.py`` and ``image_processing_backends.py`` (``TorchvisionBackend``):

1. **resize** (``do_resize``), every frame of a video as one block: ``size={"shortest_edge": s}``
   makes the shorter side ``s`` and the longer ``int(s * long / short)`` (transformers'
   ``get_resize_output_image_size`` with ``default_to_square=False``); ``size={"height": h,
   "width": w}`` makes it ``h x w`` whatever its aspect. Bicubic (``resample=3``) or bilinear
   (``2``) with antialiasing on the ``uint8`` frames: torch's own kernel, which torchvision's
   ``resize`` runs for ``uint8`` tensors on the CPU, so the resized frames are the same bytes;
2. **centre crop** (``do_center_crop``) to ``crop_size``: offsets ``int((side - crop) / 2)``
   (truncated); a frame smaller than the crop is zero-padded first, ``(crop - side) // 2`` before
   and the rest after (``TorchvisionBackend.center_crop``);
3. **rescale and normalise**, fused as transformers fuses them: mean and std are float32 tensors
   multiplied by ``1 / rescale_factor``, and the frames become ``(x - mean') / std'`` in float32.

The result is ``pixel_values_videos`` of shape ``(videos, T, 3, H, W)``. A subclass names the
transformers class it stands in for and that class's defaults (what a checkpoint's configuration
does not set). :func:`torch_processor`, :func:`load_torch_processor` and
:func:`save_torch_processor` build, load and save a family's transformers processor (its text side,
image processor and placeholder counting unchanged) with such a video processor in it.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import ClassVar

import torch
import torch.nn.functional as F

from .video_pixels import as_frames, video_list

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CHAT_TEMPLATE_FILE = "chat_template.jinja"
#: the settings of a video processor's configuration that decide its pixels
SETTINGS = ("size", "crop_size", "resample", "do_resize", "do_center_crop", "do_rescale", "rescale_factor",
            "do_normalize", "image_mean", "image_std")
#: PIL resampling codes (transformers' ``resample``) -> ``F.interpolate`` modes that antialias
_MODES = MappingProxyType({2: "bilinear", 3: "bicubic"})
#: a processor's ``__init__`` parameters that are its parts, not its settings
_PARTS = frozenset({"self", "image_processor", "video_processor", "tokenizer", "chat_template", "kwargs"})


class TorchVideoProcessor:
    """A transformers video processor's preprocessing of sampled frames, with torch alone.

    Keyword arguments are the configuration's own (:data:`SETTINGS`); ``None`` or absent takes the
    class default (:attr:`defaults`, the transformers class's). ``size`` is ``{"shortest_edge": s}``
    or ``{"height": h, "width": w}``; ``crop_size`` ``{"height": h, "width": w}``.
    """

    #: the transformers class this stands in for (named in a saved configuration)
    transformers_class: ClassVar[str] = "BaseVideoProcessor"
    #: the family named in error messages
    family: ClassVar[str] = "the model"
    #: that class's defaults; these (CLIP at 224: shortest edge, centre crop) are
    #: ``VideoLlavaVideoProcessor``'s and ``LlavaNextVideoVideoProcessor``'s alike
    defaults: ClassVar[Mapping[str, object]] = MappingProxyType(dict(
        size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}, resample=3, do_resize=True,
        do_center_crop=True, do_rescale=True, rescale_factor=1 / 255, do_normalize=True, image_mean=CLIP_MEAN,
        image_std=CLIP_STD))

    def __init__(self, **settings) -> None:
        unknown = sorted(set(settings) - set(SETTINGS))
        if unknown:
            raise TypeError(f"{type(self).__name__} has no setting {', '.join(unknown)}; it takes "
                            f"{', '.join(SETTINGS)}")
        values = {**self.defaults, **{k: v for k, v in settings.items() if v is not None}}
        self.size = {k: int(v) for k, v in dict(values["size"] or {}).items() if v is not None}
        self.crop_size = ({k: int(v) for k, v in dict(values["crop_size"]).items() if v is not None}
                          if values["crop_size"] else None)
        self.resample = int(values["resample"])
        self.do_resize, self.do_center_crop = bool(values["do_resize"]), bool(values["do_center_crop"])
        self.do_rescale, self.do_normalize = bool(values["do_rescale"]), bool(values["do_normalize"])
        self.rescale_factor = float(values["rescale_factor"])
        self.image_mean = tuple(float(x) for x in values["image_mean"])
        self.image_std = tuple(float(x) for x in values["image_std"])
        if self.do_resize and set(self.size) not in ({"shortest_edge"}, {"height", "width"}):
            raise ValueError(f"{self.transformers_class} size={self.size} is not supported without torchvision: "
                             f"give {{'shortest_edge': s}} or {{'height': h, 'width': w}}")
        if self.do_resize and self.resample not in _MODES:
            raise ValueError(f"{self.transformers_class} resample={self.resample} is not supported without "
                             f"torchvision: 2 (bilinear) or 3 (bicubic)")
        if self.do_center_crop and set(self.crop_size or ()) != {"height", "width"}:
            raise ValueError(f"{self.transformers_class} center-crops but crop_size={self.crop_size} has no height "
                             f"and width")

    @classmethod
    def from_folder(cls, folder: str | Path) -> TorchVideoProcessor:
        """The video preprocessing saved in ``folder``, found where transformers looks for it: the
        ``video_processor`` entry of ``processor_config.json``, else ``video_preprocessor_config.json``,
        else ``preprocessor_config.json`` (the image processor's); the class defaults otherwise."""
        return cls(**{k: v for k, v in saved_video_config(folder).items() if k in SETTINGS})

    def to_dict(self) -> dict:
        """This preprocessing as transformers saves the class it stands in for."""
        return {"video_processor_type": self.transformers_class, "size": dict(self.size),
                "crop_size": dict(self.crop_size) if self.crop_size else None, "resample": self.resample,
                "do_resize": self.do_resize, "do_center_crop": self.do_center_crop, "do_rescale": self.do_rescale,
                "rescale_factor": self.rescale_factor, "do_normalize": self.do_normalize,
                "image_mean": list(self.image_mean), "image_std": list(self.image_std), "do_convert_rgb": True,
                "do_sample_frames": False, "default_to_square": False}

    def __repr__(self) -> str:
        crop = f", crop_size={self.crop_size}" if self.do_center_crop else ""
        return (f"{type(self).__name__}(size={self.size}{crop}, resample={self.resample}, "
                f"image_mean={self.image_mean}, image_std={self.image_std})")

    def __call__(self, videos, return_tensors=None, do_sample_frames=None, **_ignored):
        """``pixel_values_videos`` ``(videos, T, 3, H, W)`` of ``videos``: a list of videos, each
        ``(T, H, W, 3)`` uint8 frames (array or tensor) or a list of PIL frames. Other keyword
        arguments of the processor's call (text padding, ...) do not concern the video pixels."""
        from transformers.feature_extraction_utils import BatchFeature

        if do_sample_frames:
            raise ValueError("frames are sampled before they reach ficoco's video preprocessing: pass do_sample_frames="
                             "False with the frames the model expects (ficoco.evaluation.video_frames)")
        clips = [self.preprocess(as_frames(video)) for video in video_list(videos)]
        if len({clip.shape[0] for clip in clips}) > 1:
            raise ValueError(f"{self.family}'s videos in one call must have as many frames each; got "
                             f"{[clip.shape[0] for clip in clips]}")
        if len({clip.shape for clip in clips}) > 1:
            raise ValueError(f"{self.family}'s videos in one call must come out the same size; got "
                             f"{[tuple(clip.shape[-2:]) for clip in clips]} (frames of different aspect ratios)")
        return BatchFeature(data={"pixel_values_videos": torch.stack(clips)})

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """``(height, width)`` a ``height x width`` frame is resized to."""
        if not self.do_resize:
            return height, width
        if "shortest_edge" in self.size:
            edge = self.size["shortest_edge"]
            short, long = (width, height) if width <= height else (height, width)
            new_long = int(edge * long / short)
            return (new_long, edge) if width <= height else (edge, new_long)
        return self.size["height"], self.size["width"]

    def preprocess(self, frames: torch.Tensor) -> torch.Tensor:
        """``(T, 3, H, W)`` uint8 frames -> ``(T, 3, H', W')`` pixel values (float32 when normalised
        or rescaled)."""
        size = self.output_size(*frames.shape[-2:])
        if size != tuple(frames.shape[-2:]):
            frames = F.interpolate(frames, size=size, mode=_MODES[self.resample], align_corners=False, antialias=True)
        if self.do_center_crop:
            frames = self._center_crop(frames)
        if self.do_rescale and self.do_normalize:
            scale = 1.0 / self.rescale_factor
            mean = (torch.tensor(self.image_mean) * scale).view(1, -1, 1, 1)
            std = (torch.tensor(self.image_std) * scale).view(1, -1, 1, 1)
            return (frames.float() - mean) / std
        if self.do_normalize:
            mean = torch.tensor(self.image_mean).view(1, -1, 1, 1)
            return (frames.float() - mean) / torch.tensor(self.image_std).view(1, -1, 1, 1)
        return frames * self.rescale_factor if self.do_rescale else frames

    def _center_crop(self, frames: torch.Tensor) -> torch.Tensor:
        crop_h, crop_w = self.crop_size["height"], self.crop_size["width"]
        height, width = frames.shape[-2:]
        if crop_h > height or crop_w > width:
            pad_w, pad_h = max(crop_w - width, 0), max(crop_h - height, 0)
            frames = F.pad(frames, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
            height, width = frames.shape[-2:]
        top, left = int((height - crop_h) / 2.0), int((width - crop_w) / 2.0)  # truncated, as transformers does
        return frames[..., top:top + crop_h, left:left + crop_w]


def saved_video_config(folder: str | Path) -> dict:
    """The video processor's configuration saved in ``folder`` (empty when there is none), in the
    order transformers' ``get_video_processor_dict`` reads them."""
    folder = Path(folder)
    combined = folder / "processor_config.json"
    if combined.is_file():
        video = json.loads(combined.read_text()).get("video_processor")
        if isinstance(video, dict):
            return video
    for name in ("video_preprocessor_config.json", "preprocessor_config.json"):
        if (folder / name).is_file():
            return json.loads((folder / name).read_text())
    return {}


def processor_settings(processor_class: type) -> tuple[str, ...]:
    """The settings a transformers processor class takes besides its parts (``patch_size``,
    ``num_image_tokens``, ``video_token``, ...): its ``__init__`` parameters."""
    return tuple(p for p in inspect.signature(processor_class.__init__).parameters if p not in _PARTS)


def _with_torch_videos(processor_class: type) -> type:
    """``processor_class`` taking a :class:`TorchVideoProcessor` as its video processor (the class
    check asks for transformers' torchvision-based ``VideoProcessorMixin``)."""
    def check_argument_for_proper_class(self, argument_name, argument):
        if argument_name == "video_processor" and isinstance(argument, TorchVideoProcessor):
            return None  # no torchvision: videos through ficoco's torch-only preprocessing
        return processor_class.check_argument_for_proper_class(self, argument_name, argument)

    return type(f"Torch{processor_class.__name__}", (processor_class,),
                {"check_argument_for_proper_class": check_argument_for_proper_class, "__module__": __name__})


def torch_processor(processor_class: type, image_processor, tokenizer, video_processor: TorchVideoProcessor,
                    chat_template: str | None = None, **settings):
    """A ``processor_class`` (transformers') built from its image processor and tokenizer, with
    ``video_processor`` doing the video preprocessing; ``settings``: the processor's own."""
    return _with_torch_videos(processor_class)(image_processor=image_processor, tokenizer=tokenizer,
                                               video_processor=video_processor, chat_template=chat_template,
                                               **settings)


def load_torch_processor(folder: str | Path, processor_class: type, image_processor_class: type,
                         video_processor_class: type[TorchVideoProcessor]):
    """:func:`torch_processor` from the image processor, tokenizer, chat template, video
    preprocessing and processor settings saved in ``folder`` (by transformers or by
    :func:`save_torch_processor`)."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    template = folder / CHAT_TEMPLATE_FILE
    config = folder / "processor_config.json"
    saved = json.loads(config.read_text()) if config.is_file() else {}
    settings = {k: saved[k] for k in processor_settings(processor_class) if k in saved}
    return torch_processor(processor_class, image_processor_class.from_pretrained(folder, local_files_only=True),
                           AutoTokenizer.from_pretrained(folder, local_files_only=True),
                           video_processor_class.from_folder(folder),
                           template.read_text() if template.is_file() else None, **settings)


def save_torch_processor(processor, folder: str | Path, processor_class: str) -> None:
    """Save a :func:`torch_processor` as transformers saves ``processor_class`` (tokenizer, image
    processor, chat template, ``processor_config.json`` naming the class, the video processor's
    configuration), so that ``AutoProcessor`` loads it where torchvision is installed and
    :func:`load_torch_processor` where it is not."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    processor.tokenizer.save_pretrained(folder)
    processor.image_processor.save_pretrained(folder)
    if processor.chat_template:
        (folder / CHAT_TEMPLATE_FILE).write_text(processor.chat_template)
    settings = {k: getattr(processor, k) for k in processor_settings(type(processor))
                if getattr(processor, k, None) is not None}
    (folder / "processor_config.json").write_text(json.dumps({"processor_class": processor_class, **settings},
                                                             indent=2) + "\n")
    (folder / "video_preprocessor_config.json").write_text(json.dumps(processor.video_processor.to_dict(),
                                                                      indent=2) + "\n")
