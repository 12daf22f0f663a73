"""Readers for the benchmark files people already have on disk.

``read_benchmark(task, path)`` turns one benchmark of the paper's evaluation into a list of
:class:`Record`, whatever form the files take:

* ``parquet``    -- a local copy of the lmms-lab Hugging Face dataset that lmms-eval uses (a
  folder of parquet shards such as ``data/test-00000-of-00003.parquet`` or
  ``<config>/<split>-*.parquet``, or a single parquet file);
* ``hf_disk``    -- a folder written by ``datasets.Dataset(Dict).save_to_disk`` (read with
  ``datasets.load_from_disk`` when ``datasets`` is importable, otherwise its Arrow files are
  read with pyarrow directly);
* ``llava``      -- LLaVA-1.5's evaluation files: a question ``.jsonl`` (ScienceQA: ``.json``)
  plus an image folder, with the ground-truth files LLaVA's scripts use where they exist;
* ``tsv``        -- MMBench's ``.tsv`` with base64 images;
* ``mme_folder`` -- the ``MME_Benchmark_release_version`` folder.

Prompts: for the formats that carry the raw fields (parquet, hf_disk, tsv, mme_folder) the
``question`` of a record is the prompt lmms-eval's task builds (``doc_to_text`` with the
default ``lmms_eval_specific_kwargs``: options, hints and post-prompt included).  LLaVA's
question files carry a finished prompt; it is used verbatim (ScienceQA gets the
``--single-pred-prompt`` sentence that ``model_vqa_science.py`` appends).

Nothing is downloaded.  Images are decoded lazily by :meth:`Record.image`.  Every problem with
the files raises :class:`BenchmarkDataError` naming the file.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import csv
import io
import json
import math
import os
import re
import threading
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Iterator, Mapping, Sequence

from PIL import Image, UnidentifiedImageError

__all__ = [
    "BenchmarkDataError",
    "FORMATS",
    "Record",
    "TASKS",
    "TaskSpec",
    "available_tasks",
    "detect_format",
    "read_benchmark",
]

FORMATS = ("parquet", "hf_disk", "llava", "tsv", "mme_folder")


class BenchmarkDataError(ValueError):
    """The benchmark files are missing, malformed or not in the schema the task needs."""

    def __init__(self, message: str, path: str | os.PathLike | None = None):
        super().__init__(message)
        self.path = None if path is None else str(path)


# --------------------------------------------------------------------------------------------
# task registry

VQA_POST = "\nAnswer the question using a single word or phrase."
OPTION_POST = "\nAnswer with the option's letter from the given choices directly."
VIZWIZ_POST = "\nWhen the provided information is insufficient, respond with 'Unanswerable'." + VQA_POST
MMBENCH_CN_POST = "\n请直接使用所提供的选项字母作为答案回答。"
MMVET_PRE = (
    "First please perform reasoning, and think step by step to provide best answer to the following question: \n\n"
)


@dataclass(frozen=True)
class TaskSpec:
    """What a benchmark looks like on disk and how lmms-eval prompts it."""

    name: str
    hf_dataset: str  # the lmms-lab dataset lmms-eval's yaml names (``dataset_path``)
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
    llava_image_dirs: tuple[str, ...] = ()  # image folders, relative to the question file's folder


_SPECS = (
    TaskSpec("textvqa_val", "lmms-lab/textvqa", None, "validation", "", VQA_POST,
             ("question_id", "question", "image"), ("answers",), "vqa",
             llava_files=("llava_textvqa_val_v051_ocr.jsonl",), llava_image_dirs=("train_images", "images")),
    TaskSpec("vqav2_val", "lmms-lab/VQAv2", None, "validation", "", VQA_POST,
             ("question_id", "question", "image"), ("answers",), "vqa",
             llava_files=("llava_vqav2_mscoco_test-dev2015.jsonl", "llava_vqav2_mscoco_test2015.jsonl"),
             llava_image_dirs=("test2015", "val2014", "images")),
    TaskSpec("vizwiz_vqa_val", "lmms-lab/VizWiz-VQA", None, "val", "", VIZWIZ_POST,
             ("question_id", "question", "image"), ("answers",), "vqa",
             llava_files=("llava_test.jsonl",), llava_image_dirs=("test", "val", "images")),
    TaskSpec("pope", "lmms-lab/POPE", None, "test", "", VQA_POST,
             ("question_id", "question", "image"), ("answer", "category"), "yes_no",
             category_splits=("adversarial", "popular", "random"),
             llava_files=("llava_pope_test.jsonl",), llava_image_dirs=("val2014", "images")),
    TaskSpec("mme", "lmms-lab/MME", None, "test", "", VQA_POST,
             ("question_id", "question", "image", "category"), ("answer",), "yes_no",
             llava_files=("llava_mme.jsonl",), llava_image_dirs=("MME_Benchmark_release_version",)),
    TaskSpec("scienceqa_img", "lmms-lab/ScienceQA", "ScienceQA-IMG", "test", "", OPTION_POST,
             ("question", "choices", "hint", "image"), ("answer",), "multiple_choice",
             other_configs=("ScienceQA-FULL",),
             llava_files=("llava_test_CQM-A.json",), llava_image_dirs=("images/test", "test", "images")),
    TaskSpec("seedbench", "lmms-lab/SEED-Bench", None, "test", "", OPTION_POST,
             ("question_id", "question", "choice_a", "choice_b", "choice_c", "choice_d", "image"), ("answer",),
             "multiple_choice", llava_files=("llava-seed-bench.jsonl",), llava_image_dirs=(".",)),
    TaskSpec("gqa", "lmms-lab/GQA", "testdev_balanced_instructions", "testdev", "", VQA_POST,
             ("id", "imageId", "question"), ("answer",), "vqa",
             llava_files=("llava_gqa_testdev_balanced.jsonl",), llava_image_dirs=("data/images", "images")),
    TaskSpec("mmbench_en_dev", "lmms-lab/MMBench", "en", "dev", "", OPTION_POST,
             ("index", "question", "A", "B", "image"), ("answer",), "multiple_choice",
             other_configs=("cn", "cc", "ru"), llava_files=("mmbench_dev_20230712.tsv",)),
    TaskSpec("mmbench_cn_dev", "lmms-lab/MMBench", "cn", "dev", "", MMBENCH_CN_POST,
             ("index", "question", "A", "B", "image"), ("answer",), "multiple_choice",
             other_configs=("en", "cc", "ru"), llava_files=("mmbench_dev_cn_20231003.tsv",)),
    TaskSpec("mmvet", "lmms-lab/MMVet", None, "test", MMVET_PRE, "",
             ("question_id", "question", "image"), ("answer",), "open",
             llava_files=("llava-mm-vet.jsonl",), llava_image_dirs=("images",)),
    TaskSpec("llava_in_the_wild", "lmms-lab/llava-bench-in-the-wild", None, "train", "", "",
             ("question_id", "question", "image"), ("gpt_answer",), "open",
             llava_files=("questions.jsonl",), llava_image_dirs=("images",)),
)

TASKS: Mapping[str, TaskSpec] = MappingProxyType({spec.name: spec for spec in _SPECS})


def available_tasks() -> tuple[str, ...]:
    """The lmms-eval task names :func:`read_benchmark` knows."""
    return tuple(TASKS)


# SEED-Bench ``question_type_id`` -> dimension name (SEED-Bench.json's ``question_type`` table).
_SEED_TYPES = MappingProxyType({
    1: "Scene Understanding", 2: "Instance Identity", 3: "Instance Attributes", 4: "Instance Location",
    5: "Instances Counting", 6: "Spatial Relation", 7: "Instance Interaction", 8: "Visual Reasoning",
    9: "Text Understanding", 10: "Action Recognition", 11: "Action Prediction", 12: "Procedure Understanding",
})


# --------------------------------------------------------------------------------------------
# record


@dataclass(frozen=True)
class Record:
    """One benchmark sample.

    ``question`` is the full prompt text (see the module docstring); ``answer`` the reference
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
    _images: tuple["_ImageRef", ...] = field(default=(), repr=False, compare=False)

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
# images


