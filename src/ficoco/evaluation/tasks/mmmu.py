"""MMMU validation (lmms-eval ``mmmu_val``): college-level questions over 30 subjects in 6
disciplines, multiple choice or open-ended, with up to seven images referred to as ``<image i>``.

Files: lmms-lab/MMMU (split ``validation``; columns ``id`` such as ``validation_Art_Theory_12``,
``question``, ``options`` (a Python list literal), ``answer``, ``question_type``
(``multiple-choice`` / ``open``), ``image_1`` .. ``image_7``, ``subfield``, ``img_type``, ...).
There is no LLaVA-1.5 question file for MMMU.

Prompt (lmms-eval ``tasks/mmmu/utils.py``, ``prompt_type: format``): multiple choice
``"{question}\\n(A. option\\n)...\\nAnswer with the option's letter from the given choices
directly."``, open ``"{question}\\n\\nAnswer the question using a single word or phrase."``. The
images are those the question and options refer to (``<image i>``, in order), all shown before
the question, each as its own image (lmms-eval's LLaVA and Qwen-VL models do the same); the
``<image i>`` references stay in the text.

Scoring: the official MMMU evaluation (``eval_utils.py``, as lmms-eval's copy): the option letter
is parsed as ``(A)``, then ``A `` , then ``A.``, then (answers over five words) the option's text,
the last mention winning; an answer naming no option gets a random letter, here drawn from a
generator seeded with the question's id so that a rerun scores the same (the official script's
draw is unseeded). Open answers: the key phrases after "is", "so", "answer", ... and every number
in them, normalised (numbers rounded to 2 decimals, text lower-cased), correct when one equals a
number answer or contains a text answer. Accuracy overall, per subject and per discipline
(instance-weighted, as the official aggregation).
"""

from __future__ import annotations

import ast
import random
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any

from ..metrics import ScoredRecord, as_list, percent
from ..records import BenchmarkDataError, Built, Task, TaskSpec, as_text, is_missing

MC_PROMPT = "Answer with the option's letter from the given choices directly."
OPEN_PROMPT = "Answer the question using a single word or phrase."

SPEC = TaskSpec("mmmu_val", "lmms-lab/MMMU", None, "validation", "", "\n\n" + MC_PROMPT,
                ("id", "question", "options", "question_type"), ("answer",), "open",
                other_configs=(), max_new_tokens=128)

#: discipline -> its subjects (the subject is the middle of a question's id)
DISCIPLINES: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "Art and Design": ("Art", "Art_Theory", "Design", "Music"),
    "Business": ("Accounting", "Economics", "Finance", "Manage", "Marketing"),
    "Science": ("Biology", "Chemistry", "Geography", "Math", "Physics"),
    "Health and Medicine": ("Basic_Medical_Science", "Clinical_Medicine", "Diagnostics_and_Laboratory_Medicine",
                            "Pharmacy", "Public_Health"),
    "Humanities and Social Science": ("History", "Literature", "Sociology", "Psychology"),
    "Tech and Engineering": ("Agriculture", "Architecture_and_Engineering", "Computer_Science", "Electronics",
                             "Energy_and_Power", "Materials", "Mechanical_Engineering"),
})
_IMAGE_REF = re.compile(r"<image (\d+)>")


def subject_of(sample_id: str) -> str:
    """``"validation_Art_Theory_12"`` -> ``"Art_Theory"``."""
    match = re.match(r"^[^_]+_(.+?)_\d+$", sample_id)
    if not match:
        raise BenchmarkDataError(f"mmmu_val: id {sample_id!r} is not <split>_<subject>_<number>")
    return match.group(1)


def parse_option_list(text: Any) -> list[str]:
    """The ``options`` cell, a Python list literal in lmms-lab/MMMU (a list is taken as it is)."""
    if isinstance(text, (list, tuple)):
        return [as_text(o) for o in text]
    try:
        value = ast.literal_eval(as_text(text))
    except (ValueError, SyntaxError) as exc:
        raise BenchmarkDataError(f"mmmu_val: options {text!r} are not a list literal") from exc
    if not isinstance(value, (list, tuple)):
        raise BenchmarkDataError(f"mmmu_val: options {text!r} are not a list")
    return [as_text(o) for o in value]


def build_row(row, pre, post):
    question, kind = as_text(row["question"]), as_text(row["question_type"])
    options = parse_option_list(row["options"]) if not is_missing(row["options"]) else []
    letters = [chr(ord("A") + i) for i in range(len(options))]
    if kind == "multiple-choice":
        listing = "\n".join(f"{k}. {o}" for k, o in zip(letters, options))
        prompt, referring = f"{pre}{question}\n{listing}{post}", f"{question}\n{listing}"
    else:
        prompt, referring = f"{pre}{question}\n\n{OPEN_PROMPT}", question
    # the images the text refers to, in order of their number (lmms-eval's mmmu_doc_to_visual)
    columns = tuple(f"image_{n}" for n in sorted({int(n) for n in _IMAGE_REF.findall(referring)}))
    answer = None if is_missing(row.get("answer")) else as_text(row["answer"])
    sample_id = as_text(row["id"])
    return Built(sample_id, prompt, question, answer, [answer] if answer is not None else [],
                 dict(zip(letters, options)) if kind == "multiple-choice" else {}, subject_of(sample_id),
                 image_columns=columns)


