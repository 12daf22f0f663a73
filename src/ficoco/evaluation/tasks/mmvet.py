"""MM-Vet (lmms-eval ``mmvet``): open questions over six capabilities, scored by a GPT judge.

Files: lmms-lab/MMVet, or LLaVA-1.5's ``llava-mm-vet.jsonl`` with ``images/``, the answers and
capabilities joined from ``mm-vet.json``.  Scoring: lmms-eval ``tasks/mmvet/utils.py``
(aggregation only; the GPT judge is the caller's ``judge``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..formats.files import first_file, read_json_file
from ..formats.llava import no_entry
from ..metrics import (
    Judge,
    ScoredRecord,
    as_list,
    count_empty,
    first_of,
    is_number,
    judge_skipped,
    percent,
)
from ..records import (
    BenchmarkDataError,
    Built,
    Task,
    TaskSpec,
    as_text,
    is_missing,
    single_answer,
)

MMVET_PRE = (
    "First please perform reasoning, and think step by step to provide best answer to the following question: \n\n"
)


SPEC = TaskSpec("mmvet", "lmms-lab/MMVet", None, "test", MMVET_PRE, "",
                ("question_id", "question", "image"), ("answer",), "open",
                llava_files=("llava-mm-vet.jsonl",), llava_image_dirs=("images",))


def build_row(row, pre, post):
    q = as_text(row["question"])
    answer, answers = single_answer(row)
    cap = row.get("capability")
    category = ",".join(map(str, cap)) if isinstance(cap, list) else (None if is_missing(cap) else as_text(cap))
    return Built(as_text(row["question_id"]), f"{pre}{q}{post}", q, answer, answers, category=category)


def join_llava(spec, drafts, qfile, folder, ann):
    ann = ann or first_file(qfile.parent / "mm-vet.json", folder.parent / "mm-vet.json")
    if ann is None:
        return
    data = read_json_file(ann)
    if not isinstance(data, dict):
        raise BenchmarkDataError(f"{ann}: expected a JSON object keyed 'v1_<n>' (MM-Vet mm-vet.json)", ann)
    for d in drafts:
        key = d.raw_id if d.raw_id in data else f"v1_{d.raw_id}"
        entry = data.get(key)
        if not isinstance(entry, dict) or "answer" not in entry:
            raise no_entry(spec, d, ann, key)
        d.answer = as_text(entry["answer"])
        d.answers = [d.answer]
        cap = entry.get("capability")
        d.category = ",".join(map(str, cap)) if isinstance(cap, list) else (None if cap is None else as_text(cap))


# --------------------------------------------------------------------------------------------
# scoring


MMVET_CAPABILITIES = ("rec", "ocr", "know", "gen", "spat", "math")


def _capabilities(value: Any) -> set[str]:
    if value is None:
        return set()
    if isinstance(value, str):
        return {c.strip() for c in value.split(",") if c.strip()}
    return {str(c).strip() for c in value}


def score_mmvet(records: Iterable[ScoredRecord], judge: Judge | None = None) -> dict[str, Any]:
    """MM-Vet as lmms-eval ``mmvet``; see :func:`~ficoco.evaluation.tasks.score_judged`.

    Records: ``question``, ``answer`` (the ground truth; ``gpt_answer`` accepted), ``prediction``,
    optional ``capability`` ("rec,ocr" or a list). ``judge(question, reference, prediction) ->
    float`` in [0, 1] (MM-Vet's correctness scale); ``score`` = mean x 100, ``per_capability``
    likewise over the records having each capability.
    """
    rows = as_list(records)
    if judge is None:
        return judge_skipped(rows, "MM-Vet", "gpt_score")
    scores, caps = [], []
    for row in rows:
        value = judge(
            as_text(row.get("question")), as_text(first_of(row, "answer", "gpt_answer")), as_text(row.get("prediction"))
        )
        if not is_number(value) or not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"MM-Vet judge must return a number in [0, 1], got {value!r}")
        scores.append(float(value))
        caps.append(_capabilities(row.get("capability", row.get("capabilities"))))
    per_cap = {}
    for cap in MMVET_CAPABILITIES:
        chosen = [s for s, c in zip(scores, caps) if cap in c]
        if chosen:
            per_cap[cap] = percent(sum(chosen), len(chosen))
    total = percent(sum(scores), len(scores))
    return {"skipped": False, "metric": "gpt_score", "score": total, "per_capability": per_cap, "n": len(rows),
            "n_unparsed": count_empty(rows)}


TASK = Task(SPEC, build_row, score_mmvet, join_llava, judge="mmvet")
