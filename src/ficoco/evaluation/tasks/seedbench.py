"""SEED-Bench (lmms-eval ``seedbench``): four-option questions over 12 dimensions, on images and
on video frames (several images per question).

Files: lmms-lab/SEED-Bench, or LLaVA-1.5's ``llava-seed-bench.jsonl`` with its image folder, the
answers joined from ``SEED-Bench.json``.  Scoring: lmms-eval ``tasks/seedbench/utils.py``
(facts, not code, were taken from it).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any

from ..formats.files import first_file, read_json_file
from ..formats.llava import no_entry
from ..metrics import ScoredRecord, choice_accuracy
from ..records import (
    OPTION_POST,
    BenchmarkDataError,
    Built,
    Task,
    TaskSpec,
    as_text,
    is_missing,
    single_answer,
)

SPEC = TaskSpec("seedbench", "lmms-lab/SEED-Bench", None, "test", "", OPTION_POST,
                ("question_id", "question", "choice_a", "choice_b", "choice_c", "choice_d", "image"), ("answer",),
                "multiple_choice", llava_files=("llava-seed-bench.jsonl",), llava_image_dirs=(".",))


# SEED-Bench ``question_type_id`` -> dimension name (SEED-Bench.json's ``question_type`` table).
_SEED_TYPES = MappingProxyType({
    1: "Scene Understanding", 2: "Instance Identity", 3: "Instance Attributes", 4: "Instance Location",
    5: "Instances Counting", 6: "Spatial Relation", 7: "Instance Interaction", 8: "Visual Reasoning",
    9: "Text Understanding", 10: "Action Recognition", 11: "Action Prediction", 12: "Procedure Understanding",
})


def build_row(row, pre, post):
    q = as_text(row["question"])
    options = {k: as_text(row[f"choice_{k.lower()}"]) for k in "ABCD"}
    listing = "".join(f"\n{k}. {v}" for k, v in options.items())
    answer, answers = single_answer(row)
    category = None
    qtype = row.get("question_type_id")
    if not is_missing(qtype):
        try:
            category = _SEED_TYPES.get(int(qtype), as_text(qtype))
        except (TypeError, ValueError):
            category = as_text(qtype)
    return Built(as_text(row["question_id"]), f"{pre}{q}{listing}{post}", q, answer, answers, options, category)


def join_llava(spec, drafts, qfile, folder, ann):
    ann = ann or first_file(qfile.parent / "SEED-Bench.json")
    if ann is None:
        return
    data = read_json_file(ann)
    questions = data.get("questions") if isinstance(data, dict) else None
    if not isinstance(questions, list):
        raise BenchmarkDataError(f"{ann}: expected {{'questions': [...]}} (SEED-Bench.json)", ann)
    table = {as_text(q.get("question_id")): q for q in questions if isinstance(q, dict)}
    for d in drafts:
        entry = table.get(d.raw_id)
        if entry is None or "answer" not in entry:
            raise no_entry(spec, d, ann, d.raw_id)
        d.answer = as_text(entry["answer"])
        d.answers = [d.answer]
        for key in ("data_type", "question_type_id", "data_id"):
            if key in entry:
                d.meta[key] = entry[key]


def seedbench_letter(prediction: str, options: Mapping[str, str]) -> str | None:
    # lmms-eval seed_process_result: the first character of the stripped answer.
    text = prediction.strip()
    return text[0].upper() if text else None


def score_seedbench(records: Iterable[ScoredRecord]) -> dict[str, Any]:
    """SEED-Bench as lmms-eval ``seedbench`` (``per_data_type`` gives seed_image / seed_video)."""
    return choice_accuracy(records, seedbench_letter)


TASK = Task(SPEC, build_row, score_seedbench, join_llava)