def _decode_image(data: bytes | None, path: Path | None, task: str, sample_id: str, origin: str) -> Image.Image:
    if data is None:
        if path is None:
            raise BenchmarkDataError(f"{task}: sample {sample_id} has no image ({origin})")
        if not path.is_file():
            raise BenchmarkDataError(f"{task}: sample {sample_id}: image file not found: {path}", path)
        source: Any = path
    else:
        source = io.BytesIO(data)
    try:
        with Image.open(source) as img:
            img.load()
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise BenchmarkDataError(
            f"{task}: sample {sample_id}: image {origin} is corrupt or not an image ({exc})",
            path if data is None else None) from exc


class _ImageRef:
    def load(self, task: str, sample_id: str) -> list[Image.Image]:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError


class _FileImage(_ImageRef):
    __slots__ = ("path",)

    def __init__(self, path: Path):
        self.path = path

    def load(self, task, sample_id):
        return [_decode_image(None, self.path, task, sample_id, str(self.path))]

    def describe(self):
        return str(self.path)


class _Base64Image(_ImageRef):
    __slots__ = ("text", "origin")

    def __init__(self, text: str, origin: str):
        self.text = text
        self.origin = origin

    def load(self, task, sample_id):
        try:
            data = base64.b64decode(self.text, validate=False)
        except (binascii.Error, ValueError) as exc:
            raise BenchmarkDataError(
                f"{task}: sample {sample_id}: image {self.origin} is not valid base64 ({exc})") from exc
        return [_decode_image(data, None, task, sample_id, self.origin)]

    def describe(self):
        return self.origin


class _CellImage(_ImageRef):
    """An image cell of a parquet file or Arrow table, read when needed."""

    __slots__ = ("source", "row", "column")

    def __init__(self, source: "_Source", row: int, column: str):
        self.source = source
        self.row = row
        self.column = column

    def describe(self):
        return f"{self.source.origin} row {self.row} column {self.column!r}"

    def load(self, task, sample_id):
        value = self.source.cell(self.row, self.column)
        values = value if isinstance(value, list) else [value]
        if not values:
            raise BenchmarkDataError(f"{task}: sample {sample_id} has no image ({self.describe()})",
                                     self.source.origin)
        return [self._one(v, task, sample_id) for v in values]

    def _one(self, value: Any, task: str, sample_id: str) -> Image.Image:
        origin = self.describe()
        if isinstance(value, Mapping):  # the Hugging Face Image feature: {"bytes": ..., "path": ...}
            data, path = value.get("bytes"), value.get("path")
        elif isinstance(value, (bytes, bytearray)):
            data, path = bytes(value), None
        elif isinstance(value, str):
            data, path = None, value
        else:
            data, path = None, None
        resolved = None
        if data is None and path:
            resolved = Path(path)
            if not resolved.is_absolute() and self.source.base_dir is not None:
                resolved = self.source.base_dir / resolved
        return _decode_image(data, resolved, task, sample_id, origin)


# --------------------------------------------------------------------------------------------
# tabular sources (parquet files, arrow tables)


def _pyarrow():
    try:
        import pyarrow  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError as exc:  # pragma: no cover - pyarrow is installed where the tests run
        raise BenchmarkDataError("reading parquet or Arrow benchmark files needs pyarrow: pip install pyarrow") from exc
    import pyarrow as pa
    import pyarrow.parquet as pq

    return pa, pq


def _is_image_type(pa, dtype) -> bool:
    if pa.types.is_struct(dtype):
        names = {dtype.field(i).name for i in range(dtype.num_fields)}
        return {"bytes", "path"} <= names
    if pa.types.is_list(dtype) or pa.types.is_large_list(dtype) or pa.types.is_fixed_size_list(dtype):
        return _is_image_type(pa, dtype.value_type)
    return False


class _Source:
    """Rows of one parquet file or Arrow table."""

    origin: str
    base_dir: Path | None
    names: list[str]
    image_columns: set[str]

    def iter_rows(self, columns: Sequence[str]) -> Iterator[tuple[int, dict]]:
        raise NotImplementedError

    def cell(self, row: int, column: str) -> Any:
        raise NotImplementedError

    def _classify(self, schema, image_column_hint: str = "image") -> None:
        pa, _ = _pyarrow()
        self.names = list(schema.names)
        self.image_columns = {f.name for f in schema if _is_image_type(pa, f.type)}
        if image_column_hint in self.names:  # also when it holds raw bytes or file paths
            self.image_columns.add(image_column_hint)


def _parquet_problem(path: Path, exc: Exception) -> BenchmarkDataError:
    try:
        with open(path, "rb") as fh:
            head = fh.read(64)
    except OSError:
        head = b""
    if head.startswith(b"version https://git-lfs"):
        return BenchmarkDataError(f"{path} is a Git LFS pointer, not the parquet data (fetch it with `git lfs pull`)",
                                  path)
    return BenchmarkDataError(f"{path} could not be read as parquet ({type(exc).__name__}: {exc})", path)


class _ParquetFileSource(_Source):
    def __init__(self, path: Path):
        pa, pq = _pyarrow()
        self.path = path
        self.origin = str(path)
        self.base_dir = path.parent
        self._lock = threading.Lock()
        self._cache: tuple[int, str, list] | None = None
        try:
            with open(path, "rb") as fh:
                meta = pq.ParquetFile(fh).metadata
                schema = meta.schema.to_arrow_schema()
                counts = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        except (pa.ArrowException, OSError) as exc:
            raise _parquet_problem(path, exc) from exc
        self.num_rows = sum(counts)
        self._starts = [0]
        for n in counts[:-1]:
            self._starts.append(self._starts[-1] + n)
        self._classify(schema)

    def iter_rows(self, columns):
        pa, pq = _pyarrow()
        offset = 0
        try:
            with open(self.path, "rb") as fh:
                for batch in pq.ParquetFile(fh).iter_batches(batch_size=1024, columns=list(columns)):
                    for row in batch.to_pylist():
                        yield offset, row
                        offset += 1
        except (pa.ArrowException, OSError) as exc:
            raise _parquet_problem(self.path, exc) from exc

    def cell(self, row, column):
        pa, pq = _pyarrow()
        group = bisect.bisect_right(self._starts, row) - 1
        with self._lock:
            if self._cache is None or self._cache[:2] != (group, column):
                try:
                    with open(self.path, "rb") as fh:
                        table = pq.ParquetFile(fh).read_row_group(group, columns=[column])
                except (pa.ArrowException, OSError) as exc:
                    raise _parquet_problem(self.path, exc) from exc
                self._cache = (group, column, table.column(0).to_pylist())
            return self._cache[2][row - self._starts[group]]


class _TableSource(_Source):
    def __init__(self, table, origin: str, base_dir: Path | None):
        self.table = table
        self.origin = origin
        self.base_dir = base_dir
        self.num_rows = table.num_rows
        self._classify(table.schema)

    def iter_rows(self, columns):
        offset = 0
        for batch in self.table.select(list(columns)).to_batches(max_chunksize=1024):
            for row in batch.to_pylist():
                yield offset, row
                offset += 1

    def cell(self, row, column):
        return self.table.column(column)[row].as_py()


# --------------------------------------------------------------------------------------------
# prompt builders (lmms-eval ``doc_to_text`` with the default kwargs)


@dataclass
class _Built:
    raw_id: str | None
    question: str
    raw_question: str
    answer: str | None = None
    answers: list[str] = field(default_factory=list)
    options: dict[str, str] = field(default_factory=dict)
    category: str | None = None


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _majority(answers: Sequence[str]) -> str | None:
    if not answers:
        return None
    counts = Counter(answers)
    best = max(counts.values())
    return next(a for a in answers if counts[a] == best)


def _answer_texts(raw: Any) -> list[str]:
    if _missing(raw):
        return []
    if isinstance(raw, (str, bytes)):
        return [_text(raw)]
    out = []
    for item in raw:
        out.append(_text(item.get("answer")) if isinstance(item, Mapping) else _text(item))
    return out


def _build_textvqa(row, pre, post):
    q = _text(row["question"])
    answers = _answer_texts(row.get("answers"))
    return _Built(_text(row["question_id"]), f"{pre}{q.capitalize()}{post}", q, _majority(answers), answers)


