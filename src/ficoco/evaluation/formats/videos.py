"""Video files of benchmark samples: found by name in the task's video folders, decoded with PyAV
only when a model asks for frames.

lmms-lab and Video-LLaVA ship the videos of a benchmark as archives (zip / tar) to extract next
to the question files (lmms-lab/ActivityNetQA: ``all_test/v_<name>.mp4``; Video-LLaVA's
``GPT_Zero_Shot_QA``: ``mp4/``, ``videos/``, ``videos/all/``, ``all_test/``). Nothing is
extracted or downloaded here: a video is looked for as ``<folder>/<prefix><name><extension>``
over the task's folders, prefixes and :data:`VIDEO_EXTENSIONS`, and a missing one raises
:class:`~ficoco.evaluation.records.BenchmarkDataError` naming the video and where it was looked
for. Which frames are read is the model's choice (:mod:`ficoco.evaluation.video_frames`).

Decoding is PyAV's (``pip install av``, ficoco's ``video`` extra): frames are decoded in order and
the wanted ones converted to RGB. The frame count comes from the container's header (counted by
decoding where it has none); a header that overstates it is caught when the video ends early, and
the frames are then sampled again from the true count.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..records import BenchmarkDataError

#: video file extensions looked for (Video-LLaVA's .mp4 .avi .mov .mkv, lmms-eval's .webm, TGIF's .gif)
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".gif")
INSTALL_HINT = "reading videos needs PyAV: pip install av (ficoco's 'video' extra: pip install 'ficoco[video]')"


def _av():
    try:
        import av
    except ImportError as exc:
        raise ImportError(INSTALL_HINT) from exc
    return av


@dataclass(frozen=True)
class VideoInfo:
    """What sampling needs to know of a video: ``frames`` (decodable frames) and ``fps`` (frames
    per second of its stream), plus its ``width`` x ``height`` in pixels."""

    frames: int
    fps: float
    width: int
    height: int


@dataclass(frozen=True)
class Frames:
    """Frames read from a video: ``pixels`` ``(T, H, W, 3)`` uint8 RGB, the ``indices`` they have
    in the video (0-based; increasing as :meth:`VideoFile.read` gives them, non-decreasing where a
    model's frame rule shows a frame twice) and the video's :class:`VideoInfo`."""

    pixels: np.ndarray
    indices: tuple[int, ...]
    info: VideoInfo


class VideoFile:
    """A sample's video, looked for as ``<folder>/<prefix><name><extension>`` (the first that
    exists; a ``name`` with one of :data:`VIDEO_EXTENSIONS` is also tried as it is)."""

    __slots__ = ("name", "folders", "prefixes")

    def __init__(self, name: str, folders: Sequence[Path], prefixes: Sequence[str] = ("",)):
        self.name = str(name)
        self.folders = tuple(Path(f) for f in folders)
        self.prefixes = tuple(prefixes)

    def candidates(self) -> list[Path]:
        exact = self.name.lower().endswith(VIDEO_EXTENSIONS)
        return [folder / f"{prefix}{self.name}{ext}" for folder in self.folders for prefix in self.prefixes
                for ext in (("",) if exact else ()) + VIDEO_EXTENSIONS]

    def path(self, task: str, sample_id: str) -> Path:
        """The video's file; :class:`BenchmarkDataError` naming the video when there is none."""
        for candidate in self.candidates():
            if candidate.is_file():
                return candidate
        where = ", ".join(str(f) for f in self.folders) or "no folder"
        names = "/".join(f"{p}{self.name}" for p in self.prefixes)
        raise BenchmarkDataError(
            f"{task}: sample {sample_id}: video {names!r} not found in {where} (extensions "
            f"{' '.join(VIDEO_EXTENSIONS)}); extract the benchmark's video archive there or give its folder",
            self.folders[0] if self.folders else None)

    def describe(self) -> str:
        return f"video {self.name!r} in {', '.join(str(f) for f in self.folders)}"

    def info(self, task: str, sample_id: str) -> VideoInfo:
        """Frame count, frame rate and size, from the container's header (counted by decoding when
        the header has no count)."""
        path = self.path(task, sample_id)
        with _open(path, task, sample_id) as container:
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.base_rate or stream.guessed_rate
            fps = float(rate) if rate else 0.0
            count = int(stream.frames or 0)
            width, height = int(stream.codec_context.width), int(stream.codec_context.height)
        if count <= 0:
            with closing(_decoded(path, task, sample_id)) as frames:
                count = sum(1 for _ in frames)
        if count <= 0:
            raise BenchmarkDataError(f"{task}: sample {sample_id}: video {path} has no frames", path)
        return VideoInfo(count, fps if fps > 0 else 24.0, width, height)

    def read(self, task: str, sample_id: str, choose: Callable[[VideoInfo], Sequence[int]]) -> Frames:
        """The frames ``choose(info)`` picks (sorted, distinct indices), decoded as RGB. When the
        video holds fewer frames than its header says, ``choose`` is asked again with the true count."""
        info = self.info(task, sample_id)
        path = self.path(task, sample_id)
        for _ in range(2):
            wanted = sorted(set(int(i) for i in choose(info)))
            if not wanted or wanted[0] < 0:
                raise ValueError(f"frame indices must be non-negative and at least one, got {wanted}")
            keep, picked = set(wanted), {}
            last = -1
            with closing(_decoded(path, task, sample_id)) as frames:
                for last, frame in enumerate(frames):
                    if last in keep:
                        picked[last] = frame.to_ndarray(format="rgb24")
                    if last >= wanted[-1]:
                        break
            if len(picked) == len(wanted):
                return Frames(np.stack([picked[i] for i in wanted]), tuple(wanted), info)
            info = VideoInfo(last + 1, info.fps, info.width, info.height)  # the header overstated the count
        raise BenchmarkDataError(f"{task}: sample {sample_id}: video {path} could not be read at frames {wanted}", path)


