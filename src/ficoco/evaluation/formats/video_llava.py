"""Video-LLaVA's video QA files (``GPT_Zero_Shot_QA/<Benchmark>_Zero_Shot_QA/``), the ``llava``
form of the four video QA benchmarks: ``test_q.json``, a JSON list of ``{"video_name",
"question", "question_id"}``; ``test_a.json``, the list of ``{"answer", "question_id"[, "type"]}``
in the same order; and the extracted video folder (``mp4/``, ``videos/``, ``videos/all/``,
``all_test/``).

As Video-LLaVA's ``run_inference_video_qa.py``, answers are joined to questions by position; a
``question_id`` present on both sides must agree, so that a shuffled answer file is refused
rather than scored. The question is the prompt, verbatim (Video-LLaVA adds nothing to it).
"""

from __future__ import annotations

from pathlib import Path

from ..records import BenchmarkDataError, Draft, TaskSpec, as_text, is_missing
from .files import first_file, read_json_file, require_keys
from .videos import VideoFile

ANSWER_FILE = "test_a.json"


def _entries(path: Path) -> list[dict]:
    data = read_json_file(path)
    if not isinstance(data, list) or not all(isinstance(e, dict) for e in data):
        raise BenchmarkDataError(f"{path}: expected a JSON list of objects (Video-LLaVA's {path.name})", path)
    return data


def video_llava_drafts(spec: TaskSpec, qfile: Path, folder: Path) -> list[Draft]:
    """The drafts of a ``test_q.json``, each with its video looked for in ``folder``."""
    drafts = []
    for i, entry in enumerate(_entries(qfile)):
        require_keys(qfile, f"entry {i}", entry, ("video_name", "question"))
        question = as_text(entry["question"])
        raw_id = as_text(entry["question_id"]) if not is_missing(entry.get("question_id")) else str(i)
        meta = {k: v for k, v in entry.items() if k != "question"}
        meta.update(raw_question=question, entry=i)
        drafts.append(Draft(raw_id, question, meta=meta,
                            videos=(VideoFile(as_text(entry["video_name"]), [folder], spec.video_prefixes),)))
    return drafts


def join_video_llava(spec: TaskSpec, drafts: list[Draft], qfile: Path, folder: Path, ann: Path | None) -> None:
    """Fill the drafts' answers (and ActivityNet-QA's question ``type``) from ``test_a.json`` next
    to the question file, or ``ann``; without one the records have no answers."""
    ann = ann or first_file(qfile.parent / ANSWER_FILE)
    if ann is None:
        return
    answers = _entries(ann)
    positions = [d.meta["entry"] for d in drafts]
    if positions and max(positions) >= len(answers):
        raise BenchmarkDataError(f"{spec.name}: {ann} has {len(answers)} answers but {qfile} has more questions", ann)
    for d in drafts:
        entry = answers[d.meta["entry"]]
        require_keys(ann, f"entry {d.meta['entry']}", entry, ("answer",))
        asked, answered = d.meta.get("question_id"), entry.get("question_id")
        if asked is not None and answered is not None and as_text(asked) != as_text(answered):
            raise BenchmarkDataError(f"{spec.name}: entry {d.meta['entry']} of {ann} answers question {answered!r}, "
                                     f"but that of {qfile} is {asked!r}: the files are not in the same order", ann)
        d.answer = as_text(entry["answer"])
        d.answers = [d.answer]
        if not is_missing(entry.get("type")):
            d.meta["type"] = entry["type"]
