"""Tiny videos and video QA benchmark folders written by the tests themselves (PyAV), in the
layouts ficoco reads: lmms-lab's parquet with the videos extracted beside it, and Video-LLaVA's
``test_q.json`` / ``test_a.json`` with its video folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

av = pytest.importorskip("av")


def frame_colors(count: int) -> list[tuple[int, int, int]]:
    """A distinct flat colour per frame (far apart, so that lossy coding keeps them apart)."""
    return [((40 * i) % 256, (255 - 30 * i) % 256, (90 + 70 * i) % 256) for i in range(count)]


def write_video(path: Path, frames, *, fps: int = 8, codec: str | None = None) -> Path:
    """``frames`` (``(T, H, W, 3)`` uint8, or PIL images) encoded into ``path`` (.mp4 / .avi / .mkv:
    MPEG-4 part 2; .webm: VP8)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    codec = codec or ("libvpx" if path.suffix == ".webm" else "mpeg4")
    frames = [np.asarray(f.convert("RGB")) if hasattr(f, "convert") else np.asarray(f, dtype=np.uint8) for f in frames]
    height, width = frames[0].shape[:2]
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"qscale": "1"} if codec == "mpeg4" else {}  # near-lossless: colours survive
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def colored_video(path: Path, count: int = 16, size: int = 64, fps: int = 8) -> Path:
    """``count`` frames of ``size`` x ``size`` pixels, frame ``i`` flat in ``frame_colors(count)[i]``."""
    frames = [np.full((size, size, 3), color, np.uint8) for color in frame_colors(count)]
    return write_video(path, frames, fps=fps)


def scene_video(path: Path, image, count: int = 8, size: int = 64, fps: int = 4) -> Path:
    """A still scene (a PIL image) held for ``count`` frames: what the proxy models can answer about."""
    still = np.asarray(image.convert("RGB").resize((size, size)))
    return write_video(path, [still] * count, fps=fps)


def video_qa_parquet(root: Path, rows: list[dict], *, split: str = "test") -> Path:
    """lmms-lab's video QA parquet (``question_id``, ``question``, ``answer``, ``video_name``[, ``type``])."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (root / "data").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), root / "data" / f"{split}-00000-of-00001.parquet")
    return root


def video_llava_files(root: Path, questions: list[dict], answers: list[dict]) -> Path:
    """Video-LLaVA's ``test_q.json`` / ``test_a.json`` in ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "test_q.json").write_text(json.dumps(questions))
    (root / "test_a.json").write_text(json.dumps(answers))
    return root