class _open:
    """``av.open(path)`` as a context manager whose errors name the sample and the file."""

    def __init__(self, path: Path, task: str, sample_id: str):
        self.path, self.task, self.sample_id = path, task, sample_id

    def __enter__(self):
        av = _av()
        try:
            self.container = av.open(str(self.path))
            if not self.container.streams.video:
                raise BenchmarkDataError(f"{self.task}: sample {self.sample_id}: {self.path} has no video stream",
                                         self.path)
        except (av.FFmpegError, OSError, ValueError) as exc:
            if isinstance(exc, BenchmarkDataError):
                raise
            raise _corrupt(self.path, self.task, self.sample_id, exc) from exc
        return self.container

    def __exit__(self, *exc):
        self.container.close()


def _decoded(path: Path, task: str, sample_id: str):
    """The frames of ``path`` in order (PyAV ``VideoFrame`` objects)."""
    av = _av()
    with _open(path, task, sample_id) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # frame-level threads: the order of the frames is unchanged
        try:
            yield from container.decode(stream)
        except (av.FFmpegError, OSError) as exc:
            raise _corrupt(path, task, sample_id, exc) from exc


def _corrupt(path: Path, task: str, sample_id: str, exc: Exception) -> BenchmarkDataError:
    return BenchmarkDataError(f"{task}: sample {sample_id}: video {path} is corrupt or cannot be decoded "
                              f"({type(exc).__name__}: {exc})", path)


def video_folders(roots: Sequence[Path], subfolders: Sequence[str]) -> list[Path]:
    """The existing folders among ``root / sub`` for every root and sub (``"."``: the root itself),
    in that order, without repeats."""
    found: list[Path] = []
    for root in roots:
        for sub in subfolders:
            folder = (root / sub).resolve() if sub != "." else root.resolve()
            if folder.is_dir() and folder not in found:
                found.append(folder)
    return found
