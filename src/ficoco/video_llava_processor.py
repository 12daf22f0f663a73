"""Video-LLaVA's processor on machines without torchvision.

transformers' ``VideoLlavaProcessor`` cannot be built (nor loaded with ``AutoProcessor``) without
a video processor, and ``VideoLlavaVideoProcessor`` is built on torchvision, which ficoco does not
require. :class:`TorchVideoLlavaVideoProcessor` does its work with torch alone, on frames that are
already sampled (:mod:`ficoco.evaluation.video_frames` samples Video-LLaVA's 8):

1. each video of ``T`` frames is resized as one block so that its shorter side is
   ``shortest_edge`` (224) pixels, the longer ``int(224 * long / short)`` (transformers'
   ``get_resize_output_image_size``), bicubic with antialiasing on the ``uint8`` frames: torch's
   own kernel, which torchvision's ``resize`` runs for ``uint8`` tensors on the CPU;
2. centre-cropped to ``crop_size`` (224 x 224; offsets truncated, as transformers' ``center_crop``);
3. normalised as the video processor's fused rescale-and-normalise does:
   ``(x - 255 mean) / (255 std)`` in float32, CLIP's mean and std.

The result is ``pixel_values_videos`` of shape ``(videos, T, 3, 224, 224)``, from which the
processor counts ``T x (256 + 1)`` video placeholders. Where torchvision is installed,
``AutoProcessor`` and transformers' own video processor are used and this module is not;
tests/test_video_llava_processor.py compares the two where both exist.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from .video_pixels import as_frames, video_list

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CHAT_TEMPLATE_FILE = "chat_template.jinja"
#: ``VideoLlavaProcessor``'s own settings, read from ``processor_config.json`` when it has them
PROCESSOR_SETTINGS = ("patch_size", "vision_feature_select_strategy", "num_additional_image_tokens", "image_token",
                      "video_token")


class TorchVideoLlavaVideoProcessor:
    """``VideoLlavaVideoProcessor``'s preprocessing of sampled frames, with torch alone.

    Args:
        shortest_edge: the shorter side after resizing (pixels).
        crop_size: ``(height, width)`` of the centre crop.
        image_mean / image_std: per-channel normalisation.
        rescale_factor: the factor that brings ``uint8`` values to ``[0, 1]``.
    """

    def __init__(self, shortest_edge: int = 224, crop_size: tuple[int, int] = (224, 224),
                 image_mean=CLIP_MEAN, image_std=CLIP_STD, rescale_factor: float = 1 / 255) -> None:
        self.shortest_edge = int(shortest_edge)
        self.crop_size = (int(crop_size[0]), int(crop_size[1]))
        self.image_mean, self.image_std = tuple(float(x) for x in image_mean), tuple(float(x) for x in image_std)
        self.rescale_factor = float(rescale_factor)

    @classmethod
    def from_folder(cls, folder: str | Path) -> "TorchVideoLlavaVideoProcessor":
        """The video preprocessing of the checkpoint in ``folder``: its
        ``video_preprocessor_config.json``, else its ``preprocessor_config.json`` (the image
        processor's settings, which Video-LLaVA's video processor shares), over the defaults."""
        folder = Path(folder)
        for name in ("video_preprocessor_config.json", "preprocessor_config.json"):
            path = folder / name
            if path.is_file():
                config = json.loads(path.read_text())
                size, crop = config.get("size") or {}, config.get("crop_size") or {}
                options = {}
                if "shortest_edge" in size:
                    options["shortest_edge"] = size["shortest_edge"]
                if "height" in crop and "width" in crop:
                    options["crop_size"] = (crop["height"], crop["width"])
                options.update({k: config[k] for k in ("image_mean", "image_std", "rescale_factor")
                                if config.get(k) is not None})
                return cls(**options)
        return cls()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(shortest_edge={self.shortest_edge}, crop_size={self.crop_size}, "
                f"image_mean={self.image_mean}, image_std={self.image_std})")

    def __call__(self, videos, return_tensors=None, do_sample_frames=None, **_ignored):
        """``pixel_values_videos`` ``(videos, T, 3, crop_h, crop_w)`` of ``videos``: a list of videos,
        each ``(T, H, W, 3)`` uint8 frames (array or tensor) or a list of PIL frames. Other keyword
        arguments of the processor's call (text padding, ...) do not concern the video pixels."""
        from transformers.feature_extraction_utils import BatchFeature

        if do_sample_frames:
            raise ValueError("frames are sampled before they reach ficoco's video preprocessing: pass do_sample_frames="
                             "False with the frames the model expects (ficoco.evaluation.video_frames)")
        clips = [self.preprocess(as_frames(video)) for video in video_list(videos)]
        if len({clip.shape[0] for clip in clips}) > 1:
            raise ValueError(f"Video-LLaVA's videos in one call must have as many frames each; got "
                             f"{[clip.shape[0] for clip in clips]}")
        return BatchFeature(data={"pixel_values_videos": torch.stack(clips)})

    def preprocess(self, frames: torch.Tensor) -> torch.Tensor:
        """``(T, 3, H, W)`` uint8 frames -> ``(T, 3, crop_h, crop_w)`` float32 pixel values."""
        height, width = frames.shape[-2:]
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = self.shortest_edge, int(self.shortest_edge * long / short)
        size = (new_long, new_short) if width <= height else (new_short, new_long)
        if size != (height, width):
            frames = F.interpolate(frames, size=size, mode="bicubic", align_corners=False, antialias=True)
        crop_h, crop_w = self.crop_size
        if size[0] < crop_h or size[1] < crop_w:
            raise ValueError(f"a frame resized to {size} is smaller than the {self.crop_size} crop")
        top, left = int((size[0] - crop_h) / 2.0), int((size[1] - crop_w) / 2.0)  # truncated, as transformers does
        frames = frames[..., top:top + crop_h, left:left + crop_w]
        scale = 1.0 / self.rescale_factor
        mean = torch.tensor([m * scale for m in self.image_mean]).view(1, -1, 1, 1)
        std = torch.tensor([s * scale for s in self.image_std]).view(1, -1, 1, 1)
        return (frames.float() - mean) / std


