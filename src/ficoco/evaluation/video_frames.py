"""Which frames of a video a model is shown: each family's processor convention.

* **Qwen2-VL / Qwen2.5-VL** (transformers' ``Qwen2VLVideoProcessor.sample_frames`` with the
  processor's ``fps=2``, ``min_frames=4``): ``n = total / video_fps * 2`` frames, at least 4, at
  most ``max_frames`` and the video's own count, rounded down to a multiple of the temporal patch
  (2); frames ``floor(k * total / n)``, ``k = 0 .. n-1``.
* **Qwen3-VL** (``Qwen3VLVideoProcessor.sample_frames``): ``n = int(total / video_fps * 2)``, at
  least 4, at most ``max_frames`` and the count; frames ``round(linspace(0, total - 1, n))``.
* **Video-LLaVA** (its evaluation scripts, ``load_and_transform_video``): 8 frames,
  ``linspace(0, total - 1, 8)`` truncated to integers, whatever the video's length.
* **LLaVA-OneVision**: 32 frames, ``np.linspace(0, total - 1, 32, dtype=int)``, whatever the
  video's length (a video shorter than 32 frames shows some twice), as lmms-eval evaluates it
  (EvolvingLMMs-Lab/lmms-eval, ``lmms_eval/models/simple/llava_onevision.py`` -- the original
  checkpoints -- and ``llava_hf.py`` -- the llava-hf ones --: ``max_frames_num=32`` and
  ``load_video``'s uniform ``linspace`` over decord's frames).
* **LLaVA-NeXT-Video**: one frame a second -- every ``round(fps)``-th frame from the first --
  and, when that gives more than 32, ``np.linspace(0, total - 1, 32, dtype=int)`` instead, as
  its own evaluation samples (LLaVA-VL/LLaVA-NeXT, ``playground/demo/video_demo.py``,
  ``load_video``) and lmms-eval's wrapper of it (``lmms_eval/models/simple/llava_vid.py``,
  ``video_fps=1``, ``force_sample`` off); 32 is the frame count of LLaVA-NeXT-Video's evaluation
  guide (LLaVA-NeXT ``docs/LLaVA-NeXT-Video.md``: "Sampled frames: 32") and of lmms-eval's
  ``examples/models/llava_video.sh`` (``max_frames_num=32``; the wrapper's own default is 20). A
  video's frames thus differ in number from video to video: a batch is split by frame count
  (:func:`frame_groups`), since the processor and the model take one frame count per call.

``max_frames`` for the Qwen generations defaults to :data:`QWEN_MAX_FRAMES` = 32, lmms-eval's
``max_num_frames`` for its Qwen2-VL / Qwen2.5-VL / Qwen3-VL models (the processors' own cap, 768,
gives a 3-minute ActivityNet video 360 frames); a video shorter than 2 frames keeps the 1 it has
(the processor repeats it to fill the temporal patch). For Video-LLaVA ``max_frames`` replaces the 8,
for LLaVA-OneVision and LLaVA-NeXT-Video the 32.

The sampled frames reach the processor with their metadata (which frames of how many, at what
rate) and ``do_sample_frames=False``, so the processor never samples again; Qwen2.5-VL's temporal
positions (``second_per_grid_ts``) and Qwen3-VL's timestamps follow from that metadata as they
would from the processor's own sampling.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from types import MappingProxyType

import numpy as np
import torch

from .formats.videos import VideoInfo

#: the most frames a Qwen-VL model is shown of one video, unless told otherwise (lmms-eval's default)
QWEN_MAX_FRAMES = 32
#: Video-LLaVA's frames per video
VIDEO_LLAVA_FRAMES = 8
#: the frames lmms-eval shows LLaVA-OneVision of every video, and LLaVA-NeXT-Video of a long one
POOLED_VIDEO_FRAMES = 32
_QWEN_FPS, _QWEN_MIN_FRAMES, _TEMPORAL_PATCH = 2.0, 4, 2


def _qwen2(info: VideoInfo, max_frames: int | None) -> list[int]:
    total = info.frames
    cap = math.floor(min(max_frames or QWEN_MAX_FRAMES, total) / _TEMPORAL_PATCH) * _TEMPORAL_PATCH
    n = total / info.fps * _QWEN_FPS
    n = math.floor(min(max(n, _QWEN_MIN_FRAMES), cap, total) / _TEMPORAL_PATCH) * _TEMPORAL_PATCH
    if n < 1:  # a 1-frame video
        n = total
    # the processor's own arithmetic (float32 arange, truncated), so that the same frames come out
    return torch.arange(0, total, total / n).int().tolist()[:n]


def _qwen3(info: VideoInfo, max_frames: int | None) -> list[int]:
    total = info.frames
    n = int(total / info.fps * _QWEN_FPS)
    n = min(max(n, _QWEN_MIN_FRAMES), max_frames or QWEN_MAX_FRAMES, total)
    return np.linspace(0, total - 1, n).round().astype(int).tolist()


def _video_llava(info: VideoInfo, max_frames: int | None) -> list[int]:
    return np.linspace(0, info.frames - 1, max_frames or VIDEO_LLAVA_FRAMES, dtype=int).tolist()


def _llava_onevision(info: VideoInfo, max_frames: int | None) -> list[int]:
    return np.linspace(0, info.frames - 1, max_frames or POOLED_VIDEO_FRAMES, dtype=int).tolist()


def _llava_next_video(info: VideoInfo, max_frames: int | None) -> list[int]:
    cap = max_frames or POOLED_VIDEO_FRAMES
    step = max(1, round(info.fps))  # a clip under half a frame a second keeps every frame
    every_second = list(range(0, info.frames, step))
    if len(every_second) > cap:
        return np.linspace(0, info.frames - 1, cap, dtype=int).tolist()
    return every_second


#: ``config.model_type`` -> frame rule ``(info, max_frames) -> indices``
FRAME_RULES = MappingProxyType({"qwen2_vl": _qwen2, "qwen2_5_vl": _qwen2, "qwen3_vl": _qwen3,
                                "video_llava": _video_llava, "llava_onevision": _llava_onevision,
                                "llava_next_video": _llava_next_video})
#: families whose processor takes any number of frames per video in one call (the others need one count)
RAGGED_FRAME_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


def video_model_types() -> tuple[str, ...]:
    """The ``model_type`` values of the families ficoco runs that take videos."""
    from ..adapters.families import BY_MODEL_TYPE

    return tuple(t for t in FRAME_RULES if t in BY_MODEL_TYPE)


def check_takes_video(model_type: str | None, what: str = "this benchmark") -> None:
    """``ValueError`` in one line when a ``model_type`` model cannot be shown videos."""
    if model_type in video_model_types():
        return
    from ..adapters.families import BY_MODEL_TYPE

    family = BY_MODEL_TYPE.get(model_type)
    name = family.name if family is not None else repr(model_type)
    takers = sorted({BY_MODEL_TYPE[t].name for t in video_model_types()})
    raise ValueError(f"{what} is a video benchmark and {name} models take no video; the families ficoco runs on "
                     f"videos: {', '.join(takers)} ({', '.join(video_model_types())})")


def sample_frames(model_type: str, info: VideoInfo, max_frames: int | None = None) -> list[int]:
    """The frames (indices) a ``model_type`` model is shown of a video with ``info``; see the
    module docstring for each family's rule."""
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be at least 1, got {max_frames}")
    try:
        rule = FRAME_RULES[model_type]
    except KeyError:
        check_takes_video(model_type)
        raise
    return rule(info, max_frames)


def frame_groups(model_type: str, frame_counts: Sequence[int]) -> list[list[int]]:
    """Positions of a batch's videos (with ``frame_counts`` frames each) that can share one
    processor call: all of them for the Qwen-VL families, which pack ragged videos; otherwise one
    group per frame count, in order of first appearance (the LLaVA video families' processors and
    models take ``(videos, frames, ...)`` pixels of one frame count)."""
    if model_type in RAGGED_FRAME_TYPES:
        return [list(range(len(frame_counts)))] if len(frame_counts) else []
    groups: dict[int, list[int]] = {}
    for i, count in enumerate(frame_counts):
        groups.setdefault(int(count), []).append(i)
    return list(groups.values())
