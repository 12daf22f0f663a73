"""POPE (lmms-eval ``pope``): "Is there a <object> in the image?" over COCO images, in three
splits (adversarial / popular / random, the ``category`` column).

Files: lmms-lab/POPE, or LLaVA-1.5's ``llava_pope_test.jsonl`` with ``val2014/``, its labels
joined from ``coco/coco_pope_<split>.json`` (one label line per question, in order).  Scoring:
``haotian-liu/LLaVA`` ``llava/eval/eval_pope.py`` (the same rule as POPE's own ``evaluate.py``);
split field as in lmms-eval ``tasks/pope`` (facts and formulas, not code, were taken from them).
"""

from __future__ import annotations

import string
from collections import defaultdict
from collections.abc import Iterable
from typing import Any, Literal

from ..formats.files import read_jsonl, require_keys
from ..metrics import ScoredRecord, as_list, first_of, percent
from ..records import (
    VQA_POST,
    BenchmarkDataError,
    Built,
    Draft,
    Task,
    TaskSpec,
    as_text,
    is_missing,
    single_answer,
)

SPEC = TaskSpec("pope", "lmms-lab/POPE", None, "test", "", VQA_POST,
                ("question_id", "question", "image"), ("answer", "category"), "yes_no",
                category_splits=("adversarial", "popular", "random"),
                llava_files=("llava_pope_test.jsonl",), llava_image_dirs=("val2014", "images"))


def build_row(row, pre, post):
    q = as_text(row["question"])
    answer, answers = single_answer(row)
    cat = row.get("category")
    return Built(as_text(row["question_id"]), f"{pre}{q.strip()}{post}", q, answer, answers,
                 category=None if is_missing(cat) else as_text(cat))


def join_llava(spec, drafts, qfile, folder, ann):
    base = ann if ann is not None else next(
        (c for c in (qfile.parent / "coco", qfile.parent) if any(c.glob("coco_pope_*.json"))), None)
    if base is None:
        return
    by_category: dict[str, list[Draft]] = {}
    for d in drafts:
        by_category.setdefault(d.category or "", []).append(d)
    for category, group in by_category.items():
        label_file = base if base.is_file() else base / f"coco_pope_{category}.json"
        if not label_file.is_file():
            raise BenchmarkDataError(f"pope: no label file {label_file} for category {category!r}", label_file)
        labels = read_jsonl(label_file)
        if len(labels) != len(group):
            raise BenchmarkDataError(
                f"pope: {label_file} has {len(labels)} labels but {qfile} has {len(group)} "
                f"questions of category {category!r}", label_file)
        for d, (line_no, lab) in zip(group, labels):
            require_keys(label_file, f"line {line_no}", lab, ("label",))
            if "image" in lab and as_text(lab["image"]) != as_text(d.meta.get("image")):
                raise BenchmarkDataError(
                    f"pope: {label_file} line {line_no} is about {lab['image']} but sample {d.raw_id} "
                    f"shows {d.meta.get('image')}", label_file)
            d.answer = as_text(lab["label"])
            d.answers = [d.answer]


# --------------------------------------------------------------------------------------------
# scoring


_POPE_NEGATIONS = frozenset({"No", "not", "no"})


def parse_yes_no(text: str) -> Literal["yes", "no"] | None:
    """Read a yes/no answer the way POPE's evaluation does.

    Keep the text before the first ".", delete commas, split on single spaces; any of the words
    "No", "not", "no" (case as written) means "no". Otherwise "yes" if a word is yes (any case,
    surrounding punctuation ignored), else None. POPE's script scores None as "yes"
    (:func:`score_pope` does too and counts them in ``n_unparsed``).
    """
    text = as_text(text)
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    if any(w in _POPE_NEGATIONS for w in words):
        return "no"
    if any(w.strip(string.punctuation).lower() == "yes" for w in words):
        return "yes"
    return None


def _binary_metrics(pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """pairs: (predicted, gold) with values "yes"/"no"; "yes" is the positive class."""
    tp = sum(p == "yes" and g == "yes" for p, g in pairs)
    fp = sum(p == "yes" and g == "no" for p, g in pairs)
    tn = sum(p == "no" and g == "no" for p, g in pairs)
    fn = sum(p == "no" and g == "yes" for p, g in pairs)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    n = len(pairs)
    return {
        "accuracy": percent(tp + tn, n),
        "precision": 100.0 * precision,
        "recall": 100.0 * recall,
        "f1": 100.0 * f1,
        "yes_ratio": percent(tp + fp, n),
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "n": n,
    }


_POPE_MEANED = ("accuracy", "precision", "recall", "f1", "yes_ratio")


def score_pope(records: Iterable[ScoredRecord]) -> dict[str, Any]:
    """POPE: accuracy, precision, recall, F1 (positive class "yes") and yes-ratio, percent.

    Records: ``prediction``, ``answer`` (or ``label``) "yes"/"no", and the split in ``category``
    (or ``split``): adversarial / popular / random; without one all records form split "all".
    Predictions go through :func:`parse_yes_no`; unparsed ones count as "yes" (POPE's rule).
    yes-ratio is the share of *predicted* "yes" (POPE/LLaVA; lmms-eval's aggregator uses the
    gold labels instead). An undefined precision/recall/F1 (0/0) is reported as 0, as lmms-eval does.

    Returns ``per_split`` (each with the metrics and tp/fp/tn/fn), ``overall`` (all records
    pooled, like lmms-eval's ``pope`` task), ``mean`` (unweighted mean of the splits' metrics) and
    ``score`` = mean F1 over the splits (how LLaVA-1.5 reports POPE).
    """
    rows = as_list(records)
    by_split: dict[str, list[tuple[str, str]]] = defaultdict(list)
    unparsed = 0
    for row in rows:
        gold = str(first_of(row, "answer", "label", default="")).strip().lower()
        if gold not in ("yes", "no"):
            raise ValueError(f"POPE gold answer must be yes/no, got {gold!r}")
        parsed = parse_yes_no(as_text(row.get("prediction")))
        unparsed += parsed is None
        split = str(first_of(row, "category", "split", default="all"))
        by_split[split].append((parsed or "yes", gold))
    per_split = {name: _binary_metrics(pairs) for name, pairs in sorted(by_split.items())}
    overall = _binary_metrics([pair for pairs in by_split.values() for pair in pairs])
    mean = {k: sum(s[k] for s in per_split.values()) / len(per_split) for k in _POPE_MEANED}
    return {
        "metric": "f1 (mean over splits)",
        "score": mean["f1"],
        "per_split": per_split,
        "overall": overall,
        "mean": mean,
        "n": len(rows),
        "n_unparsed": unparsed,
    }


TASK = Task(SPEC, build_row, score_pope, join_llava)