def _build_vqav2(row, pre, post):
    q = _text(row["question"])
    answers = _answer_texts(row.get("answers"))
    answer = row.get("multiple_choice_answer")
    answer = _majority(answers) if _missing(answer) else _text(answer)
    return _Built(_text(row["question_id"]), f"{pre}{q}{post}", q, answer, answers,
                  category=None if _missing(row.get("answer_type")) else _text(row.get("answer_type")))


def _build_vizwiz(row, pre, post):
    q = _text(row["question"])
    answers = _answer_texts(row.get("answers"))
    cat = row.get("category")
    return _Built(_text(row["question_id"]), f"{pre}{q.capitalize()}{post}", q, _majority(answers), answers,
                  category=None if _missing(cat) else _text(cat))


def _single_answer(row, key="answer") -> tuple[str | None, list[str]]:
    value = row.get(key)
    if _missing(value):
        return None, []
    return _text(value), [_text(value)]


def _build_pope(row, pre, post):
    q = _text(row["question"])
    answer, answers = _single_answer(row)
    cat = row.get("category")
    return _Built(_text(row["question_id"]), f"{pre}{q.strip()}{post}", q, answer, answers,
                  category=None if _missing(cat) else _text(cat))


_MME_REPLACE = " Please answer yes or no."


def _build_mme(row, pre, post):
    raw = _text(row["question"])
    q = raw.strip()
    if pre != "":
        q = f"{pre}{q.replace(_MME_REPLACE, '')}"
    if post != "":
        q = f"{q.replace(_MME_REPLACE, '')}{post}"
    answer, answers = _single_answer(row)
    return _Built(_text(row["question_id"]), q, raw, answer, answers, category=_text(row["category"]))


def _letters(n: int) -> list[str]:
    return [chr(ord("A") + i) for i in range(n)]


def _build_scienceqa(row, pre, post):
    question, hint = _text(row["question"]), row.get("hint")
    choices = [_text(c) for c in (row.get("choices") or [])]
    letters = _letters(len(choices))
    listing = "\n".join(f"{k}. {c}" for k, c in zip(letters, choices))
    context = f"Context: {hint}\n" if hint else ""
    answer = row.get("answer")
    letter = None
    if not _missing(answer):
        try:
            letter = letters[int(answer)]
        except (IndexError, ValueError, TypeError) as exc:
            raise BenchmarkDataError(
                f"scienceqa_img: answer {answer!r} is not an index into choices {choices}") from exc
    cat = row.get("category")
    return _Built(None, f"{pre}{context}{question}\n{listing}{post}", question, letter,
                  [letter] if letter else [], dict(zip(letters, choices)), None if _missing(cat) else _text(cat))


def _build_seedbench(row, pre, post):
    q = _text(row["question"])
    options = {k: _text(row[f"choice_{k.lower()}"]) for k in "ABCD"}
    listing = "".join(f"\n{k}. {v}" for k, v in options.items())
    answer, answers = _single_answer(row)
    category = None
    qtype = row.get("question_type_id")
    if not _missing(qtype):
        try:
            category = _SEED_TYPES.get(int(qtype), _text(qtype))
        except (TypeError, ValueError):
            category = _text(qtype)
    return _Built(_text(row["question_id"]), f"{pre}{q}{listing}{post}", q, answer, answers, options, category)


def _build_gqa(row, pre, post):
    q = _text(row["question"])
    answer, answers = _single_answer(row)
    return _Built(_text(row["id"]), f"{pre}{q}{post}", q, answer, answers)


def _mmbench_builder(english: bool):
    def build(row, pre, post):
        question, hint = _text(row["question"]), row.get("hint")
        options = {}
        for key in "ABCDE":
            value = row.get(key)
            if key in row and value and not _missing(value) and value != "nan":
                options[key] = _text(value)
        listing = "There are several options:\n" + "".join(f"{k}. {v}\n" for k, v in options.items())
        listing = listing.rstrip("\n")
        has_hint = not _missing(hint) and (hint != "nan" or not english)
        query = f"{hint} {question} {listing}" if has_hint else f"{question} {listing}"
        answer, answers = _single_answer(row)
        cat = row.get("category")
        return _Built(_text(row["index"]), f"{pre}{query}\n{post}", question, answer, answers, options,
                      None if _missing(cat) else _text(cat))

    return build


def _build_mmvet(row, pre, post):
    q = _text(row["question"])
    answer, answers = _single_answer(row)
    cap = row.get("capability")
    category = ",".join(map(str, cap)) if isinstance(cap, list) else (None if _missing(cap) else _text(cap))
    return _Built(_text(row["question_id"]), f"{pre}{q}{post}", q, answer, answers, category=category)


def _build_llava_wild(row, pre, post):
    q = _text(row["question"])
    answer, answers = _single_answer(row, "gpt_answer")
    cat = row.get("category")
    return _Built(_text(row["question_id"]), f"{pre}{q}{post}", q, answer, answers,
                  category=None if _missing(cat) else _text(cat))


_BUILDERS: Mapping[str, Callable[[dict, str, str], _Built]] = MappingProxyType({
    "textvqa_val": _build_textvqa,
    "vqav2_val": _build_vqav2,
    "vizwiz_vqa_val": _build_vizwiz,
    "pope": _build_pope,
    "mme": _build_mme,
    "scienceqa_img": _build_scienceqa,
    "seedbench": _build_seedbench,
    "gqa": _build_gqa,
    "mmbench_en_dev": _mmbench_builder(english=True),
    "mmbench_cn_dev": _mmbench_builder(english=False),
    "mmvet": _build_mmvet,
    "llava_in_the_wild": _build_llava_wild,
})


# --------------------------------------------------------------------------------------------
# file discovery


_SHARD = re.compile(r"^(?P<split>.+?)-\d{5}-of-\d{5}(?:-[0-9a-fA-F]+)?$")
_KNOWN_SPLITS = frozenset({"train", "validation", "val", "test", "testdev", "dev", "adversarial", "popular", "random"})


def _find(root: Path, suffixes: tuple[str, ...], max_depth: int = 4) -> list[Path]:
    """Files under ``root`` (hidden folders skipped, at most ``max_depth`` levels down), sorted."""
    found: list[Path] = []

    def walk(folder: Path, depth: int) -> None:
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            return
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                if depth < max_depth:
                    walk(Path(entry.path), depth + 1)
            elif entry.name.lower().endswith(suffixes):
                found.append(Path(entry.path))

    walk(root, 1)
    return found


def _split_of(path: Path) -> str | None:
    stem = path.name[: -len(".parquet")] if path.name.lower().endswith(".parquet") else path.stem
    match = _SHARD.match(stem)
    if match:
        return match.group("split")
    if stem.isdigit():  # refs/convert/parquet layout: <config>/<split>/0000.parquet
        return path.parent.name
    return stem if stem in _KNOWN_SPLITS else None


def _config_parts(path: Path, root: Path) -> set[str]:
    parts = set(path.parent.relative_to(root).parts) if path != root else set()
    parts.add(root.name if root.is_dir() else root.parent.name)
    return parts


def _restrict_config(files: list[Path], root: Path, config: str | None, others: tuple[str, ...]) -> list[Path]:
    if config is None:
        return files
    hits = [f for f in files if config in _config_parts(f, root)]
    if hits:
        return hits
    wrong = sorted({o for f in files for o in others if o in _config_parts(f, root)})
    if wrong:
        raise BenchmarkDataError(
            f"{root} holds config(s) {', '.join(wrong)} of the dataset, not {config!r}", root)
    return files


@dataclass
class _Selection:
    files: list[Path]
    split: str
    category: str | None  # keep only rows whose ``category`` equals this


