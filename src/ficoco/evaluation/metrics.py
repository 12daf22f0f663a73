"""Scoring machinery shared by several benchmarks: the records scorers take, the counts every
result carries, option-letter parsing, multiple-choice accuracy, exact match and the judge
protocol of the GPT-judged benchmarks.  VQA accuracy is in :mod:`.vqa_eval`; each benchmark's own
rules and aggregation are in its module of :mod:`ficoco.evaluation.tasks`.

Every scorer takes ``records``: an iterable of mappings (one per question) holding the model's
``prediction`` (the generated text) and the benchmark's ground truth, and returns a plain ``dict``.
Each result carries ``metric`` (name of the headline number), ``score`` (that number) and ``n``
(records scored), plus benchmark-specific breakdowns. Units follow the papers' tables:

* accuracies, precision, recall, F1, yes-ratio: **percent** (0-100);
* MME: **points** (per subtask ``accuracy + accuracy+``, 0-200; perception sums 10 subtasks, max
  2000; cognition sums 4, max 800);
* LLaVA-Bench: the relative score in percent (mean model score / mean reference score x 100).

Every result also carries ``n_unparsed``: the answers the benchmark's own parser could not read
(POPE: neither yes nor no, counted as "yes" by POPE's rule; MME: neither yes nor no; multiple
choice: no option letter; VQA, GQA and the judged tasks: an empty answer). A score computed over
many unparsed answers measures the answer format, not the model: :func:`unparsed_share` gives the
share, and the evaluation runner reports and flags it.

Sources (facts and formulas, not code, were taken from them):

* option letters: lmms-eval ``tasks/mmbench/mmbench_evals.py`` (rule-based option matching
  ``can_infer``);
* exact match: lmms-eval ``tasks/gqa/gqa.yaml`` (``exact_match``, ignore case and punctuation) with
  ``lmms_eval/api/metrics.py`` and the stripping of generations in ``lmms_eval/api/task.py``;
* judged benchmarks: lmms-eval ``tasks/mmvet/utils.py`` / ``tasks/llava-in-the-wild/utils.py``
  (aggregation only; the GPT judge is the caller's ``judge``).
"""

from __future__ import annotations

import math
import string
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

from .records import as_text

__all__ = (
    "ScoredRecord",
    "Judge",
    "choice_accuracy",
    "extract_option",
    "score_exact_match",
    "unparsed_share",
)


ScoredRecord = Mapping[str, Any]
"""One scored question: a mapping with at least ``prediction`` and the benchmark's ground truth."""


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------


def as_list(records: Iterable[ScoredRecord]) -> list[ScoredRecord]:
    rows = list(records)
    if not rows:
        raise ValueError("no records to score")
    return rows


def first_of(record: ScoredRecord, *keys: str, default: Any = None) -> Any:
    for key in keys:
        if key in record and record[key] is not None:
            return record[key]
    return default


def percent(numerator: float, denominator: float) -> float:
    return 100.0 * numerator / denominator if denominator else 0.0


def count_empty(rows: Sequence[ScoredRecord]) -> int:
    """Answers with no text at all: what "unparsed" means for free-form answers."""
    return sum(not as_text(row.get("prediction")).strip() for row in rows)


def unparsed_share(score: Mapping[str, Any]) -> float | None:
    """Share (0-1) of the answers behind ``score`` that its parser could not read, or ``None``
    when the result does not say (``n_unparsed`` over the records scored)."""
    unparsed = score.get("n_unparsed")
    total = score.get("n_records", score.get("n"))
    if unparsed is None or not total:
        return None
    return unparsed / total


# --------------------------------------------------------------------------------------------
# Multiple choice: option extraction (MMBench rules), accuracy by letter
# --------------------------------------------------------------------------------------------


# (prefix, suffix) around a letter, tried in this order after the bare letter.
_LETTER_WRAPPINGS = (
    ("", "."),
    ("", ","),
    ("", ":"),
    ("", ")"),
    ("", ")."),
    ("(", ")"),
    ("(", ")."),
    (":", ""),
    (":", ","),
    (":", "."),
    (":", ")"),
    (":", ")."),
)
_OPTION_LETTERS = "ABCDE"


def _valid_option(value: Any) -> bool:
    if value is None:
        return False
    if isinstance(value, float) and math.isnan(value):
        return False
    return str(value).strip().lower() not in ("", "nan")


def record_options(record: ScoredRecord) -> dict[str, str]:
    """A record's options: its ``options`` mapping, else its "A".."E" fields (MMBench columns)."""
    options = record.get("options")
    if options is None:
        options = {k: record[k] for k in _OPTION_LETTERS if k in record}
    elif not isinstance(options, Mapping):
        options = {chr(ord("A") + i): v for i, v in enumerate(options)}
    return {str(k): str(v) for k, v in options.items() if _valid_option(v)}


