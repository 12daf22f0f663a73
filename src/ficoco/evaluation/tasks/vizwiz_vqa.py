"""VizWiz-VQA val (lmms-eval ``vizwiz_vqa_val``): questions from blind people's photos, 10 human
answers, some "unanswerable".

Files: lmms-lab/VizWiz-VQA, or LLaVA-1.5's ``llava_test.jsonl`` with its image folder, its answers
joined only from the official ``val.json`` given explicitly (entries keyed by image file name).
Scoring: VQA accuracy with the EvalAI answer processor, plus the unanswerability F1 and average
precision of the VizWiz API (lmms-eval ``tasks/vizwiz_vqa/utils.py``).
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

VIZWIZ_POST = "\nWhen the provided information is insufficient, respond with 'Unanswerable'." + VQA_POST


SPEC = TaskSpec("vizwiz_vqa_val", "lmms-lab/VizWiz-VQA", None, "val", "", VIZWIZ_POST,
                ("question_id", "question", "image"), ("answers",), "vqa",
                llava_files=("llava_test.jsonl",), llava_image_dirs=("test", "val", "images"))


def build_row(row, pre, post):
    q = as_text(row["question"])
    answers = answer_texts(row.get("answers"))
    cat = row.get("category")
    return Built(as_text(row["question_id"]), f"{pre}{q.capitalize()}{post}", q, majority(answers), answers,
                 category=None if is_missing(cat) else as_text(cat))


def join_llava(spec, drafts, qfile, folder, ann):
    """VizWiz's official annotation list (``val.json``): entries keyed by image file name."""
    if ann is None:
        return
    data = read_json_file(ann)
    if not isinstance(data, list):
        raise BenchmarkDataError(f"{ann}: expected a JSON list of {{'image', 'question', 'answers'}}", ann)
    table = {as_text(e.get("image")): e for e in data if isinstance(e, dict)}
    for d in drafts:
        entry = table.get(as_text(d.meta.get("image")))
        if entry is None or "answers" not in entry:
            raise no_entry(spec, d, ann, d.meta.get("image"))
        d.answers = answer_texts(entry["answers"])
        d.answer = majority(d.answers)


def score_vizwiz(records: Iterable[ScoredRecord]) -> dict[str, Any]:
    """VizWiz-VQA val as lmms-eval ``vizwiz_vqa_val``.

    "unanswerable" is an ordinary answer string (the prompt asks the model to reply
    'Unanswerable', which normalises to it); see :func:`score_vqa` for the unanswerability extras.
    """
    return score_vqa(records, tokenize=True)


TASK = Task(SPEC, build_row, score_vizwiz, join_llava)