def _select_parquet(spec: TaskSpec, root: Path, split: str | None, config: str | None) -> _Selection:
    wanted = split or spec.default_split
    if root.is_file():
        own = _split_of(root)
        category = wanted if (wanted in spec.category_splits and own != wanted) else None
        if split is not None and own is not None and own != split and category is None:
            raise BenchmarkDataError(f"{root} holds split {own!r}, not {split!r}", root)
        return _Selection([root], own or wanted, category)
    files = _find(root, (".parquet",))
    if not files:
        raise BenchmarkDataError(f"no .parquet files under {root}", root)
    files = _restrict_config(files, root, config, spec.other_configs)
    by_split: dict[str | None, list[Path]] = {}
    for f in files:
        by_split.setdefault(_split_of(f), []).append(f)
    if wanted in by_split:
        return _Selection(by_split[wanted], wanted, None)
    if wanted in spec.category_splits and spec.default_split in by_split:
        return _Selection(by_split[spec.default_split], spec.default_split, wanted)
    if list(by_split) == [None] and split is None:
        return _Selection(files, wanted, None)
    found = sorted(str(s) for s in by_split if s is not None)
    raise BenchmarkDataError(
        f"no parquet files for split {wanted!r} under {root}; splits found: {', '.join(found) or 'none'}", root)


# --------------------------------------------------------------------------------------------
# hf_disk (``save_to_disk`` folders)


def _is_saved_dataset(folder: Path) -> bool:
    return (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()


def _read_json_file(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as exc:
        raise BenchmarkDataError(f"{path}: line {exc.lineno}: not valid JSON ({exc.msg})", path) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise BenchmarkDataError(f"{path} could not be read ({exc})", path) from exc


def _arrow_table_of(folder: Path):
    """The pyarrow Table of one saved ``Dataset`` folder."""
    pa, _ = _pyarrow()
    try:
        import datasets  # type: ignore
    except ImportError:
        datasets = None
    if datasets is not None:
        try:
            ds = datasets.load_from_disk(str(folder))
        except Exception as exc:  # datasets raises many types here; report them all the same way
            raise BenchmarkDataError(f"{folder} could not be loaded with datasets.load_from_disk ({exc})",
                                     folder) from exc
        if not isinstance(ds, datasets.Dataset):
            raise BenchmarkDataError(f"{folder} is not a single saved Dataset", folder)
        table = ds.data.table
        if getattr(ds, "_indices", None) is not None:
            table = table.take(ds._indices.column(0))
        return table
    state_path = folder / "state.json"
    state = _read_json_file(state_path)
    try:
        names = [entry["filename"] for entry in state["_data_files"]]
    except (KeyError, TypeError) as exc:
        raise BenchmarkDataError(f"{state_path} has no '_data_files' list of {{'filename': ...}}", state_path) from exc
    tables = []
    for name in names:
        arrow_path = folder / name
        if not arrow_path.is_file():
            raise BenchmarkDataError(f"{arrow_path} (listed in {state_path}) does not exist", arrow_path)
        try:
            tables.append(pa.ipc.open_stream(pa.memory_map(str(arrow_path))).read_all())
        except (pa.ArrowException, OSError) as exc:
            raise BenchmarkDataError(f"{arrow_path} could not be read as an Arrow stream ({exc})", arrow_path) from exc
    if not tables:
        raise BenchmarkDataError(f"{state_path} lists no data files", state_path)
    try:
        return pa.concat_tables(tables)
    except pa.ArrowException as exc:
        raise BenchmarkDataError(f"the data files of {folder} do not share one schema ({exc})", folder) from exc


def _hf_disk_sources(spec: TaskSpec, root: Path, split: str | None) -> tuple[list[_Source], str, str | None]:
    wanted = split or spec.default_split
    if (root / "dataset_dict.json").is_file():
        info = _read_json_file(root / "dataset_dict.json")
        splits = list(info.get("splits", [])) if isinstance(info, dict) else []
        category = None
        chosen = wanted
        if wanted not in splits:
            if wanted in spec.category_splits and spec.default_split in splits:
                chosen, category = spec.default_split, wanted
            else:
                raise BenchmarkDataError(
                    f"{root} has no split {wanted!r}; splits: {', '.join(splits) or 'none'}", root)
        folder = root / chosen
        return [_TableSource(_arrow_table_of(folder), str(folder), folder)], chosen, category
    category = wanted if wanted in spec.category_splits else None
    return [_TableSource(_arrow_table_of(root), str(root), root)], wanted, category


# --------------------------------------------------------------------------------------------
# format detection


def _llava_question_file(spec: TaskSpec, folder: Path) -> Path | None:
    for name in spec.llava_files:
        if (folder / name).is_file():
            return folder / name
    return None


def _is_mme_release(folder: Path) -> bool:
    if not folder.is_dir():
        return False
    for sub in folder.iterdir():
        if sub.is_dir() and ((sub / "questions_answers_YN").is_dir() or any(sub.glob("*.txt"))):
            return True
    return False


def detect_format(task: str, path: str | os.PathLike) -> str:
    """Which of :data:`FORMATS` ``path`` holds for ``task``."""
    spec = _spec(task)
    p = Path(path)
    if not p.exists():
        raise BenchmarkDataError(f"{p} does not exist", p)
    if p.is_file():
        suffix = p.suffix.lower()
        if suffix == ".parquet":
            return "parquet"
        if suffix in (".jsonl", ".json"):
            return "llava"
        if suffix == ".tsv":
            return "tsv"
        raise BenchmarkDataError(
            f"{p}: unknown benchmark file type {suffix!r} (expected .parquet, .jsonl, .json or .tsv)", p)
    if _is_saved_dataset(p):
        return "hf_disk"
    if _find(p, (".parquet",)):
        return "parquet"
    if spec.name == "gqa" and any(_is_saved_dataset(sub) for sub in p.iterdir() if sub.is_dir()):
        return "hf_disk"
    if spec.name.startswith("mmbench") and (_llava_question_file(spec, p) or list(p.glob("*.tsv"))):
        return "tsv"
    if _llava_question_file(spec, p) or (list(p.glob("*.jsonl")) and spec.name != "mme"):
        return "llava"
    if spec.name == "scienceqa_img" and list(p.glob("*.json")):
        return "llava"
    if spec.name == "mme":
        if list(p.glob("*.jsonl")):
            return "llava"
        if _is_mme_release(p) or _is_mme_release(p / "MME_Benchmark_release_version"):
            return "mme_folder"
    raise BenchmarkDataError(
        f"no benchmark data for {spec.name} under {p}: no .parquet files, no save_to_disk folder, "
        f"no question file ({', '.join(spec.llava_files) or '*.jsonl'})", p)


def _spec(task: str) -> TaskSpec:
    try:
        return TASKS[task]
    except KeyError:
        raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}") from None


# --------------------------------------------------------------------------------------------
# reading tabular data into records


def _check_columns(spec: TaskSpec, source: _Source, needed: Sequence[str]) -> None:
    missing = [c for c in needed if c not in source.names]
    if missing:
        raise BenchmarkDataError(
            f"{source.origin}: column {missing[0]!r} required by {spec.name} is missing"
            + (f" (also missing: {', '.join(missing[1:])})" if len(missing) > 1 else "")
            + f"; columns found: {', '.join(source.names)}", source.origin)


@dataclass
class _Draft:
    """A record in the making (LLaVA files are joined with annotation files before records exist)."""

    raw_id: str
    question: str
    answer: str | None = None
    answers: list[str] = field(default_factory=list)
    options: dict[str, str] = field(default_factory=dict)
    category: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    images: tuple[_ImageRef, ...] = ()


def _finish(spec: TaskSpec, drafts: list[_Draft]) -> list[Record]:
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
                              d.category, meta, tuple(d.images)))
    return records


def _rows_to_drafts(spec: TaskSpec, sources: list[_Source], *, split: str, category: str | None,
                    limit: int | None, pre: str, post: str, fmt: str,
                    image_lookup: Callable[[dict], tuple[_ImageRef, ...]] | None = None) -> list[_Draft]:
    needed = list(spec.required_columns)
    if split == spec.default_split:
        needed += [c for c in spec.answer_columns if c not in needed]
    if category is not None and "category" not in needed:
        needed.append("category")
    if image_lookup is not None:
        needed = [c for c in needed if c != "image"]
    build = _BUILDERS[spec.name]
    drafts: list[_Draft] = []
    running = 0
    for source in sources:
        _check_columns(spec, source, needed)
        columns = [c for c in source.names if c not in source.image_columns]
        images = [c for c in source.names if c in source.image_columns]
        for row_index, row in source.iter_rows(columns):
            if limit is not None and len(drafts) >= limit:
                return drafts
            global_index = running + row_index
            if category is not None and row.get("category") != category:
                continue
            try:
                built = build(row, pre, post)
            except BenchmarkDataError as exc:
                raise BenchmarkDataError(f"{source.origin} row {row_index}: {exc}", source.origin) from exc
            refs = image_lookup(row) if image_lookup else tuple(_CellImage(source, row_index, c) for c in images)
            meta = {k: v for k, v in row.items()}
            meta.update(format=fmt, file=source.origin, row=row_index, split=split, raw_question=built.raw_question)
            raw_id = built.raw_id if built.raw_id is not None else str(global_index)
            drafts.append(_Draft(raw_id, built.question, built.answer, built.answers, built.options,
                                 built.category, meta, refs))
        running += getattr(source, "num_rows", 0)
    return drafts