def _processor_class() -> type:
    from transformers import VideoLlavaProcessor

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument_name == "video_processor" and isinstance(argument, TorchVideoLlavaVideoProcessor):
            return None  # no torchvision: videos through ficoco's torch-only preprocessing
        return VideoLlavaProcessor.check_argument_for_proper_class(self, argument_name, argument)

    return type("TorchVideoLlavaProcessor", (VideoLlavaProcessor,),
                {"check_argument_for_proper_class": check_argument_for_proper_class, "__module__": __name__})


def torch_video_llava_processor(image_processor, tokenizer, chat_template: str | None = None,
                                video_processor: TorchVideoLlavaVideoProcessor | None = None, **settings):
    """``VideoLlavaProcessor`` built from an image processor and a tokenizer, with ficoco's
    torch-only video preprocessing; ``settings``: the processor's own (``patch_size``, ...)."""
    return _processor_class()(image_processor=image_processor, tokenizer=tokenizer,
                              video_processor=video_processor or TorchVideoLlavaVideoProcessor(),
                              chat_template=chat_template, **settings)


def load_torch_video_llava_processor(folder: str | Path):
    """:func:`torch_video_llava_processor` from the image processor, tokenizer, chat template and
    processor settings saved in ``folder``."""
    from transformers import AutoTokenizer, VideoLlavaImageProcessor

    folder = Path(folder)
    template = folder / CHAT_TEMPLATE_FILE
    settings = {}
    config = folder / "processor_config.json"
    if config.is_file():
        saved = json.loads(config.read_text())
        settings = {k: saved[k] for k in PROCESSOR_SETTINGS if k in saved}
    return torch_video_llava_processor(VideoLlavaImageProcessor.from_pretrained(folder, local_files_only=True),
                                       AutoTokenizer.from_pretrained(folder, local_files_only=True),
                                       template.read_text() if template.is_file() else None,
                                       TorchVideoLlavaVideoProcessor.from_folder(folder), **settings)


def save_torch_video_llava_processor(processor, folder: str | Path) -> None:
    """Save a :func:`torch_video_llava_processor` as transformers saves ``VideoLlavaProcessor``
    (tokenizer, image processor, chat template, ``processor_config.json`` naming the class), so
    that ``AutoProcessor`` loads it where torchvision is installed and
    :func:`load_torch_video_llava_processor` where it is not."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    processor.tokenizer.save_pretrained(folder)
    processor.image_processor.save_pretrained(folder)
    if processor.chat_template:
        (folder / CHAT_TEMPLATE_FILE).write_text(processor.chat_template)
    video = processor.video_processor
    settings = {"processor_class": "VideoLlavaProcessor",
                **{k: getattr(processor, k) for k in PROCESSOR_SETTINGS if getattr(processor, k, None) is not None}}
    (folder / "processor_config.json").write_text(json.dumps(settings, indent=2) + "\n")
    (folder / "video_preprocessor_config.json").write_text(json.dumps({
        "video_processor_type": "VideoLlavaVideoProcessor", "size": {"shortest_edge": video.shortest_edge},
        "crop_size": {"height": video.crop_size[0], "width": video.crop_size[1]}, "image_mean": list(video.image_mean),
        "image_std": list(video.image_std), "rescale_factor": video.rescale_factor, "do_resize": True,
        "do_center_crop": True, "do_rescale": True, "do_normalize": True, "do_convert_rgb": True,
        "resample": 3, "default_to_square": False}, indent=2) + "\n")
