"""VQAv2 val (lmms-eval ``vqav2_val``): open questions about COCO images, 10 human answers.

Files: lmms-lab/VQAv2 (``question``, ``answers``, ``multiple_choice_answer``, ``answer_type``,
``image``), or LLaVA-1.5's test-dev question file with its COCO image folder, its answers joined
only from an official annotation file given explicitly (``v2_mscoco_val2014_annotations.json``).
Scoring: VQA accuracy with ``vqaEval.py``'s punctuation/digit/article steps (lmms-eval
``tasks/vqav2/utils.py``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..formats.files import read_json_file
from ..formats.llava import no_entry
from ..metrics import ScoredRecord
from ..records import (
    VQA_POST,
    BenchmarkDataError,
    Built,
    Task,
    TaskSpec,
    answer_texts,
    as_text,
    is_missing,
    majority,
)
from ..vqa_eval import score_vqa

SPEC = TaskSpec("vqav2_val", "lmms-lab/VQAv2", None, "validation", "", VQA_POST,
                ("question_id", "question", "image"), ("answers",), "vqa",
                llava_files=("llava_vqav2_mscoco_test-dev2015.jsonl", "llava_vqav2_mscoco_test2015.jsonl"),
                llava_image_dirs=("test2015", "val2014", "images"))


def build_row(row, pre, post):
    q = as_text(row["question"])
    answers = answer_texts(row.get("answers"))
    answer = row.get("multiple_choice_answer")
    answer = majority(answers) if is_missing(answer) else as_text(answer)
    return Built(as_text(row["question_id"]), f"{pre}{q}{post}", q, answer, answers,
                 category=None if is_missing(row.get("answer_type")) else as_text(row.get("answer_type")))


def join_llava(spec, drafts, qfile, folder, ann):
    """VQA v2's official annotation file (``v2_mscoco_val2014_annotations.json``)."""
    if ann is None:
        return
    data = read_json_file(ann)
    annotations = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(annotations, list):
        raise BenchmarkDataError(f"{ann}: expected {{'annotations': [...]}} (VQA v2 annotation file)", ann)
    table = {as_text(a.get("question_id")): a for a in annotations if isinstance(a, dict)}
    for d in drafts:
        entry = table.get(d.raw_id)
        if entry is None:
            raise no_entry(spec, d, ann, d.raw_id)
        d.answers = answer_texts(entry.get("answers"))
        mc = entry.get("multiple_choice_answer")
        d.answer = as_text(mc) if mc is not None else majority(d.answers)
        d.category = entry.get("answer_type", d.category)


def score_vqav2(records: Iterable[ScoredRecord]) -> dict[str, Any]:
    """VQAv2 val as lmms-eval ``vqav2_val``: ``vqaEval.py`` punctuation/digit/article steps only."""
    return score_vqa(records, tokenize=False)


TASK = Task(SPEC, build_row, score_vqav2, join_llava)
