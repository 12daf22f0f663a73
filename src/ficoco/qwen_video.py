"""Qwen-VL video inputs without torchvision.

transformers' Qwen video processors (``Qwen2VLVideoProcessor`` for Qwen2-VL and Qwen2.5-VL,
``Qwen3VLVideoProcessor`` for Qwen3-VL) are built on torchvision, which ficoco does not require.
:class:`TorchQwenVideoProcessor` does their work on frames that are already sampled, with torch
alone, so that a Qwen-VL processor loaded without torchvision (:mod:`ficoco.qwen_processor`)
still takes ``videos=``:

1. each video, ``T`` frames of ``H x W`` RGB pixels, is resized as one block to ``h x w`` (both
   multiples of ``patch x merge``): Qwen2-VL / Qwen2.5-VL bound each frame's area by the
   processor's ``size`` (``shortest_edge`` / ``longest_edge`` pixels), Qwen3-VL bounds the area
   of all frames together; bicubic with antialiasing on the ``uint8`` frames, torch's own kernel,
   which is what torchvision's ``resize`` runs on the CPU (the same values to the last bit);
2. rescaled by ``1/255`` and normalised with the processor's mean and std;
3. padded to a multiple of ``temporal_patch_size`` frames by repeating the last one, and cut into
   patches of ``C x temporal_patch x patch x patch`` values in the processors' merge-group order:
   ``pixel_values_videos`` of shape ``(sum_i t_i * h_i * w_i, C * tp * p * p)`` and
   ``video_grid_thw`` of shape ``(videos, 3)`` (``t, h, w`` in patches);
4. the frames' :class:`~transformers.video_utils.VideoMetadata` (which frames of how many, at what
   rate) is handed on, from which the processor derives Qwen2.5-VL's ``second_per_grid_ts`` and
   Qwen3-VL's frame timestamps.

Frames are never sampled here (``do_sample_frames`` must be off): the caller samples them as the
model expects (:mod:`ficoco.evaluation.video_frames`). Where torchvision is installed, the
processor's own video processor is used and this module is not; a test compares the two there.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import MappingProxyType

import torch
import torch.nn.functional as F

from .torch_video_processor import CLIP_MEAN, CLIP_STD, saved_video_config
from .video_pixels import as_frames, video_list

#: the defaults of transformers' video processor of each generation (class attributes), used where
#: a checkpoint's configuration does not set them
_QWEN2_VIDEO = MappingProxyType(dict(
    patch_size=14, temporal_patch_size=2, merge_size=2, shortest_edge=128 * 28 * 28, longest_edge=28 * 28 * 768,
    image_mean=CLIP_MEAN, image_std=CLIP_STD, per_video_area=False))
_QWEN3_VIDEO = MappingProxyType(dict(
    patch_size=16, temporal_patch_size=2, merge_size=2, shortest_edge=128 * 32 * 32, longest_edge=32 * 32 * 768,
    image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5), per_video_area=True))
GENERATION_DEFAULTS = MappingProxyType({"qwen2_vl": _QWEN2_VIDEO, "qwen2_5_vl": _QWEN2_VIDEO, "qwen3_vl": _QWEN3_VIDEO})


def frame_size(frames: int, height: int, width: int, *, factor: int, shortest_edge: int, longest_edge: int,
               temporal_factor: int = 2, per_video_area: bool = False) -> tuple[int, int]:
    """``(h, w)`` the Qwen video processors resize ``frames`` frames of ``height x width`` to.

    Both sides become multiples of ``factor`` (``patch x merge``) keeping the aspect ratio; the
    area of a frame (``per_video_area``: of all ``frames``, rounded to ``temporal_factor``) is
    brought within ``[shortest_edge, longest_edge]`` pixels (transformers' ``smart_resize`` of
    Qwen2-VL and of Qwen3-VL's video processor)."""
    if per_video_area and (height < factor or width < factor):  # Qwen3-VL first scales tiny frames up
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"a video frame of {width}x{height} pixels is too elongated (aspect ratio above 200)")
    count = (round(frames / temporal_factor) * temporal_factor) if per_video_area else 1
    scale_frames = frames if per_video_area else 1
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if count * h * w > longest_edge:
        beta = math.sqrt(scale_frames * height * width / longest_edge)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif count * h * w < shortest_edge:
        beta = math.sqrt(shortest_edge / (scale_frames * height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


class TorchQwenVideoProcessor:
    """Qwen-VL video preprocessing of sampled frames, in torch alone (see the module docstring).

    Attributes:
        patch_size / temporal_patch_size / merge_size: as the checkpoint's processor.
        size: ``{"shortest_edge": ..., "longest_edge": ...}`` pixel bounds of the resize.
        image_mean / image_std: per-channel normalisation.
        per_video_area: Qwen3-VL's rule (the bounds hold for all frames together).
    """

    model_input_names = ["pixel_values_videos", "video_grid_thw"]

    def __init__(self, *, patch_size: int, temporal_patch_size: int, merge_size: int, shortest_edge: int,
                 longest_edge: int, image_mean, image_std, per_video_area: bool = False) -> None:
        self.patch_size, self.temporal_patch_size, self.merge_size = patch_size, temporal_patch_size, merge_size
        self.size = {"shortest_edge": int(shortest_edge), "longest_edge": int(longest_edge)}
        self.image_mean, self.image_std = tuple(float(x) for x in image_mean), tuple(float(x) for x in image_std)
        self.per_video_area = per_video_area

    @classmethod
    def from_folder(cls, folder: str | Path, model_type: str) -> "TorchQwenVideoProcessor":
        """The video preprocessing of the checkpoint in ``folder``, read where transformers reads it
        (:func:`~ficoco.torch_video_processor.saved_video_config`: ``processor_config.json``'s
        ``video_processor``, else ``video_preprocessor_config.json``, else the image processor's
        ``preprocessor_config.json``), over the generation's defaults."""
        try:
            settings = dict(GENERATION_DEFAULTS[model_type])
        except KeyError:
            raise ValueError(f"no Qwen-VL video preprocessing for model type {model_type!r}; one of "
                             f"{', '.join(GENERATION_DEFAULTS)}") from None
        config = saved_video_config(folder)
        size = config.get("size") or {}
        for key, alias in (("shortest_edge", "min_pixels"), ("longest_edge", "max_pixels")):
            value = size.get(key, config.get(alias))
            if value is not None:
                settings[key] = value
        settings.update({k: config[k] for k in ("patch_size", "temporal_patch_size", "merge_size", "image_mean",
                                                "image_std") if config.get(k) is not None})
        return cls(**settings)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(patch_size={self.patch_size}, temporal_patch_size={self.temporal_patch_size}, "
                f"merge_size={self.merge_size}, size={self.size}, per_video_area={self.per_video_area})")

    def __call__(self, videos, video_metadata=None, return_metadata: bool = False, do_sample_frames=None,
                 return_tensors=None, **_ignored):
        """``pixel_values_videos`` ``(patches, C * tp * p * p)``, ``video_grid_thw`` ``(videos, 3)``
        and, with ``return_metadata``, ``video_metadata`` (one per video) of ``videos``: a list of
        videos, each ``(T, H, W, 3)`` uint8 frames (array or tensor) or a list of PIL frames. Other
        keyword arguments of the processor's call (``return_tensors``, text padding, ...) do not
        concern the video pixels."""
        from transformers.feature_extraction_utils import BatchFeature
        from transformers.video_utils import VideoMetadata

        if do_sample_frames:
            raise ValueError("frames are sampled before they reach ficoco's video preprocessing: pass do_sample_frames="
                             "False with the frames the model expects (ficoco.evaluation.video_frames)")
        clips = [as_frames(video) for video in video_list(videos)]
        if video_metadata is None:
            video_metadata = [None] * len(clips)
        elif isinstance(video_metadata, (dict, VideoMetadata)):
            video_metadata = [video_metadata]
        if len(video_metadata) != len(clips):
            raise ValueError(f"{len(clips)} videos but {len(video_metadata)} video_metadata entries")
        patches, grids, metadata = [], [], []
        for clip, meta in zip(clips, video_metadata):
            flat, grid = self._patches(clip)
            patches.append(flat)
            grids.append(grid)
            if not isinstance(meta, VideoMetadata):
                meta = VideoMetadata(**meta) if meta else VideoMetadata(total_num_frames=clip.shape[0])
            metadata.append(meta)
        data = {"pixel_values_videos": torch.cat(patches), "video_grid_thw": torch.tensor(grids)}
        if return_metadata:
            data["video_metadata"] = metadata
        return BatchFeature(data=data, skip_tensor_conversion=["video_metadata"])

    def _patches(self, frames: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        count, channels, height, width = frames.shape
        p, tp, m = self.patch_size, self.temporal_patch_size, self.merge_size
        h, w = frame_size(count, height, width, factor=p * m, temporal_factor=tp, per_video_area=self.per_video_area,
                          **self.size)
        if (h, w) != (height, width):
            # torchvision's resize of uint8 frames on the CPU: torch's native uint8 antialiased bicubic
            frames = F.interpolate(frames, size=(h, w), mode="bicubic", align_corners=False, antialias=True)
        mean = torch.tensor(self.image_mean).view(1, -1, 1, 1)
        std = torch.tensor(self.image_std).view(1, -1, 1, 1)
        frames = (frames.float() / 255.0 - mean) / std
        if pad := -count % tp:
            frames = torch.cat([frames, frames[-1:].expand(pad, -1, -1, -1)])
        t, gh, gw = frames.shape[0] // tp, h // p, w // p
        blocks = frames.view(t, tp, channels, gh // m, m, p, gw // m, m, p)
        blocks = blocks.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # (t, gh/m, gw/m, m, m, C, tp, p, p): merge-group order
        return blocks.reshape(t * gh * gw, channels * tp * p * p), [t, gh, gw]
