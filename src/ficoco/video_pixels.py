"""Video frames as tensors, shared by ficoco's torch-only video preprocessing
(:mod:`ficoco.qwen_video`, :mod:`ficoco.video_llava_processor`)."""

from __future__ import annotations

import numpy as np
import torch


def as_frames(video) -> torch.Tensor:
    """``(T, 3, H, W)`` uint8 frames of one video: a ``(T, H, W, 3)`` (or channels-first) array or
    tensor, or a list of PIL frames / arrays."""
    if isinstance(video, (list, tuple)):
        video = np.stack([np.asarray(frame.convert("RGB") if hasattr(frame, "convert") else frame)
                          for frame in video])
    frames = torch.as_tensor(np.asarray(video) if not isinstance(video, torch.Tensor) else video)
    if frames.ndim != 4:
        raise ValueError(f"a video is (frames, height, width, 3) pixels; got shape {tuple(frames.shape)}")
    if frames.shape[-1] in (1, 3) and frames.shape[1] not in (1, 3):  # channels last, as decoders give them
        frames = frames.permute(0, 3, 1, 2)
    if frames.shape[1] == 1:
        frames = frames.expand(-1, 3, -1, -1)
    if frames.dtype != torch.uint8:
        frames = frames.float().round().clamp(0, 255).to(torch.uint8)
    return frames.contiguous()


def video_list(videos) -> list:
    """``videos`` as a list of videos: one video (a 4-D array or tensor, or a list of frames) or several."""
    if isinstance(videos, (np.ndarray, torch.Tensor)):
        return [videos] if videos.ndim == 4 else list(videos)
    if isinstance(videos, (list, tuple)) and videos and hasattr(videos[0], "convert"):
        return [videos]  # one video as a list of PIL frames
    return list(videos)
