"""LLaVA-Bench in the wild (lmms-eval ``llava_in_the_wild``): conversation, detail and complex
questions, scored by a GPT judge against GPT-4's reference answers.

Files: lmms-lab/llava-bench-in-the-wild, or LLaVA's ``questions.jsonl`` with ``images/``, the
reference answers joined from ``answers_gpt4.jsonl``.  Scoring: lmms-eval
``tasks/llava-in-the-wild/utils.py`` (aggregation only; the GPT judge is the caller's ``judge``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

from ..formats.files import first_file, read_jsonl
from ..formats.llava import no_entry
from ..metrics import (
    Judge,
    ScoredRecord,
    as_list,
    count_empty,
    first_of,
    is_number,
    judge_skipped,
)
from ..records import Built, Task, TaskSpec, as_text, is_missing, single_answer

SPEC = TaskSpec("llava_in_the_wild", "lmms-lab/llava-bench-in-the-wild", None, "train", "", "",
                ("question_id", "question", "image"), ("gpt_answer",), "open",
                llava_files=("questions.jsonl",), llava_image_dirs=("images",))


def build_row(row, pre, post):
    q = as_text(row["question"])
    answer, answers = single_answer(row, "gpt_answer")
    cat = row.get("category")
    return Built(as_text(row["question_id"]), f"{pre}{q}{post}", q, answer, answers,
                 category=None if is_missing(cat) else as_text(cat))


def join_llava(spec, drafts, qfile, folder, ann):
    ann = ann or first_file(qfile.parent / "answers_gpt4.jsonl")
    if ann is None:
        return
    answers = {as_text(obj.get("question_id")): obj for _, obj in read_jsonl(ann)}
    for d in drafts:
        entry = answers.get(d.raw_id)
        if entry is None or "text" not in entry:
            raise no_entry(spec, d, ann, d.raw_id)
        d.answer = as_text(entry["text"])
        d.answers = [d.answer]


def score_llava_bench(records: Iterable[ScoredRecord], judge: Judge | None = None) -> dict[str, Any]:
    """LLaVA-Bench (in-the-wild) as lmms-eval ``llava_in_the_wild``; see
    :func:`~ficoco.evaluation.tasks.score_judged`.

    Records: ``question``, ``answer`` (the reference answer; ``gpt_answer`` accepted),
    ``prediction``, optional ``category`` (conv / detail / complex) and ``context`` (or
    ``caption``: the image description the judge is shown). ``judge(question, reference,
    prediction, context=...)`` -> ``(reference_score, prediction_score)``, each on the judge's 1-10
    scale; ``score`` = mean prediction score / mean reference score x 100, also ``per_category``.
    """
    rows = as_list(records)
    if judge is None:
        return judge_skipped(rows, "LLaVA-Bench (in-the-wild)", "relative_score")
    pairs: list[tuple[float, float]] = []
    by_cat: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for row in rows:
        context = first_of(row, "context", "caption", default="")
        if not isinstance(context, str):
            context = "\n".join(str(c) for c in context)
        value = judge(
            as_text(row.get("question")),
            as_text(first_of(row, "answer", "gpt_answer")),
            as_text(row.get("prediction")),
            context=context,
        )
        if not (isinstance(value, Sequence) and len(value) == 2 and all(is_number(v) for v in value)):
            raise ValueError(f"LLaVA-Bench judge must return (reference_score, prediction_score), got {value!r}")
        pair = (float(value[0]), float(value[1]))
        pairs.append(pair)
        if row.get("category") is not None:
            by_cat[str(row["category"])].append(pair)

    def relative(items: list[tuple[float, float]]) -> dict[str, float]:
        ref = sum(p[0] for p in items) / len(items)
        pred = sum(p[1] for p in items) / len(items)
        if ref <= 0:
            raise ValueError("LLaVA-Bench reference scores average to <= 0; the relative score is undefined")
        return {"relative_score": 100.0 * pred / ref, "reference_mean": ref, "prediction_mean": pred, "n": len(items)}

    overall = relative(pairs)
    return {
        "skipped": False,
        "metric": "relative_score",
        "score": overall["relative_score"],
        "reference_mean": overall["reference_mean"],
        "prediction_mean": overall["prediction_mean"],
        "per_category": {k: relative(v) for k, v in sorted(by_cat.items())},
        "n": len(rows),
        "n_unparsed": count_empty(rows),
    }


TASK = Task(SPEC, build_row, score_llava_bench, join_llava, judge="llava_bench")
