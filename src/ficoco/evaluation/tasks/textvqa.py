"""TextVQA val (lmms-eval ``textvqa_val``): questions about the text in an image, 10 human answers.

Files: lmms-lab/textvqa (``question``, ``answers``, ``ocr_tokens``, ``image``), or LLaVA-1.5's
``llava_textvqa_val_v051_ocr.jsonl`` with ``train_images/``, its answers joined from
``TextVQA_0.5.1_val.json`` (keyed by image id and question: LLaVA's file uses the image id as
question id).  Prompts carry the reference OCR tokens where the files have them
(:func:`ocr_prompts`).  Scoring: VQA accuracy with the EvalAI answer processor on prediction and
answers (lmms-eval ``tasks/textvqa/utils.py``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from ..formats.files import first_file, read_json_file
from ..formats.llava import no_entry
from ..metrics import ScoredRecord
from ..records import (
    VQA_POST,
    BenchmarkDataError,
    Built,
    Record,
    Task,
    TaskSpec,
    answer_texts,
    as_text,
    majority,
)
from ..vqa_eval import score_vqa

SPEC = TaskSpec("textvqa_val", "lmms-lab/textvqa", None, "validation", "", VQA_POST,
                ("question_id", "question", "image"), ("answers",), "vqa",
                llava_files=("llava_textvqa_val_v051_ocr.jsonl",), llava_image_dirs=("train_images", "images"))


#: the line LLaVA-1.5 and lmms-eval put between a TextVQA question and its answer instruction
OCR_REFERENCE = "Reference OCR token:"


def build_row(row, pre, post):
    q = as_text(row["question"])
    answers = answer_texts(row.get("answers"))
    return Built(as_text(row["question_id"]), f"{pre}{q.capitalize()}{post}", q, majority(answers), answers)


def join_llava(spec, drafts, qfile, folder, ann):
    ann = ann or first_file(qfile.parent / "TextVQA_0.5.1_val.json")
    if ann is None:
        return
    data = read_json_file(ann)
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise BenchmarkDataError(f"{ann}: expected {{'data': [...]}} (TextVQA annotation file)", ann)
    table = {(as_text(d.get("image_id")), as_text(d.get("question")).lower()): d for d in data["data"]}
    for d in drafts:
        lines = d.question.split("\n")
        question = lines[1] if lines[0].startswith("Reference OCR token:") and len(lines) > 1 else lines[0]
        key = (d.raw_id, question.lower())
        entry = table.get(key)
        if entry is None:
            raise no_entry(spec, d, ann, key)
        d.answers = answer_texts(entry.get("answers"))
        d.answer = majority(d.answers)
        d.meta["textvqa_question_id"] = entry.get("question_id")


def ocr_prompts(records: list[Record], wanted: bool | None, pre: str, post: str) -> list[Record]:
    """TextVQA prompts with or without the reference OCR tokens
    (:func:`~ficoco.evaluation.read.read_benchmark`)."""
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
                question = (f"{pre}{as_text(record.meta.get('raw_question')).capitalize()}\n{OCR_REFERENCE} "
                            f"{', '.join(map(str, tokens))}{post}")
                has = True
            elif wanted is True:
                raise BenchmarkDataError(f"{record.meta.get('file')}: ocr_tokens=True needs the 'ocr_tokens' column, "
                                         f"which these files lack", record.meta.get("file"))
        out.append(replace(record, question=question, meta={**record.meta, "ocr_reference": has}))
    return out


def score_textvqa(records: Iterable[ScoredRecord]) -> dict[str, Any]:
    """TextVQA val as lmms-eval ``textvqa_val``: EvalAI processor on prediction and answers."""
    return score_vqa(records, tokenize=True)


TASK = Task(SPEC, build_row, score_textvqa, join_llava)