# --------------------------------------------------------------------------------------------
# the official answer parsing and matching


def parse_choice(response: str, letters: list[str], options: Mapping[str, str], sample_id: str) -> tuple[str, bool]:
    """``(letter, parsed)``: the option an answer picks by the official rules, or a random letter
    (seeded by ``sample_id``) with ``parsed=False`` when it names none."""
    for char in (",", ".", "!", "?", ";", ":", "'"):
        response = response.strip(char)
    response = f" {response} "
    by_letter, bracketed = True, False
    candidates = [c for c in letters if f"({c})" in response]
    if candidates:
        bracketed = True
    if not candidates:
        candidates = [c for c in letters if f"{c} " in response]
    if not candidates:
        candidates = [c for c in letters if f"{c}." in response]
    if not candidates and len(response.split()) > 5:
        candidates = [c for c in letters if options[c].lower() in response.lower()]
        by_letter = False
    if not candidates:
        return random.Random(f"mmmu:{sample_id}").choice(letters), False
    if len(candidates) == 1:
        return candidates[0], True
    if by_letter:
        where = [response.rfind(f"({c})" if bracketed else f" {c} ") for c in candidates]
    else:
        where = [response.lower().rfind(options[c].lower()) for c in candidates]
    return candidates[max(range(len(where)), key=lambda i: (where[i], -i))], True


def _numbers(text: str) -> list[str]:
    commas = re.findall(r"-?\b\d{1,3}(?:,\d{3})+\b", text)
    scientific = re.findall(r"-?\d+(?:\.\d+)?[eE][+-]?\d+", text)
    simple = re.findall(r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])", text)
    return commas + scientific + simple


def _normalize(text: str) -> list:
    text = text.strip()
    try:
        return [round(float(text.replace(",", "")), 2)]
    except ValueError:
        text = text.lower()
        return [" " + text, text + " "] if len(text) == 1 else [text]  # a single letter must stand alone


def parse_open(response: str) -> list:
    """The candidate answers of an open response: key phrases, their numbers, normalised."""
    response = response.strip().strip(".").lower()
    parts = re.split(r"\.\s(?=[A-Z])|\n", response)
    indicators = ["could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result "]
    keys = []
    for index, part in enumerate(parts):
        if index == len(parts) - 1:
            indicators.append("=")  # the last sentence may be an equation
        tails = [part.split(i)[-1].strip() for i in indicators if i in part]
        shortest = min(tails, key=len) if tails else None
        if shortest and shortest not in (":", ",", ".", "!", "?", ";", "'"):
            keys.append(shortest)
    keys = keys or [response]
    found = keys + [n for k in keys for n in _numbers(k)]
    out: list = []
    for item in found:
        for value in _normalize(item):
            if value not in out:
                out.append(value)
    return out


def open_correct(answer: str, predictions: list) -> bool:
    golds = _normalize(answer)
    for pred in predictions:
        if isinstance(pred, str):
            if any(isinstance(g, str) and g in pred for g in golds):
                return True
        elif pred in golds:
            return True
    return False


def score_mmmu(records: Iterable[ScoredRecord]) -> dict[str, Any]:
    """MMMU accuracy (percent) as the official evaluation; see the module docstring.

    Records: ``sample_id`` (the MMMU id, e.g. ``validation_Art_Theory_12``), ``prediction``,
    ``answer``, ``question_type``, ``options`` (letter -> text, multiple choice). Result:
    ``score`` / ``accuracy`` overall, ``per_subject``, ``per_discipline``, ``n``,
    ``n_unparsed`` (answers naming no option, which got a random letter, plus empty open answers)."""
    rows = as_list(records)
    by_subject: dict[str, list[bool]] = defaultdict(list)
    unparsed = 0
    for row in rows:
        sample_id, prediction = as_text(row.get("sample_id")), as_text(row.get("prediction"))
        answer = as_text(row.get("answer"))
        if row.get("question_type") == "multiple-choice":
            options = {str(k): as_text(v) for k, v in (row.get("options") or {}).items()}
            letter, parsed = parse_choice(prediction, list(options), options, sample_id)
            unparsed += not parsed
            correct = letter == answer.strip()
        else:
            unparsed += not prediction.strip()
            correct = open_correct(answer, parse_open(prediction))
        by_subject[subject_of(sample_id)].append(correct)
    hits = [c for marks in by_subject.values() for c in marks]
    per_discipline = {}
    for discipline, subjects in DISCIPLINES.items():
        marks = [c for s in subjects for c in by_subject.get(s, [])]
        if marks:
            per_discipline[discipline] = percent(sum(marks), len(marks))
    accuracy = percent(sum(hits), len(hits))
    return {"metric": "accuracy", "score": accuracy, "accuracy": accuracy, "n": len(rows), "n_unparsed": unparsed,
            "per_subject": {s: percent(sum(m), len(m)) for s, m in sorted(by_subject.items())},
            "per_discipline": per_discipline}


TASK = Task(SPEC, build_row, score_mmmu, scorer_fields=("question_type",))
