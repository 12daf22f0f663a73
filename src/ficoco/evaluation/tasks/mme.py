"""MME (lmms-eval ``mme``): two yes/no questions per image over 14 subtasks (10 perception, 4
cognition).

Files: lmms-lab/MME, the ``MME_Benchmark_release_version`` folder (``<subtask>/*.txt`` of
``question<TAB>answer`` lines next to the images, or ``<subtask>/images/`` and
``<subtask>/questions_answers_YN/``), or LLaVA-1.5's ``llava_mme.jsonl``, its answers joined from
the release folder.  Scoring: lmms-eval ``tasks/mme/utils.py`` (answer parser, subtask lists,
acc + acc+; facts and formulas, not code, were taken from it).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ..formats.images import FileImage
from ..formats.llava import no_entry
from ..metrics import ScoredRecord, as_list, first_of, percent
from ..records import (
    VQA_POST,
    BenchmarkDataError,
    Built,
    Draft,
    Record,
    Task,
    TaskSpec,
    as_text,
    finish_records,
    single_answer,
)

SPEC = TaskSpec("mme", "lmms-lab/MME", None, "test", "", VQA_POST,
                ("question_id", "question", "image", "category"), ("answer",), "yes_no",
                llava_files=("llava_mme.jsonl",), llava_image_dirs=("MME_Benchmark_release_version",))


_MME_REPLACE = " Please answer yes or no."


def build_row(row, pre, post):
    raw = as_text(row["question"])
    q = raw.strip()
    if pre != "":
        q = f"{pre}{q.replace(_MME_REPLACE, '')}"
    if post != "":
        q = f"{q.replace(_MME_REPLACE, '')}{post}"
    answer, answers = single_answer(row)
    return Built(as_text(row["question_id"]), q, raw, answer, answers, category=as_text(row["category"]))


# --------------------------------------------------------------------------------------------
# the MME release folder


@dataclass
class _MMEEntry:
    category: str
    image: Path
    question: str
    answer: str
    qa_file: Path
    line: int


_IMAGE_SUFFIXES = (".jpg", ".png", ".jpeg", ".JPG", ".PNG", ".JPEG")


def _mme_entries(root: Path, check_images: bool) -> list[_MMEEntry]:
    entries = []
    for category_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if (category_dir / "images").is_dir():
            image_dir, qa_dir = category_dir / "images", category_dir / "questions_answers_YN"
        else:
            image_dir = qa_dir = category_dir
        if not qa_dir.is_dir():
            raise BenchmarkDataError(f"{category_dir} has images/ but no questions_answers_YN/", category_dir)
        for qa_file in sorted(qa_dir.glob("*.txt")):
            image = next((image_dir / f"{qa_file.stem}{s}" for s in _IMAGE_SUFFIXES
                          if (image_dir / f"{qa_file.stem}{s}").is_file()), None)
            if image is None:
                if check_images:
                    raise BenchmarkDataError(
                        f"mme: image for {qa_file} not found ({image_dir / qa_file.stem}.jpg/.png)", qa_file)
                image = image_dir / f"{qa_file.stem}.jpg"
            try:
                lines = qa_file.read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError) as exc:
                raise BenchmarkDataError(f"{qa_file} could not be read ({exc})", qa_file) from exc
            for line_no, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                parts = line.strip().split("\t")
                if len(parts) != 2:
                    raise BenchmarkDataError(
                        f"{qa_file}: line {line_no}: expected 'question<TAB>answer', got {line!r}", qa_file)
                entries.append(_MMEEntry(category_dir.name, image, parts[0], parts[1], qa_file, line_no))
    if not entries:
        raise BenchmarkDataError(f"{root}: no MME question files (<category>/*.txt or "
                                 f"<category>/questions_answers_YN/*.txt)", root)
    return entries


def _mme_root(path: Path) -> Path:
    inner = path / "MME_Benchmark_release_version"
    return inner if inner.is_dir() else path


def is_mme_release(folder: Path) -> bool:
    if not folder.is_dir():
        return False
    for sub in folder.iterdir():
        if sub.is_dir() and ((sub / "questions_answers_YN").is_dir() or any(sub.glob("*.txt"))):
            return True
    return False


def read_mme_folder(spec: TaskSpec, path: Path, limit: int | None, pre: str, post: str,
                    check_images: bool) -> list[Record]:
    root = _mme_root(path)
    drafts = []
    for e in _mme_entries(root, check_images):
        if limit is not None and len(drafts) >= limit:
            break
        qid = e.image.relative_to(root).as_posix()
        built = build_row({"question_id": qid, "question": e.question, "answer": e.answer,
                           "category": e.category}, pre, post)
        meta = {"format": "mme_folder", "file": str(e.qa_file), "line": e.line, "split": spec.default_split,
                "raw_question": e.question}
        drafts.append(Draft(qid, built.question, built.answer, built.answers, {}, e.category, meta,
                            (FileImage(e.image),)))
    return finish_records(spec, drafts)


def _mme_key(category: str, stem: str, question: str) -> tuple[str, str, str]:
    q = question.replace(VQA_POST.strip(), "").replace("Please answer yes or no.", "")
    return category, stem, " ".join(q.split())


def join_llava(spec, drafts, qfile, folder, ann):
    root = _mme_root(ann) if ann is not None else folder
    if not is_mme_release(root):
        return
    gt = {_mme_key(e.category, e.qa_file.stem, e.question): e.answer for e in _mme_entries(root, False)}
    for d in drafts:
        category = d.category or d.raw_id.split("/")[0]
        key = _mme_key(category, Path(as_text(d.meta.get("image"))).stem, d.question)
        if key not in gt:
            raise no_entry(spec, d, root, key)
        d.answer = gt[key]
        d.answers = [d.answer]
        d.category = category


# --------------------------------------------------------------------------------------------
# scoring


MME_PERCEPTION = (
    "existence",
    "count",
    "position",
    "color",
    "posters",
    "celebrity",
    "scene",
    "landmark",
    "artwork",
    "OCR",
)
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def parse_mme_answer(text: str) -> Literal["yes", "no", "other"]:
    """lmms-eval's MME answer parser: lower-case, strip, delete "."; "yes"/"no" as is, a lone
    "y"/"n", else "yes"/"no" if found in the first 4 characters (yes checked first), else "other"."""
    text = as_text(text).lower().strip().replace(".", "")
    if text in ("yes", "no"):
        return text  # type: ignore[return-value]
    if len(text) == 1:
        return {"y": "yes", "n": "no"}.get(text, "other")  # type: ignore[return-value]
    head = text[:4]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    return "other"


def score_mme(records: Iterable[ScoredRecord]) -> dict[str, Any]:
    """MME: per-subtask score = accuracy + accuracy+ (both percent), perception and cognition sums.

    Records: ``prediction``, ``answer`` ("Yes"/"No"), ``category`` (subtask, spelled as in MME:
    see ``MME_PERCEPTION`` / ``MME_COGNITION``) and the image the question is about in
    ``image_id`` (or, as in lmms-eval, ``question_id``, which there is the image path). Each image
    must have exactly two questions; accuracy+ is the share of images with both right.
    ``score`` is the perception total; ``total`` adds cognition.
    """
    rows = as_list(records)
    known = set(MME_PERCEPTION) | set(MME_COGNITION)
    by_task: dict[str, dict[Any, list[bool]]] = defaultdict(lambda: defaultdict(list))
    other = 0
    for row in rows:
        task = str(row.get("category"))
        if task not in known:
            raise ValueError(f"unknown MME subtask {task!r}; expected one of {sorted(known)}")
        gold = as_text(row.get("answer")).lower().strip().replace(".", "")
        if gold not in ("yes", "no"):
            raise ValueError(f"MME gold answer must be yes/no, got {row.get('answer')!r}")
        pred = parse_mme_answer(as_text(row.get("prediction")))
        other += pred == "other"
        image = first_of(row, "image_id", "question_id")
        if image is None:
            raise ValueError("MME records need 'image_id' or 'question_id' to pair the questions")
        by_task[task][image].append(pred == gold)
    per_subtask = {}
    for task, images in by_task.items():
        for image, marks in images.items():
            if len(marks) != 2:
                raise ValueError(f"MME pairs two questions per image; {task}/{image} has {len(marks)}")
        answers = [m for marks in images.values() for m in marks]
        acc = percent(sum(answers), len(answers))
        acc_plus = percent(sum(all(marks) for marks in images.values()), len(images))
        per_subtask[task] = {"accuracy": acc, "accuracy_plus": acc_plus, "score": acc + acc_plus, "n": len(answers)}
    perception = sum(per_subtask[t]["score"] for t in MME_PERCEPTION if t in per_subtask)
    cognition = sum(per_subtask[t]["score"] for t in MME_COGNITION if t in per_subtask)
    ordered = {t: per_subtask[t] for t in MME_PERCEPTION + MME_COGNITION if t in per_subtask}
    return {
        "metric": "perception",
        "score": perception,
        "perception": perception,
        "cognition": cognition,
        "total": perception + cognition,
        "per_subtask": ordered,
        "n": len(rows),
        "n_other": other,
        "n_unparsed": other,
    }


TASK = Task(SPEC, build_row, score_mme, join_llava)