def _parquet_sources(files: list[Path]) -> list[_Source]:
    return [_ParquetFileSource(f) for f in files]


def _read_tabular(spec: TaskSpec, root: Path, fmt: str, split: str | None, limit: int | None,
                  pre: str, post: str) -> list[Record]:
    if fmt == "parquet":
        sel = _select_parquet(spec, root, split, spec.hf_config)
        sources, chosen, category = _parquet_sources(sel.files), sel.split, sel.category
    else:
        sources, chosen, category = _hf_disk_sources(spec, root, split)
    return _finish(spec, _rows_to_drafts(spec, sources, split=chosen, category=category, limit=limit,
                                         pre=pre, post=post, fmt=fmt))


def _gqa_part(root: Path, config: str, fmt: str, split: str) -> tuple[list[_Source], str]:
    """The instructions or images part of GQA: ``<config>/`` holding parquet shards or a
    ``save_to_disk`` folder, looked for in ``root``, next to it, or ``root`` itself."""
    if root.is_file():
        return [_ParquetFileSource(root)], str(root)
    candidates = [root] if root.name == config else []
    candidates += [root / config, root.parent / config]
    for folder in candidates:
        if not folder.is_dir():
            continue
        if _is_saved_dataset(folder):
            if (folder / "dataset_dict.json").is_file():
                info = _read_json_file(folder / "dataset_dict.json")
                splits = list(info.get("splits", [])) if isinstance(info, dict) else []
                if split not in splits:
                    raise BenchmarkDataError(f"{folder} has no split {split!r}; splits: {', '.join(splits)}", folder)
                folder = folder / split
            return [_TableSource(_arrow_table_of(folder), str(folder), folder)], str(folder)
        if fmt == "parquet":
            files = _find(folder, (".parquet",))
            if files:
                return _parquet_sources(_gqa_split(files, folder, config, split)), str(folder)
    if fmt == "parquet":  # deeper, e.g. <root>/GQA/<config>/testdev-00000-of-00001.parquet
        files = [f for f in _find(root, (".parquet",)) if config in f.relative_to(root).parts]
        if files:
            return _parquet_sources(_gqa_split(files, root, config, split)), str(root)
    raise BenchmarkDataError(
        f"GQA needs the {config!r} part of lmms-lab/GQA in or next to {root}: not found", root)


def _gqa_split(files: list[Path], folder: Path, config: str, split: str) -> list[Path]:
    chosen = [f for f in files if _split_of(f) == split]
    if chosen:
        return chosen
    if not any(_split_of(f) for f in files):
        return files
    found = sorted({str(_split_of(f)) for f in files})
    raise BenchmarkDataError(
        f"no GQA {config} parquet for split {split!r} under {folder}; splits found: {', '.join(found)}", folder)


def _read_gqa(spec: TaskSpec, root: Path, fmt: str, split: str | None, limit: int | None,
              pre: str, post: str) -> list[Record]:
    wanted = split or spec.default_split
    instr_cfg = f"{wanted}_balanced_instructions"
    image_cfg = f"{wanted}_balanced_images"
    instructions, _ = _gqa_part(root, instr_cfg, fmt, wanted)
    image_root = root if root.is_dir() else root.parent
    if image_root.name == instr_cfg:
        image_root = image_root.parent
    image_sources, image_origin = _gqa_part(image_root, image_cfg, fmt, wanted)
    by_id: dict[str, _ImageRef] = {}
    for source in image_sources:
        _check_columns(spec, source, ["id", "image"])
        for row_index, row in source.iter_rows(["id"]):
            by_id[_text(row["id"])] = _CellImage(source, row_index, "image")

    def lookup(row: dict) -> tuple[_ImageRef, ...]:
        ref = by_id.get(_text(row.get("imageId")))
        if ref is None:
            raise BenchmarkDataError(
                f"gqa: sample {row.get('id')}: image {row.get('imageId')!r} is missing from {image_origin}",
                image_origin)
        return (ref,)

    drafts = _rows_to_drafts(spec, instructions, split=wanted, category=None, limit=limit, pre=pre, post=post,
                             fmt=fmt, image_lookup=lookup)
    return _finish(spec, drafts)


# --------------------------------------------------------------------------------------------
# MMBench tsv


def _read_tsv(spec: TaskSpec, path: Path, limit: int | None, pre: str, post: str) -> list[Record]:
    if path.is_dir():
        found = _llava_question_file(spec, path)
        candidates = [found] if found else sorted(path.glob("*.tsv"))
        if len(candidates) != 1:
            raise BenchmarkDataError(
                f"{path}: expected one MMBench .tsv ({', '.join(spec.llava_files)}), found "
                f"{', '.join(c.name for c in candidates) or 'none'}", path)
        path = candidates[0]
    build = _BUILDERS[spec.name]
    previous_limit = csv.field_size_limit()
    drafts: list[_Draft] = []
    images_by_index: dict[str, str] = {}
    try:
        csv.field_size_limit(2**31 - 1)
        with open(path, encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh, delimiter="\t")
            header = reader.fieldnames or []
            missing = [c for c in (*spec.required_columns, *spec.answer_columns) if c not in header]
            if missing:
                raise BenchmarkDataError(
                    f"{path}: column {missing[0]!r} required by {spec.name} is missing; columns found: "
                    f"{', '.join(header)}", path)
            for line_no, raw in enumerate(reader, start=2):
                if limit is not None and len(drafts) >= limit:
                    break
                if None in raw:
                    raise BenchmarkDataError(f"{path}: line {line_no}: more fields than the header has", path)
                row = {k: (None if v == "" else v) for k, v in raw.items()}  # pandas reads empty cells as NaN
                index = _text(row["index"])
                image = row.get("image") or ""
                if len(image) <= 64 and image in images_by_index:  # VLMEvalKit-style reference to another row
                    image = images_by_index[image]
                if not image:
                    raise BenchmarkDataError(f"{path}: line {line_no}: sample {index} has no image", path)
                images_by_index[index] = image
                built = build(row, pre, post)
                meta = {k: v for k, v in row.items() if k != "image"}
                meta.update(format="tsv", file=str(path), line=line_no, split=spec.default_split,
                            raw_question=built.raw_question)
                ref = _Base64Image(image, f"{path} line {line_no} (base64)")
                drafts.append(_Draft(index, built.question, built.answer, built.answers, built.options,
                                     built.category, meta, (ref,)))
    except csv.Error as exc:
        raise BenchmarkDataError(f"{path}: malformed tsv ({exc})", path) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise BenchmarkDataError(f"{path} could not be read ({exc})", path) from exc
    finally:
        csv.field_size_limit(previous_limit)
    return _finish(spec, drafts)


# --------------------------------------------------------------------------------------------
# MME release folder


@dataclass
class _MMEEntry:
    category: str
    image: Path
    question: str
    answer: str
    qa_file: Path
    line: int


_IMAGE_SUFFIXES = (".jpg", ".png", ".jpeg", ".JPG", ".PNG", ".JPEG")


