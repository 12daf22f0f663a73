"""LLaVA-1.5's evaluation files: a question ``.jsonl`` and an image folder, joined with the
ground-truth file LLaVA's scripts use.

LLaVA's question files carry a finished prompt; it is used verbatim.  Each task joins its own
ground truth (its ``join_llava``); ScienceQA's question file is a ``.json`` list of conversations
that the task reads itself (its ``llava_drafts``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Callable, Mapping

from ..records import (
    BenchmarkDataError,
    Draft,
    Record,
    TaskSpec,
    answer_texts,
    as_text,
    finish_records,
    is_missing,
    majority,
)
from .files import llava_question_file, read_jsonl, require_keys
from .images import FileImage

_OPTION_LINE = re.compile(r"^([A-E])\. (.*)$")


def parse_options(text: str) -> dict[str, str]:
    options = {}
    for line in text.split("\n"):
        m = _OPTION_LINE.match(line)
        if m:
            options[m.group(1)] = m.group(2)
    return options


def _question_file(spec: TaskSpec, path: Path) -> Path:
    if path.is_file():
        return path
    found = llava_question_file(spec, path)
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
            raise BenchmarkDataError(f"{'video' if spec.modality == 'video' else 'image'} folder {folder} does not "
                                     f"exist", folder)
        return folder
    tried = [qfile.parent / d for d in spec.llava_image_dirs]
    for folder in tried:
        if folder.is_dir():
            return folder
    what = "video" if spec.modality == "video" else "image"
    raise BenchmarkDataError(f"no {what} folder for {qfile}: tried {', '.join(map(str, tried)) or 'nothing'}; "
                             f"extract the {what}s there or pass {what}_folder=", qfile)


def llava_drafts(spec: TaskSpec, qfile: Path, folder: Path) -> list[Draft]:
    """The drafts of a LLaVA question ``.jsonl`` (``question_id``, ``image``, ``text`` per line),
    with the answers the file itself carries, if any."""
    drafts = []
    for line_no, obj in read_jsonl(qfile):
        require_keys(qfile, f"line {line_no}", obj, ("question_id", "image", "text"))
        text = as_text(obj["text"])
        category = obj.get("category")
        answers = answer_texts(obj.get("answers")) if "answers" in obj else []
        answer = next((as_text(obj[k]) for k in ("answer", "label", "gpt_answer") if not is_missing(obj.get(k))), None)
        if answer is None:
            answer = majority(answers)
        if answer is not None and not answers:
            answers = [answer]
        meta = {k: v for k, v in obj.items() if k != "text"}
        meta.update(raw_question=text, line=line_no)
        options = parse_options(text) if spec.kind == "multiple_choice" else {}
        drafts.append(Draft(as_text(obj["question_id"]), text, answer, answers, options,
                            None if category in (None, "default") else as_text(category), meta,
                            (FileImage(folder / as_text(obj["image"])),)))
    return drafts


def no_entry(spec: TaskSpec, draft: Draft, ann: Path, key: Any) -> BenchmarkDataError:
    return BenchmarkDataError(f"{spec.name}: {ann} has no entry for sample {draft.raw_id} (key {key!r})", ann)


def read_llava(spec: TaskSpec, path: Path, split: str | None, limit: int | None,
               image_folder: str | os.PathLike | None, annotation_file: str | os.PathLike | None,
               check_images: bool, *, joiners: Mapping[str, Callable[..., None]],
               read_drafts: Callable[[TaskSpec, Path, Path], list[Draft]] = llava_drafts) -> list[Record]:
    """The records of a LLaVA question file: ``read_drafts`` reads it, ``joiners[spec.name]`` (the
    task's ``join_llava``) adds the ground truth (see :func:`~ficoco.evaluation.read.read_benchmark`)."""
    qfile = _question_file(spec, path)
    folder = _image_folder(spec, qfile, image_folder)
    ann = None
    if annotation_file is not None:
        ann = Path(annotation_file)
        if not ann.exists():
            raise BenchmarkDataError(f"annotation file {ann} does not exist", ann)
    drafts = read_drafts(spec, qfile, folder)
    if split is not None and split != spec.default_split:
        if split not in spec.category_splits:
            hint = f" (category splits: {', '.join(spec.category_splits)})" if spec.category_splits else ""
            raise ValueError(f"{qfile} is a single LLaVA question file; split={split!r} cannot be selected from it"
                             + hint)
        drafts = [d for d in drafts if d.category == split]
    joiners[spec.name](spec, drafts, qfile, folder, ann)
    if limit is not None:
        drafts = drafts[:limit]
    for d in drafts:
        d.meta.update(format="llava", file=str(qfile), split=split)
        if check_images:
            for ref in d.images:
                if isinstance(ref, FileImage) and not ref.path.is_file():
                    raise BenchmarkDataError(
                        f"{spec.name}: sample {d.raw_id} ({qfile}): image file not found: {ref.path}", ref.path)
            for video in d.videos:
                video.path(spec.name, d.raw_id)  # a missing video is named now, before any answering
    return finish_records(spec, drafts)