def extract_option(prediction: str, options: Mapping[str, str], *, letters: str = _OPTION_LETTERS) -> str | None:
    """The option letter a free-form answer picks, by MMBench's rules (``can_infer``), or None.

    1. Split on whitespace. If exactly one token is a bare letter ("A"), return it, unless the
       token "A" is present and there are more than 3 tokens ("A" may be the article).
    2. Otherwise try the wrappings "A." "A," "A:" "A)" "A)." "(A)" "(A)." ":A" ":A," ":A." ":A)"
       ":A)." in that order; the first one that exactly one letter takes gives the answer.
    3. Otherwise, if exactly one option's text occurs (case-insensitively) in the answer, its letter.

    Letters are matched case-sensitively (as in MMBench: "(c)" is not "(C)"; the option text may
    still match). Ambiguous answers ("A or B") give None.

    Args:
        prediction: the model's answer.
        options: letter -> option text; empty / "nan" options are ignored.
        letters: candidate letters for steps 1-2 (MMBench uses "ABCDE" whatever the option count).
    """
    prediction = as_text(prediction)
    tokens = [t.strip() for t in prediction.split()]

    def takers(prefix: str, suffix: str) -> list[str]:
        return [c for c in letters if prefix + c + suffix in tokens]

    bare = takers("", "")
    if len(bare) == 1 and not ("A" in tokens and len(tokens) > 3):
        return bare[0]
    for prefix, suffix in _LETTER_WRAPPINGS:
        found = takers(prefix, suffix)
        if len(found) == 1:
            return found[0]
    lowered = prediction.lower()
    hits = [k for k, v in options.items() if _valid_option(v) and str(v).lower() in lowered]
    return hits[0] if len(hits) == 1 else None


def gold_letter(answer: Any) -> str:
    # ScienceQA stores the answer as an option index; the others as a letter.
    if isinstance(answer, int) and not isinstance(answer, bool):
        return chr(ord("A") + answer)
    return as_text(answer).strip().upper()


def choice_accuracy(
    records: Iterable[ScoredRecord],
    pick: Callable[[str, Mapping[str, str]], str | None],
) -> dict[str, Any]:
    """Accuracy (percent) of single-answer multiple choice by letter match; ``pick(prediction,
    options)`` reads the letter an answer gives (a task's rule, or :func:`extract_option`).

    Records: ``prediction``, ``answer`` (a letter, or an option index as in ScienceQA), the options
    where ``pick`` reads them (``options`` mapping/list or "A".."E" fields). Optional ``data_type``
    (SEED-Bench: image/video) and ``category`` add ``per_data_type`` / ``per_category``.
    ``n_unparsed`` counts answers giving no letter (scored wrong).
    """
    rows = as_list(records)
    marks: list[bool] = []
    groups: dict[str, dict[str, list[bool]]] = {"data_type": defaultdict(list), "category": defaultdict(list)}
    unparsed = 0
    for row in rows:
        letter = pick(as_text(row.get("prediction")), record_options(row))
        unparsed += letter is None
        ok = letter is not None and letter.upper() == gold_letter(row.get("answer"))
        marks.append(ok)
        for key, bucket in groups.items():
            if row.get(key) is not None:
                bucket[str(row[key])].append(ok)
    accuracy = percent(sum(marks), len(marks))
    result: dict[str, Any] = {
        "metric": "accuracy",
        "score": accuracy,
        "accuracy": accuracy,
        "n": len(rows),
        "n_unparsed": unparsed,
    }
    for key, bucket in groups.items():
        if bucket:
            result[f"per_{key}"] = {k: percent(sum(v), len(v)) for k, v in sorted(bucket.items())}
    return result


# --------------------------------------------------------------------------------------------
# Exact match (lmms-eval's GQA metric)
# --------------------------------------------------------------------------------------------


_DROP_PUNCTUATION: Mapping[int, None] = MappingProxyType(str.maketrans("", "", string.punctuation))


def _exact_match_form(text: str) -> str:
    return as_text(text).strip().lower().translate(_DROP_PUNCTUATION)


def score_exact_match(records: Iterable[ScoredRecord]) -> dict[str, Any]:
    """Exact match (percent) as lmms-eval's GQA: strip, lower-case, delete ASCII punctuation
    (``string.punctuation``), compare. Records: ``prediction``, ``answer``."""
    rows = as_list(records)
    marks = [_exact_match_form(as_text(r.get("prediction"))) == _exact_match_form(as_text(r.get("answer")))
             for r in rows]
    accuracy = percent(sum(marks), len(marks))
    return {"metric": "exact_match", "score": accuracy, "accuracy": accuracy, "n": len(rows),
            "n_unparsed": count_empty(rows)}


# --------------------------------------------------------------------------------------------
# GPT-judged benchmarks (MM-Vet, LLaVA-Bench): the judge and the result without one
# --------------------------------------------------------------------------------------------


Judge = Callable[..., Any]
"""``judge(question, reference, prediction)``; see :func:`~ficoco.evaluation.tasks.score_judged` for the
return value."""


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def judge_skipped(rows: Sequence[ScoredRecord], name: str, metric: str) -> dict[str, Any]:
    """The result of a GPT-judged benchmark (``name``) scored without a judge: skipped, no score
    (see :func:`~ficoco.evaluation.tasks.score_judged`)."""
    return {
        "skipped": True,
        "reason": (
            f"{name} is scored by a GPT judge and no judge was configured; pass judge=... "
            "to score it. No score is reported."
        ),
        "metric": metric,
        "score": None,
        "n": len(rows),
        "n_unparsed": count_empty(rows),
    }
