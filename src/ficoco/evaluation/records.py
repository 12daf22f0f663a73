"""What a benchmark sample and a benchmark task are, shared by every reader and task.

* :class:`Record` -- one sample as :func:`~ficoco.evaluation.read.read_benchmark` returns it (its
  images, or the video files of a video benchmark);
* :class:`TaskSpec` -- what a benchmark looks like on disk and how lmms-eval prompts it;
* :class:`Task` -- a spec with the code specific to that benchmark (row builder, LLaVA-file join,
  scorer), as each module of :mod:`ficoco.evaluation.tasks` defines it;
* :class:`Built` / :class:`Draft` -- a sample in the making, before it is frozen into a record;
* the instructions several tasks append to their questions, and the helpers that read answers and
  ids out of a row.

Every problem with the files raises :class:`BenchmarkDataError` naming the file.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

if TYPE_CHECKING:  # only annotations: the image and video references import this module
    from PIL import Image

    from .formats.images import ImageRef
    from .formats.videos import VideoFile

__all__ = [
    "BenchmarkDataError",
    "Built",
    "Draft",
    "OPTION_POST",
    "Record",
    "Task",
    "TaskSpec",
    "VQA_POST",
    "finish_records",
]


class BenchmarkDataError(ValueError):
    """The benchmark files are missing, malformed or not in the schema the task needs."""

    def __init__(self, message: str, path: str | os.PathLike | None = None):
        super().__init__(message)
        self.path = None if path is None else str(path)


# the instructions lmms-eval's tasks append to a question (task-specific ones live with their task)
VQA_POST = "\nAnswer the question using a single word or phrase."
OPTION_POST = "\nAnswer with the option's letter from the given choices directly."


@dataclass(frozen=True)
class TaskSpec:
    """What a benchmark looks like on disk and how lmms-eval prompts it."""

    name: str
    hf_dataset: str  # the lmms-lab dataset lmms-eval's yaml names (``dataset_path``); "" where lmms-eval has none
    hf_config: str | None  # ``dataset_name`` in the yaml
    default_split: str  # ``test_split`` in the yaml
    pre_prompt: str
    post_prompt: str
    required_columns: tuple[str, ...]  # parquet / hf_disk columns without which no record can be built
    answer_columns: tuple[str, ...]  # also required when reading ``default_split``
    kind: str  # "vqa", "yes_no", "multiple_choice" or "open"
    category_splits: tuple[str, ...] = ()  # split names that select a value of the ``category`` column
    other_configs: tuple[str, ...] = ()  # sibling configs of the same HF dataset (never read for this task)
    llava_files: tuple[str, ...] = ()  # LLaVA-1.5 question file names (``.tsv`` for MMBench)
    llava_image_dirs: tuple[str, ...] = ()  # image folders (video tasks: video folders), relative to the question file
    modality: str = "image"  # "image": samples with images; "video": one video file per sample
    max_new_tokens: int | None = None  # the generation length lmms-eval's yaml sets, where the kind's default is wrong
    video_dirs: tuple[str, ...] = ()  # video folders, relative to the dataset root / parquet folder (parquet layouts)
    video_prefixes: tuple[str, ...] = ("",)  # file-name prefixes of a video ("v_" for ActivityNet's)


# --------------------------------------------------------------------------------------------
# record


@dataclass(frozen=True)
class Record:
    """One benchmark sample.

    ``question`` is the full prompt text (see :mod:`ficoco.evaluation.read`); ``answer`` the reference
    answer (VQA: the most common of ``answers``; multiple choice: the option letter), ``None``
    where the files carry none (test splits).  ``options`` maps option letters to their text.
    ``meta`` holds the remaining fields of the sample and where it came from.
    """

    task: str
    sample_id: str
    question: str
    answer: str | None = None
    answers: list[str] = field(default_factory=list)
    options: dict[str, str] = field(default_factory=dict)
    category: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    _images: tuple["ImageRef", ...] = field(default=(), repr=False, compare=False)
    _videos: tuple["VideoFile", ...] = field(default=(), repr=False, compare=False)

    def videos(self) -> list["VideoFile"]:
        """The video files of the sample (video benchmarks: one), not decoded: how many frames are
        read, and which, depends on the model (:mod:`ficoco.evaluation.model_inputs`)."""
        return list(self._videos)

    def video(self) -> "VideoFile":
        """The sample's one video file; :class:`BenchmarkDataError` when it has none or several."""
        if len(self._videos) != 1:
            raise BenchmarkDataError(f"{self.task}: sample {self.sample_id} has {len(self._videos)} videos, not one")
        return self._videos[0]

    def images(self) -> list[Image.Image]:
        """Every image of the sample (SEED-Bench video questions have several), decoded as RGB."""
        out: list[Image.Image] = []
        for ref in self._images:
            out.extend(ref.load(self.task, self.sample_id))
        return out

    def image(self) -> Image.Image:
        """The sample's image, decoded as RGB.  Raises :class:`BenchmarkDataError` when the image
        is missing or corrupt, or when the sample has no image or several (use :meth:`images`)."""
        if not self._images:
            raise BenchmarkDataError(f"{self.task}: sample {self.sample_id} has no image")
        images = self.images()
        if len(images) != 1:
            where = ", ".join(ref.describe() for ref in self._images)
            raise BenchmarkDataError(
                f"{self.task}: sample {self.sample_id} has {len(images)} images ({where}); use images()")
        return images[0]

    @property
    def image_sources(self) -> tuple[str, ...]:
        """Where the image(s) come from: a file path, or a parquet/arrow file and row."""
        return tuple(ref.describe() for ref in self._images)