def _mme_entries(root: Path, check_images: bool) -> list[_MMEEntry]:
    entries = []
    for category_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if (category_dir / "images").is_dir():
            image_dir, qa_dir = category_dir / "images", category_dir / "questions_answers_YN"
        else:
            image_dir = qa_dir = category_dir
        if not qa_dir.is_dir():
            raise BenchmarkDataError(f"{category_dir} has images/ but no questions_answers_YN/", category_dir)
        for qa_file in sorted(qa_dir.glob("*.txt")):
            image = next((image_dir / f"{qa_file.stem}{s}" for s in _IMAGE_SUFFIXES
                          if (image_dir / f"{qa_file.stem}{s}").is_file()), None)
            if image is None:
                if check_images:
                    raise BenchmarkDataError(
                        f"mme: image for {qa_file} not found ({image_dir / qa_file.stem}.jpg/.png)", qa_file)
                image = image_dir / f"{qa_file.stem}.jpg"
            try:
                lines = qa_file.read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError) as exc:
                raise BenchmarkDataError(f"{qa_file} could not be read ({exc})", qa_file) from exc
            for line_no, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                parts = line.strip().split("\t")
                if len(parts) != 2:
                    raise BenchmarkDataError(
                        f"{qa_file}: line {line_no}: expected 'question<TAB>answer', got {line!r}", qa_file)
                entries.append(_MMEEntry(category_dir.name, image, parts[0], parts[1], qa_file, line_no))
    if not entries:
        raise BenchmarkDataError(f"{root}: no MME question files (<category>/*.txt or "
                                 f"<category>/questions_answers_YN/*.txt)", root)
    return entries


def _mme_root(path: Path) -> Path:
    inner = path / "MME_Benchmark_release_version"
    return inner if inner.is_dir() else path


def _read_mme_folder(spec: TaskSpec, path: Path, limit: int | None, pre: str, post: str,
                     check_images: bool) -> list[Record]:
    root = _mme_root(path)
    drafts = []
    for e in _mme_entries(root, check_images):
        if limit is not None and len(drafts) >= limit:
            break
        qid = e.image.relative_to(root).as_posix()
        built = _build_mme({"question_id": qid, "question": e.question, "answer": e.answer,
                            "category": e.category}, pre, post)
        meta = {"format": "mme_folder", "file": str(e.qa_file), "line": e.line, "split": spec.default_split,
                "raw_question": e.question}
        drafts.append(_Draft(qid, built.question, built.answer, built.answers, {}, e.category, meta,
                             (_FileImage(e.image),)))
    return _finish(spec, drafts)


# --------------------------------------------------------------------------------------------
# LLaVA question files


_OPTION_LINE = re.compile(r"^([A-E])\. (.*)$")


def _parse_options(text: str) -> dict[str, str]:
    options = {}
    for line in text.split("\n"):
        m = _OPTION_LINE.match(line)
        if m:
            options[m.group(1)] = m.group(2)
    return options


def _read_jsonl(path: Path) -> list[tuple[int, dict]]:
    rows = []
    try:
        with open(path, encoding="utf-8") as fh:
            for line_no, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise BenchmarkDataError(f"{path}: line {line_no}: not valid JSON ({exc.msg})", path) from exc
                if not isinstance(obj, dict):
                    raise BenchmarkDataError(f"{path}: line {line_no}: expected a JSON object, got "
                                             f"{type(obj).__name__}", path)
                rows.append((line_no, obj))
    except (OSError, UnicodeDecodeError) as exc:
        raise BenchmarkDataError(f"{path} could not be read ({exc})", path) from exc
    return rows


def _require_keys(path: Path, where: str, obj: dict, keys: Sequence[str]) -> None:
    for key in keys:
        if key not in obj:
            raise BenchmarkDataError(f"{path}: {where}: key {key!r} is missing; keys found: "
                                     f"{', '.join(obj) or 'none'}", path)


def _llava_files(spec: TaskSpec, path: Path) -> Path:
    if path.is_file():
        return path
    found = _llava_question_file(spec, path)
    if found:
        return found
    candidates = sorted(path.glob("*.jsonl")) + (sorted(path.glob("*.json")) if spec.name == "scienceqa_img" else [])
    if len(candidates) == 1:
        return candidates[0]
    raise BenchmarkDataError(
        f"{path}: cannot tell the {spec.name} question file ({', '.join(spec.llava_files)}); found "
        f"{', '.join(c.name for c in candidates) or 'no .jsonl files'}", path)


def _image_folder(spec: TaskSpec, qfile: Path, image_folder: str | os.PathLike | None) -> Path:
    if image_folder is not None:
        folder = Path(image_folder)
        if not folder.is_dir():
            raise BenchmarkDataError(f"image folder {folder} does not exist", folder)
        return folder
    tried = [qfile.parent / d for d in spec.llava_image_dirs]
    for folder in tried:
        if folder.is_dir():
            return folder
    raise BenchmarkDataError(
        f"no image folder for {qfile}: tried {', '.join(map(str, tried)) or 'nothing'}; pass image_folder=", qfile)


def _llava_drafts(spec: TaskSpec, qfile: Path, folder: Path) -> list[_Draft]:
    drafts = []
    if spec.name == "scienceqa_img":
        entries = _read_json_file(qfile)
        if not isinstance(entries, list):
            raise BenchmarkDataError(f"{qfile}: expected a JSON list of LLaVA conversations", qfile)
        for i, e in enumerate(entries):
            where = f"entry {i}"
            if not isinstance(e, dict):
                raise BenchmarkDataError(f"{qfile}: {where}: expected a JSON object", qfile)
            _require_keys(qfile, where, e, ("id", "conversations"))
            if "image" not in e:  # scienceqa_img: the questions that come with an image
                continue
            turns = e["conversations"]
            if not isinstance(turns, list) or not turns or not isinstance(turns[0], dict) or "value" not in turns[0]:
                raise BenchmarkDataError(f"{qfile}: {where}: 'conversations' has no human turn with a 'value'", qfile)
            text = _text(turns[0]["value"]).replace("<image>", "").strip()
            answer = None
            if len(turns) > 1 and isinstance(turns[1], dict):
                reply = _text(turns[1].get("value")).strip()
                m = re.fullmatch(r"([A-E])", reply) or re.search(r"The answer is ([A-E])", reply)
                answer = m.group(1) if m else None
            meta = {"raw_question": text, "image": e["image"], "entry": i}
            drafts.append(_Draft(_text(e["id"]), f"{text}{OPTION_POST}", answer, [answer] if answer else [],
                                 _parse_options(text), None, meta, (_FileImage(folder / e["image"]),)))
        return drafts
    for line_no, obj in _read_jsonl(qfile):
        _require_keys(qfile, f"line {line_no}", obj, ("question_id", "image", "text"))
        text = _text(obj["text"])
        category = obj.get("category")
        answers = _answer_texts(obj.get("answers")) if "answers" in obj else []
        answer = next((_text(obj[k]) for k in ("answer", "label", "gpt_answer") if not _missing(obj.get(k))), None)
        if answer is None:
            answer = _majority(answers)
        if answer is not None and not answers:
            answers = [answer]
        meta = {k: v for k, v in obj.items() if k != "text"}
        meta.update(raw_question=text, line=line_no)
        options = _parse_options(text) if spec.kind == "multiple_choice" else {}
        drafts.append(_Draft(_text(obj["question_id"]), text, answer, answers, options,
                             None if category in (None, "default") else _text(category), meta,
                             (_FileImage(folder / _text(obj["image"])),)))
    return drafts


def _first_file(*candidates: Path) -> Path | None:
    return next((c for c in candidates if c.is_file()), None)


def _no_entry(spec: TaskSpec, draft: _Draft, ann: Path, key: Any) -> BenchmarkDataError:
    return BenchmarkDataError(f"{spec.name}: {ann} has no entry for sample {draft.raw_id} (key {key!r})", ann)


def _join_textvqa(spec, drafts, qfile, folder, ann):
    ann = ann or _first_file(qfile.parent / "TextVQA_0.5.1_val.json")
    if ann is None:
        return
    data = _read_json_file(ann)
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise BenchmarkDataError(f"{ann}: expected {{'data': [...]}} (TextVQA annotation file)", ann)
    table = {(_text(d.get("image_id")), _text(d.get("question")).lower()): d for d in data["data"]}
    for d in drafts:
        lines = d.question.split("\n")
        question = lines[1] if lines[0].startswith("Reference OCR token:") and len(lines) > 1 else lines[0]
        key = (d.raw_id, question.lower())
        entry = table.get(key)
        if entry is None:
            raise _no_entry(spec, d, ann, key)
        d.answers = _answer_texts(entry.get("answers"))
        d.answer = _majority(d.answers)
        d.meta["textvqa_question_id"] = entry.get("question_id")


