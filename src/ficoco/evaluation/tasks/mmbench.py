"""MMBench dev, English and Chinese (lmms-eval ``mmbench_en_dev``, ``mmbench_cn_dev``): multiple
choice with up to five options, each question asked again with its options shifted (circular
evaluation).

Files: lmms-lab/MMBench (configs ``en`` / ``cn``), or the ``.tsv`` of the MMBench release with
base64 images (:mod:`ficoco.evaluation.formats.tsv`).  Scoring: lmms-eval
``tasks/mmbench/mmbench_evals.py`` (circular evaluation, rule-based option matching
``can_infer``; facts and formulas, not code, were taken from it).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

from ..metrics import (
    ScoredRecord,
    as_list,
    extract_option,
    first_of,
    gold_letter,
    percent,
    record_options,
)
from ..records import (
    OPTION_POST,
    Built,
    Task,
    TaskSpec,
    as_text,
    is_missing,
    single_answer,
)

MMBENCH_CN_POST = "\n请直接使用所提供的选项字母作为答案回答。"


SPEC_EN = TaskSpec("mmbench_en_dev", "lmms-lab/MMBench", "en", "dev", "", OPTION_POST,
                   ("index", "question", "A", "B", "image"), ("answer",), "multiple_choice",
                   other_configs=("cn", "cc", "ru"), llava_files=("mmbench_dev_20230712.tsv",))
SPEC_CN = TaskSpec("mmbench_cn_dev", "lmms-lab/MMBench", "cn", "dev", "", MMBENCH_CN_POST,
                   ("index", "question", "A", "B", "image"), ("answer",), "multiple_choice",
                   other_configs=("en", "cc", "ru"), llava_files=("mmbench_dev_cn_20231003.tsv",))


def _row_builder(english: bool):
    def build(row, pre, post):
        question, hint = as_text(row["question"]), row.get("hint")
        options = {}
        for key in "ABCDE":
            value = row.get(key)
            if key in row and value and not is_missing(value) and value != "nan":
                options[key] = as_text(value)
        listing = "There are several options:\n" + "".join(f"{k}. {v}\n" for k, v in options.items())
        listing = listing.rstrip("\n")
        has_hint = not is_missing(hint) and (hint != "nan" or not english)
        query = f"{hint} {question} {listing}" if has_hint else f"{question} {listing}"
        answer, answers = single_answer(row)
        cat = row.get("category")
        return Built(as_text(row["index"]), f"{pre}{query}\n{post}", question, answer, answers, options,
                     None if is_missing(cat) else as_text(cat))

    return build


_CIRCULAR_BASE = 1_000_000


def score_mmbench(
    records: Iterable[ScoredRecord],
    *,
    fallback: Callable[[ScoredRecord], str | None] | None = None,
) -> dict[str, Any]:
    """MMBench with circular evaluation, accuracy in percent.

    Records: ``index``, ``prediction``, ``answer`` (letter), options (``options`` mapping or
    "A".."E" fields), optional ``category`` / ``l2-category`` (``l2_category`` accepted).
    A circular variant of question ``q`` has ``index = q + k * 1_000_000``; a question is
    correct only if every variant's answer maps to its gold letter.

    Per group, as MMBench does: predictions are first matched by :func:`extract_option`; any
    matched-but-wrong variant fails the question. Variants left unmatched go to ``fallback``
    (in lmms-eval, a GPT matcher; here any callable ``record -> letter | None``); without one, they
    count as wrong, and ``n_unresolved`` counts the questions that failed only for that reason.
    ``n_unparsed`` counts the records (variants) whose answer gave no letter, before any fallback.
    Categories come from the original question (``index < 1_000_000``, else the lowest index).
    """
    rows = as_list(records)
    groups: dict[int, list[ScoredRecord]] = defaultdict(list)
    for row in rows:
        groups[int(row["index"]) % _CIRCULAR_BASE].append(row)
    hits: dict[int, bool] = {}
    unresolved = unparsed = 0
    for key, members in groups.items():
        members.sort(key=lambda r: int(r["index"]))
        golds = [gold_letter(r.get("answer")) for r in members]
        picks = [extract_option(as_text(r.get("prediction")).strip(), record_options(r)) for r in members]
        unparsed += sum(p is None for p in picks)
        if any(p is not None and p != g for p, g in zip(picks, golds)):
            hits[key] = False
            continue
        ok = True
        for member, pick, gold in zip(members, picks, golds):
            if pick is not None:
                continue
            resolved = fallback(member) if fallback is not None else None
            if resolved is None or as_text(resolved).strip().upper() != gold:
                ok = False
                if fallback is None:
                    unresolved += 1
                break
        hits[key] = ok
    accuracy = percent(sum(hits.values()), len(hits))
    result: dict[str, Any] = {
        "metric": "circular_accuracy",
        "score": accuracy,
        "accuracy": accuracy,
        "n": len(hits),
        "n_records": len(rows),
        "n_unresolved": unresolved,
        "n_unparsed": unparsed,
    }
    for out_key, fields in (("per_category", ("category",)), ("per_l2_category", ("l2-category", "l2_category"))):
        bucket: dict[str, list[bool]] = defaultdict(list)
        for key, members in groups.items():
            value = first_of(members[0], *fields)
            if value is not None:
                bucket[str(value)].append(hits[key])
        if bucket:
            result[out_key] = {k: percent(sum(v), len(v)) for k, v in sorted(bucket.items())}
    return result


TASK_EN = Task(SPEC_EN, _row_builder(english=True), score_mmbench)
TASK_CN = Task(SPEC_CN, _row_builder(english=False), score_mmbench)