# --------------------------------------------------------------------------------------------
# records in the making


@dataclass
class Built:
    """What a task's row builder makes of one row: the prompt (``question``), the question as the
    files have it, the answers and options (``raw_id`` ``None``: the row's index is its id)."""

    raw_id: str | None
    question: str
    raw_question: str
    answer: str | None = None
    answers: list[str] = field(default_factory=list)
    options: dict[str, str] = field(default_factory=dict)
    category: str | None = None
    image_columns: tuple[str, ...] | None = None  # the image columns of this row, in order (None: all of them)
    video_names: tuple[str, ...] = ()  # the videos of this row, by name (found in the task's video folders)


@dataclass
class Draft:
    """A record in the making (LLaVA files are joined with annotation files before records exist)."""

    raw_id: str
    question: str
    answer: str | None = None
    answers: list[str] = field(default_factory=list)
    options: dict[str, str] = field(default_factory=dict)
    category: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    images: tuple[ImageRef, ...] = ()
    videos: tuple[VideoFile, ...] = ()


def finish_records(spec: TaskSpec, drafts: list[Draft]) -> list[Record]:
    """Make the sample ids unique (MME has two questions per image id, LLaVA's TextVQA file uses the
    image id as question id) and freeze the drafts into records."""
    seen: Counter = Counter()
    records = []
    for d in drafts:
        n = seen[d.raw_id]
        seen[d.raw_id] += 1
        sample_id = d.raw_id if n == 0 else f"{d.raw_id}#{n}"
        meta = dict(d.meta)
        meta.setdefault("question_id", d.raw_id)
        records.append(Record(spec.name, sample_id, d.question, d.answer, list(d.answers), dict(d.options),
                              d.category, meta, tuple(d.images), tuple(d.videos)))
    return records


# --------------------------------------------------------------------------------------------
# a task: its spec and its code


@dataclass(frozen=True)
class Task:
    """One benchmark as a module of :mod:`ficoco.evaluation.tasks` registers it.

    ``build_row(row, pre_prompt, post_prompt) -> Built`` turns a parquet / hf_disk / tsv row (a
    ``dict`` of the row's non-image columns) into the prompt and answers; ``score(records,
    **kwargs) -> dict`` is the task's scorer; ``join_llava(spec, drafts, question_file,
    image_folder, annotation_file)`` fills the answers of the drafts of a LLaVA question file from
    the ground-truth file LLaVA's scripts use (``None``: the task has no LLaVA question file);
    ``llava_drafts(spec, question_file, image_folder) -> list[Draft]`` reads a question file that
    is not LLaVA's usual jsonl (``None``: it is). ``scorer_fields``: the fields of a record's
    ``meta`` its scorer reads besides the common ones (the runner copies them into each prediction
    line). ``judge``: the judge protocol the scorer takes (``"mmvet"``, ``"llava_bench"``,
    ``"video_qa"``), ``None`` for a rule-scored task.
    """

    spec: TaskSpec
    build_row: Callable[[dict, str, str], Built]
    score: Callable[..., dict]
    join_llava: Callable[..., None] | None = None
    llava_drafts: Callable[..., list[Draft]] | None = None
    scorer_fields: tuple[str, ...] = ()
    judge: str | None = None


# --------------------------------------------------------------------------------------------
# values of a row


def as_text(value: Any) -> str:
    """``value`` as text; ``None`` (a missing cell, or no generation) becomes ``""``, as in lmms-eval."""
    return "" if value is None else str(value)


def is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def majority(answers: Sequence[str]) -> str | None:
    if not answers:
        return None
    counts = Counter(answers)
    best = max(counts.values())
    return next(a for a in answers if counts[a] == best)


def answer_texts(raw: Any) -> list[str]:
    if is_missing(raw):
        return []
    if isinstance(raw, (str, bytes)):
        return [as_text(raw)]
    out = []
    for item in raw:
        out.append(as_text(item.get("answer")) if isinstance(item, Mapping) else as_text(item))
    return out


def single_answer(row, key="answer") -> tuple[str | None, list[str]]:
    value = row.get(key)
    if is_missing(value):
        return None, []
    return as_text(value), [as_text(value)]