def _join_pope(spec, drafts, qfile, folder, ann):
    base = ann if ann is not None else next(
        (c for c in (qfile.parent / "coco", qfile.parent) if any(c.glob("coco_pope_*.json"))), None)
    if base is None:
        return
    by_category: dict[str, list[_Draft]] = {}
    for d in drafts:
        by_category.setdefault(d.category or "", []).append(d)
    for category, group in by_category.items():
        label_file = base if base.is_file() else base / f"coco_pope_{category}.json"
        if not label_file.is_file():
            raise BenchmarkDataError(f"pope: no label file {label_file} for category {category!r}", label_file)
        labels = _read_jsonl(label_file)
        if len(labels) != len(group):
            raise BenchmarkDataError(
                f"pope: {label_file} has {len(labels)} labels but {qfile} has {len(group)} "
                f"questions of category {category!r}", label_file)
        for d, (line_no, lab) in zip(group, labels):
            _require_keys(label_file, f"line {line_no}", lab, ("label",))
            if "image" in lab and _text(lab["image"]) != _text(d.meta.get("image")):
                raise BenchmarkDataError(
                    f"pope: {label_file} line {line_no} is about {lab['image']} but sample {d.raw_id} "
                    f"shows {d.meta.get('image')}", label_file)
            d.answer = _text(lab["label"])
            d.answers = [d.answer]


def _join_gqa(spec, drafts, qfile, folder, ann):
    name = "testdev_balanced_questions.json"
    ann = ann or _first_file(qfile.parent / name, qfile.parent / "data" / name, folder.parent / name)
    if ann is None:
        return
    data = _read_json_file(ann)
    if not isinstance(data, dict):
        raise BenchmarkDataError(f"{ann}: expected a JSON object keyed by question id (GQA questions file)", ann)
    for d in drafts:
        entry = data.get(d.raw_id)
        if not isinstance(entry, dict) or "answer" not in entry:
            raise _no_entry(spec, d, ann, d.raw_id)
        d.answer = _text(entry["answer"])
        d.answers = [d.answer]
        d.meta["fullAnswer"] = entry.get("fullAnswer")
        d.meta["types"] = entry.get("types")


def _mme_key(category: str, stem: str, question: str) -> tuple[str, str, str]:
    q = question.replace(VQA_POST.strip(), "").replace("Please answer yes or no.", "")
    return category, stem, " ".join(q.split())


def _join_mme(spec, drafts, qfile, folder, ann):
    root = _mme_root(ann) if ann is not None else folder
    if not _is_mme_release(root):
        return
    gt = {_mme_key(e.category, e.qa_file.stem, e.question): e.answer for e in _mme_entries(root, False)}
    for d in drafts:
        category = d.category or d.raw_id.split("/")[0]
        key = _mme_key(category, Path(_text(d.meta.get("image"))).stem, d.question)
        if key not in gt:
            raise _no_entry(spec, d, root, key)
        d.answer = gt[key]
        d.answers = [d.answer]
        d.category = category


def _join_scienceqa(spec, drafts, qfile, folder, ann):
    ann = ann or _first_file(qfile.parent / "problems.json")
    if ann is None:
        return
    problems = _read_json_file(ann)
    if not isinstance(problems, dict):
        raise BenchmarkDataError(f"{ann}: expected a JSON object keyed by problem id (ScienceQA problems.json)", ann)
    for d in drafts:
        prob = problems.get(d.raw_id)
        if not isinstance(prob, dict):
            raise _no_entry(spec, d, ann, d.raw_id)
        if d.answer is None and "answer" in prob:
            d.answer = chr(ord("A") + int(prob["answer"]))
            d.answers = [d.answer]
        d.category = None if _missing(prob.get("category")) else _text(prob.get("category"))
        for key in ("subject", "topic", "grade", "skill"):
            if key in prob:
                d.meta[key] = prob[key]


def _join_mmvet(spec, drafts, qfile, folder, ann):
    ann = ann or _first_file(qfile.parent / "mm-vet.json", folder.parent / "mm-vet.json")
    if ann is None:
        return
    data = _read_json_file(ann)
    if not isinstance(data, dict):
        raise BenchmarkDataError(f"{ann}: expected a JSON object keyed 'v1_<n>' (MM-Vet mm-vet.json)", ann)
    for d in drafts:
        key = d.raw_id if d.raw_id in data else f"v1_{d.raw_id}"
        entry = data.get(key)
        if not isinstance(entry, dict) or "answer" not in entry:
            raise _no_entry(spec, d, ann, key)
        d.answer = _text(entry["answer"])
        d.answers = [d.answer]
        cap = entry.get("capability")
        d.category = ",".join(map(str, cap)) if isinstance(cap, list) else (None if cap is None else _text(cap))


def _join_llava_wild(spec, drafts, qfile, folder, ann):
    ann = ann or _first_file(qfile.parent / "answers_gpt4.jsonl")
    if ann is None:
        return
    answers = {_text(obj.get("question_id")): obj for _, obj in _read_jsonl(ann)}
    for d in drafts:
        entry = answers.get(d.raw_id)
        if entry is None or "text" not in entry:
            raise _no_entry(spec, d, ann, d.raw_id)
        d.answer = _text(entry["text"])
        d.answers = [d.answer]


def _join_seedbench(spec, drafts, qfile, folder, ann):
    ann = ann or _first_file(qfile.parent / "SEED-Bench.json")
    if ann is None:
        return
    data = _read_json_file(ann)
    questions = data.get("questions") if isinstance(data, dict) else None
    if not isinstance(questions, list):
        raise BenchmarkDataError(f"{ann}: expected {{'questions': [...]}} (SEED-Bench.json)", ann)
    table = {_text(q.get("question_id")): q for q in questions if isinstance(q, dict)}
    for d in drafts:
        entry = table.get(d.raw_id)
        if entry is None or "answer" not in entry:
            raise _no_entry(spec, d, ann, d.raw_id)
        d.answer = _text(entry["answer"])
        d.answers = [d.answer]
        for key in ("data_type", "question_type_id", "data_id"):
            if key in entry:
                d.meta[key] = entry[key]


def _join_vqa_by_image(spec, drafts, qfile, folder, ann):
    """VizWiz's official annotation list (``val.json``): entries keyed by image file name."""
    if ann is None:
        return
    data = _read_json_file(ann)
    if not isinstance(data, list):
        raise BenchmarkDataError(f"{ann}: expected a JSON list of {{'image', 'question', 'answers'}}", ann)
    table = {_text(e.get("image")): e for e in data if isinstance(e, dict)}
    for d in drafts:
        entry = table.get(_text(d.meta.get("image")))
        if entry is None or "answers" not in entry:
            raise _no_entry(spec, d, ann, d.meta.get("image"))
        d.answers = _answer_texts(entry["answers"])
        d.answer = _majority(d.answers)


def _join_vqav2(spec, drafts, qfile, folder, ann):
    """VQA v2's official annotation file (``v2_mscoco_val2014_annotations.json``)."""
    if ann is None:
        return
    data = _read_json_file(ann)
    annotations = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(annotations, list):
        raise BenchmarkDataError(f"{ann}: expected {{'annotations': [...]}} (VQA v2 annotation file)", ann)
    table = {_text(a.get("question_id")): a for a in annotations if isinstance(a, dict)}
    for d in drafts:
        entry = table.get(d.raw_id)
        if entry is None:
            raise _no_entry(spec, d, ann, d.raw_id)
        d.answers = _answer_texts(entry.get("answers"))
        mc = entry.get("multiple_choice_answer")
        d.answer = _text(mc) if mc is not None else _majority(d.answers)
        d.category = entry.get("answer_type", d.category)


_JOINERS: Mapping[str, Callable] = MappingProxyType({
    "textvqa_val": _join_textvqa,
    "vqav2_val": _join_vqav2,
    "vizwiz_vqa_val": _join_vqa_by_image,
    "pope": _join_pope,
    "mme": _join_mme,
    "scienceqa_img": _join_scienceqa,
    "seedbench": _join_seedbench,
    "gqa": _join_gqa,
    "mmvet": _join_mmvet,
    "llava_in_the_wild": _join_llava_wild,
})


