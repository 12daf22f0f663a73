"""Reading the benchmark files people already have on disk.

``read_benchmark(task, path)`` turns one benchmark of the paper's evaluation into a list of
:class:`~ficoco.evaluation.records.Record`, whatever form the files take (one of
:data:`~ficoco.evaluation.formats.FORMATS`):

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

Video benchmarks (TGIF-QA, MSVD-QA, MSRVTT-QA, ActivityNet-QA) come as a parquet (lmms-lab's
columns) or as Video-LLaVA's ``test_q.json`` / ``test_a.json`` (the ``llava`` form), with their
video archive extracted into a folder beside them (or ``video_folder``); each record names its
video file (:meth:`Record.video`), decoded only when a model reads its frames.

Prompts: for the formats that carry the raw fields (parquet, hf_disk, tsv, mme_folder) the
``question`` of a record is the prompt lmms-eval's task builds (``doc_to_text`` with the
default ``lmms_eval_specific_kwargs``: options, hints and post-prompt included).  LLaVA's
question files carry a finished prompt; it is used verbatim (ScienceQA gets the
``--single-pred-prompt`` sentence that ``model_vqa_science.py`` appends).

Nothing is downloaded.  Images are decoded lazily by :meth:`Record.image`, videos by the model's
inputs (:mod:`ficoco.evaluation.model_inputs`).  Every problem with
the files raises :class:`~ficoco.evaluation.records.BenchmarkDataError` naming the file.

This module only dispatches: how each form is read is in :mod:`ficoco.evaluation.formats`, what
each benchmark's rows mean in its module of :mod:`ficoco.evaluation.tasks`.
"""

from __future__ import annotations

import os
from pathlib import Path

from .formats import FORMATS
from .formats.files import (
    find_files,
    is_saved_dataset,
    llava_question_file,
    select_parquet,
)
from .formats.llava import llava_drafts, read_llava
from .formats.tables import hf_disk_sources, parquet_sources, rows_to_drafts
from .formats.tsv import read_tsv
from .formats.videos import VideoFile, video_folders
from .records import BenchmarkDataError, Record, TaskSpec, finish_records
from .tasks import JOINERS, REGISTRY, task_spec
from .tasks.gqa import read_gqa
from .tasks.mme import is_mme_release, read_mme_folder
from .tasks.textvqa import ocr_prompts

__all__ = ["detect_format", "read_benchmark"]


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
    video_folder: str | os.PathLike | None = None,
) -> list[Record]:
    """Read benchmark ``task`` (an lmms-eval task name, see :data:`~ficoco.evaluation.tasks.TASKS`) from ``path``.

    ``path`` is a parquet file or folder, a ``save_to_disk`` folder, a LLaVA question file (or its
    folder), an MMBench ``.tsv`` or an MME release folder; ``format`` (one of
    :data:`~ficoco.evaluation.formats.FORMATS`) overrides the detection.  ``split`` defaults to the
    split lmms-eval evaluates; POPE also accepts ``adversarial`` / ``popular`` / ``random``.
    ``limit`` keeps the first records.

    LLaVA files: ``image_folder`` defaults to LLaVA's layout next to the question file and
    ``annotation_file`` to the ground-truth file LLaVA's scripts use (TextVQA_0.5.1_val.json,
    coco/coco_pope_*.json, testdev_balanced_questions.json, problems.json, mm-vet.json,
    answers_gpt4.jsonl, SEED-Bench.json, the MME release folder); VizWiz and VQAv2 answers are
    joined only from an ``annotation_file`` given explicitly.  ``check_images`` checks that
    every image file of a LLaVA or MME folder exists while reading.

    ``pre_prompt`` / ``post_prompt`` replace the task's lmms-eval defaults where the prompt is
    built from raw fields (not for LLaVA question files, whose prompts are finished).

    Video benchmarks: ``video_folder`` is where the extracted videos are; by default the task's
    folders (e.g. ``all_test/``, ``videos/``) beside the parquet / question file or under
    ``path``. With ``check_images`` every video is looked for while reading (a missing one is
    named).

    ``ocr_tokens`` (TextVQA only): whether the prompt carries the reference OCR tokens
    (``"<Question>\\nReference OCR token: a, b, ...\\n<post prompt>"``), as LLaVA-1.5's published
    results do (its ``llava_textvqa_val_v051_ocr.jsonl``; lmms-eval's ``ocr`` option). ``None``:
    with them where the files have them (the ``ocr_tokens`` column, or LLaVA's file), which
    reproduces the paper; ``False``: without (lmms-eval's default task); ``True``: with them, or
    an error if the files lack them. Each record says which in ``meta["ocr_reference"]``.
    """
    spec = task_spec(task)
    if ocr_tokens is not None and spec.name != "textvqa_val":
        raise ValueError(f"ocr_tokens is a TextVQA option, not {spec.name}'s")
    if video_folder is not None and spec.modality != "video":
        raise ValueError(f"video_folder is for video benchmarks, not {spec.name}")
    if video_folder is not None and not Path(video_folder).is_dir():
        raise BenchmarkDataError(f"{spec.name}: video folder {video_folder} does not exist", video_folder)
    records = _read_records(spec, task, path, split=split, limit=limit, format=format, image_folder=image_folder,
                            annotation_file=annotation_file, pre_prompt=pre_prompt, post_prompt=post_prompt,
                            check_images=check_images, video_folder=video_folder)
    if spec.name == "textvqa_val":
        pre = spec.pre_prompt if pre_prompt is None else pre_prompt
        post = spec.post_prompt if post_prompt is None else post_prompt
        records = ocr_prompts(records, ocr_tokens, pre, post)
    return records


