"""ScienceQA-IMG (lmms-eval ``scienceqa_img``): the ScienceQA test questions that come with an
image, multiple choice with a hint.

Files: lmms-lab/ScienceQA (config ``ScienceQA-IMG``; the answer is an index into ``choices``), or
LLaVA-1.5's ``llava_test_CQM-A.json`` (a list of conversations, not jsonl) with ``images/test/``,
the answers and categories joined from ``problems.json``.  Scoring: lmms-eval
``tasks/scienceqa/utils.py`` (facts, not code, were taken from it).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ..formats.files import first_file, read_json_file, require_keys
from ..formats.images import FileImage
from ..formats.llava import no_entry, parse_options
from ..metrics import ScoredRecord, choice_accuracy
from ..records import (
    OPTION_POST,
    BenchmarkDataError,
    Built,
    Draft,
    Task,
    TaskSpec,
    as_text,
    is_missing,
)

SPEC = TaskSpec("scienceqa_img", "lmms-lab/ScienceQA", "ScienceQA-IMG", "test", "", OPTION_POST,
                ("question", "choices", "hint", "image"), ("answer",), "multiple_choice",
                other_configs=("ScienceQA-FULL",),
                llava_files=("llava_test_CQM-A.json",), llava_image_dirs=("images/test", "test", "images"))


def _letters(n: int) -> list[str]:
    return [chr(ord("A") + i) for i in range(n)]


def build_row(row, pre, post):
    question, hint = as_text(row["question"]), row.get("hint")
    choices = [as_text(c) for c in (row.get("choices") or [])]
    letters = _letters(len(choices))
    listing = "\n".join(f"{k}. {c}" for k, c in zip(letters, choices))
    context = f"Context: {hint}\n" if hint else ""
    answer = row.get("answer")
    letter = None
    if not is_missing(answer):
        try:
            letter = letters[int(answer)]
        except (IndexError, ValueError, TypeError) as exc:
            raise BenchmarkDataError(
                f"scienceqa_img: answer {answer!r} is not an index into choices {choices}") from exc
    cat = row.get("category")
    return Built(None, f"{pre}{context}{question}\n{listing}{post}", question, letter,
                 [letter] if letter else [], dict(zip(letters, choices)), None if is_missing(cat) else as_text(cat))


def llava_drafts(spec: TaskSpec, qfile: Path, folder: Path) -> list[Draft]:
    """The drafts of LLaVA's ScienceQA question file (``llava_test_CQM-A.json``): a JSON list of
    conversations, of which the ones with an image are read."""
    drafts = []
    entries = read_json_file(qfile)
    if not isinstance(entries, list):
        raise BenchmarkDataError(f"{qfile}: expected a JSON list of LLaVA conversations", qfile)
    for i, e in enumerate(entries):
        where = f"entry {i}"
        if not isinstance(e, dict):
            raise BenchmarkDataError(f"{qfile}: {where}: expected a JSON object", qfile)
        require_keys(qfile, where, e, ("id", "conversations"))
        if "image" not in e:  # scienceqa_img: the questions that come with an image
            continue
        turns = e["conversations"]
        if not isinstance(turns, list) or not turns or not isinstance(turns[0], dict) or "value" not in turns[0]:
            raise BenchmarkDataError(f"{qfile}: {where}: 'conversations' has no human turn with a 'value'", qfile)
        text = as_text(turns[0]["value"]).replace("<image>", "").strip()
        answer = None
        if len(turns) > 1 and isinstance(turns[1], dict):
            reply = as_text(turns[1].get("value")).strip()
            m = re.fullmatch(r"([A-E])", reply) or re.search(r"The answer is ([A-E])", reply)
            answer = m.group(1) if m else None
        meta = {"raw_question": text, "image": e["image"], "entry": i}
        drafts.append(Draft(as_text(e["id"]), f"{text}{OPTION_POST}", answer, [answer] if answer else [],
                            parse_options(text), None, meta, (FileImage(folder / e["image"]),)))
    return drafts


def join_llava(spec, drafts, qfile, folder, ann):
    ann = ann or first_file(qfile.parent / "problems.json")
    if ann is None:
        return
    problems = read_json_file(ann)
    if not isinstance(problems, dict):
        raise BenchmarkDataError(f"{ann}: expected a JSON object keyed by problem id (ScienceQA problems.json)", ann)
    for d in drafts:
        prob = problems.get(d.raw_id)
        if not isinstance(prob, dict):
            raise no_entry(spec, d, ann, d.raw_id)
        if d.answer is None and "answer" in prob:
            d.answer = chr(ord("A") + int(prob["answer"]))
            d.answers = [d.answer]
        d.category = None if is_missing(prob.get("category")) else as_text(prob.get("category"))
        for key in ("subject", "topic", "grade", "skill"):
            if key in prob:
                d.meta[key] = prob[key]


def scienceqa_letter(prediction: str, options: Mapping[str, str]) -> str | None:
    # lmms-eval sqa_process_results: the whole answer is the letter (any case), or it starts with
    # an upper-case letter followed by ".".
    text = prediction.strip()
    if len(text) == 1:
        return text.upper()
    if len(text) >= 2 and text[0].isupper() and text[1] == ".":
        return text[0]
    return None


def score_scienceqa(records: Iterable[ScoredRecord]) -> dict[str, Any]:
    """ScienceQA-IMG as lmms-eval ``scienceqa_img``."""
    return choice_accuracy(records, scienceqa_letter)


TASK = Task(SPEC, build_row, score_scienceqa, join_llava, llava_drafts)