def _read_llava(spec: TaskSpec, path: Path, split: str | None, limit: int | None,
                image_folder: str | os.PathLike | None, annotation_file: str | os.PathLike | None,
                check_images: bool) -> list[Record]:
    qfile = _llava_files(spec, path)
    folder = _image_folder(spec, qfile, image_folder)
    ann = None
    if annotation_file is not None:
        ann = Path(annotation_file)
        if not ann.exists():
            raise BenchmarkDataError(f"annotation file {ann} does not exist", ann)
    drafts = _llava_drafts(spec, qfile, folder)
    if split is not None and split != spec.default_split:
        if split not in spec.category_splits:
            hint = f" (category splits: {', '.join(spec.category_splits)})" if spec.category_splits else ""
            raise ValueError(f"{qfile} is a single LLaVA question file; split={split!r} cannot be selected from it"
                             + hint)
        drafts = [d for d in drafts if d.category == split]
    _JOINERS[spec.name](spec, drafts, qfile, folder, ann)
    if limit is not None:
        drafts = drafts[:limit]
    for d in drafts:
        d.meta.update(format="llava", file=str(qfile), split=split)
        if check_images:
            for ref in d.images:
                if isinstance(ref, _FileImage) and not ref.path.is_file():
                    raise BenchmarkDataError(
                        f"{spec.name}: sample {d.raw_id} ({qfile}): image file not found: {ref.path}", ref.path)
    return _finish(spec, drafts)


# --------------------------------------------------------------------------------------------
# entry point


def read_benchmark(
    task: str,
    path: str | os.PathLike,
    *,
    split: str | None = None,
    limit: int | None = None,
    format: str | None = None,
    image_folder: str | os.PathLike | None = None,
    annotation_file: str | os.PathLike | None = None,
    pre_prompt: str | None = None,
    post_prompt: str | None = None,
    check_images: bool = True,
    ocr_tokens: bool | None = None,
) -> list[Record]:
    """Read benchmark ``task`` (an lmms-eval task name, see :data:`TASKS`) from ``path``.

    ``path`` is a parquet file or folder, a ``save_to_disk`` folder, a LLaVA question file (or its
    folder), an MMBench ``.tsv`` or an MME release folder; ``format`` (one of :data:`FORMATS`)
    overrides the detection.  ``split`` defaults to the split lmms-eval evaluates; POPE also
    accepts ``adversarial`` / ``popular`` / ``random``.  ``limit`` keeps the first records.

    LLaVA files: ``image_folder`` defaults to LLaVA's layout next to the question file and
    ``annotation_file`` to the ground-truth file LLaVA's scripts use (TextVQA_0.5.1_val.json,
    coco/coco_pope_*.json, testdev_balanced_questions.json, problems.json, mm-vet.json,
    answers_gpt4.jsonl, SEED-Bench.json, the MME release folder); VizWiz and VQAv2 answers are
    joined only from an ``annotation_file`` given explicitly.  ``check_images`` checks that
    every image file of a LLaVA or MME folder exists while reading.

    ``pre_prompt`` / ``post_prompt`` replace the task's lmms-eval defaults where the prompt is
    built from raw fields (not for LLaVA question files, whose prompts are finished).

    ``ocr_tokens`` (TextVQA only): whether the prompt carries the reference OCR tokens
    (``"<Question>\\nReference OCR token: a, b, ...\\n<post prompt>"``), as LLaVA-1.5's published
    results do (its ``llava_textvqa_val_v051_ocr.jsonl``; lmms-eval's ``ocr`` option). ``None``:
    with them where the files have them (the ``ocr_tokens`` column, or LLaVA's file), which
    reproduces the paper; ``False``: without (lmms-eval's default task); ``True``: with them, or
    an error if the files lack them. Each record says which in ``meta["ocr_reference"]``.
    """
    spec = _spec(task)
    if ocr_tokens is not None and spec.name != "textvqa_val":
        raise ValueError(f"ocr_tokens is a TextVQA option, not {spec.name}'s")
    records = _read_records(spec, task, path, split=split, limit=limit, format=format, image_folder=image_folder,
                            annotation_file=annotation_file, pre_prompt=pre_prompt, post_prompt=post_prompt,
                            check_images=check_images)
    if spec.name == "textvqa_val":
        pre = spec.pre_prompt if pre_prompt is None else pre_prompt
        post = spec.post_prompt if post_prompt is None else post_prompt
        records = _textvqa_ocr_prompts(records, ocr_tokens, pre, post)
    return records


#: the line LLaVA-1.5 and lmms-eval put between a TextVQA question and its answer instruction
OCR_REFERENCE = "Reference OCR token:"


def _textvqa_ocr_prompts(records: list[Record], wanted: bool | None, pre: str, post: str) -> list[Record]:
    """TextVQA prompts with or without the reference OCR tokens (:func:`read_benchmark`)."""
    out = []
    for record in records:
        question, has = record.question, OCR_REFERENCE in record.question
        if record.meta.get("format") == "llava":  # finished prompts, the OCR line included
            if wanted is False and has:
                question = "\n".join(line for line in question.split("\n") if not line.startswith(OCR_REFERENCE))
                has = False
            elif wanted is True and not has:
                raise BenchmarkDataError(f"{record.meta.get('file')}: ocr_tokens=True, but this LLaVA question file "
                                         f"has no '{OCR_REFERENCE}' lines", record.meta.get("file"))
        else:
            tokens = record.meta.get("ocr_tokens")
            if wanted is not False and tokens is not None:
                question = (f"{pre}{_text(record.meta.get('raw_question')).capitalize()}\n{OCR_REFERENCE} "
                            f"{', '.join(map(str, tokens))}{post}")
                has = True
            elif wanted is True:
                raise BenchmarkDataError(f"{record.meta.get('file')}: ocr_tokens=True needs the 'ocr_tokens' column, "
                                         f"which these files lack", record.meta.get("file"))
        out.append(replace(record, question=question, meta={**record.meta, "ocr_reference": has}))
    return out


def _read_records(spec: TaskSpec, task: str, path, *, split, limit, format, image_folder, annotation_file, pre_prompt,
                  post_prompt, check_images) -> list[Record]:
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 0):
        raise ValueError(f"limit must be a non-negative int or None, got {limit!r}")
    if format is not None and format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; known formats: {', '.join(FORMATS)}")
    root = Path(path)
    if not root.exists():
        raise BenchmarkDataError(f"{spec.name}: {root} does not exist", root)
    fmt = format or detect_format(task, root)
    if limit == 0:
        return []
    pre = spec.pre_prompt if pre_prompt is None else pre_prompt
    post = spec.post_prompt if post_prompt is None else post_prompt
    if fmt == "llava":
        if pre_prompt is not None or post_prompt is not None:
            raise ValueError("pre_prompt/post_prompt cannot be applied to LLaVA question files: their prompts are "
                             "finished text")
        return _read_llava(spec, root, split, limit, image_folder, annotation_file, check_images)
    if annotation_file is not None or image_folder is not None:
        raise ValueError(f"image_folder/annotation_file only apply to LLaVA question files, not format {fmt!r}")
    if fmt == "tsv":
        if not spec.name.startswith("mmbench"):
            raise ValueError(f"the tsv format is MMBench's; task {spec.name} has none")
        if split not in (None, spec.default_split):
            raise ValueError(f"an MMBench tsv is a single split; split={split!r} cannot be selected from it")
        return _read_tsv(spec, root, limit, pre, post)
    if fmt == "mme_folder":
        if spec.name != "mme":
            raise ValueError(f"the mme_folder format is MME's, not {spec.name}'s")
        if split not in (None, spec.default_split):
            raise ValueError(f"the MME release folder is a single split; split={split!r} cannot be selected from it")
        return _read_mme_folder(spec, root, limit, pre, post, check_images)
    if spec.name == "gqa":
        return _read_gqa(spec, root, fmt, split, limit, pre, post)
    return _read_tabular(spec, root, fmt, split, limit, pre, post)