def _read_records(spec: TaskSpec, task: str, path, *, split, limit, format, image_folder, annotation_file, pre_prompt,
                  post_prompt, check_images, video_folder) -> list[Record]:
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
        return read_llava(spec, root, split, limit, image_folder or video_folder, annotation_file, check_images,
                          joiners=JOINERS, read_drafts=REGISTRY[spec.name].llava_drafts or llava_drafts)
    if annotation_file is not None or image_folder is not None:
        raise ValueError(f"image_folder/annotation_file only apply to LLaVA question files, not format {fmt!r}")
    if fmt == "tsv":
        if not spec.name.startswith("mmbench"):
            raise ValueError(f"the tsv format is MMBench's; task {spec.name} has none")
        if split not in (None, spec.default_split):
            raise ValueError(f"an MMBench tsv is a single split; split={split!r} cannot be selected from it")
        return read_tsv(spec, root, REGISTRY[spec.name].build_row, limit, pre, post)
    if fmt == "mme_folder":
        if spec.name != "mme":
            raise ValueError(f"the mme_folder format is MME's, not {spec.name}'s")
        if split not in (None, spec.default_split):
            raise ValueError(f"the MME release folder is a single split; split={split!r} cannot be selected from it")
        return read_mme_folder(spec, root, limit, pre, post, check_images)
    if spec.name == "gqa":
        return read_gqa(spec, root, fmt, split, limit, pre, post)
    return _read_tabular(spec, root, fmt, split, limit, pre, post, video_folder, check_images)


def _read_tabular(spec: TaskSpec, root: Path, fmt: str, split: str | None, limit: int | None,
                  pre: str, post: str, video_folder=None, check_images: bool = True) -> list[Record]:
    if fmt == "parquet":
        sel = select_parquet(spec, root, split, spec.hf_config)
        sources, chosen, category = parquet_sources(sel.files), sel.split, sel.category
    else:
        sources, chosen, category = hf_disk_sources(spec, root, split)
    lookup = _video_lookup(spec, root, video_folder) if spec.modality == "video" else None
    drafts = rows_to_drafts(spec, sources, REGISTRY[spec.name].build_row, split=chosen, category=category,
                            limit=limit, pre=pre, post=post, fmt=fmt, video_lookup=lookup)
    if check_images:
        for d in drafts:
            for video in d.videos:
                video.path(spec.name, d.raw_id)  # a missing video is named now, before any answering
    return finish_records(spec, drafts)


def _video_lookup(spec: TaskSpec, root: Path, video_folder):
    """``(source, names) -> video files``: looked for in ``video_folder`` (and the task's
    subfolders of it), else in the task's folders beside the dataset and its parquet files."""
    top = root if root.is_dir() else root.parent
    found: dict[str, list[Path]] = {}

    def folders(source) -> list[Path]:
        key = str(source.base_dir)
        if key not in found:
            if video_folder is not None:
                found[key] = video_folders([Path(video_folder)], (".",) + spec.video_dirs)
            else:
                roots = [top] + ([source.base_dir] if source.base_dir is not None else []) + [top.parent]
                found[key] = video_folders(roots, spec.video_dirs) or [top]
        return found[key]

    return lambda source, names: tuple(VideoFile(n, folders(source), spec.video_prefixes) for n in names)


def detect_format(task: str, path: str | os.PathLike) -> str:
    """Which of :data:`~ficoco.evaluation.formats.FORMATS` ``path`` holds for ``task``."""
    spec = task_spec(task)
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
    if is_saved_dataset(p):
        return "hf_disk"
    if find_files(p, (".parquet",)):
        return "parquet"
    if spec.name == "gqa" and any(is_saved_dataset(sub) for sub in p.iterdir() if sub.is_dir()):
        return "hf_disk"
    if spec.name.startswith("mmbench") and (llava_question_file(spec, p) or list(p.glob("*.tsv"))):
        return "tsv"
    if llava_question_file(spec, p) or (list(p.glob("*.jsonl")) and spec.name != "mme"):
        return "llava"
    if spec.name == "scienceqa_img" and list(p.glob("*.json")):
        return "llava"
    if spec.name == "mme":
        if list(p.glob("*.jsonl")):
            return "llava"
        if is_mme_release(p) or is_mme_release(p / "MME_Benchmark_release_version"):
            return "mme_folder"
    raise BenchmarkDataError(
        f"no benchmark data for {spec.name} under {p}: no .parquet files, no save_to_disk folder, "
        f"no question file ({', '.join(spec.llava_files) or '*.jsonl'})", p)
