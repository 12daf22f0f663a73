"""MMBench's ``.tsv``: one row per question, the image as base64 text (or, VLMEvalKit-style, the
index of an earlier row with the same image)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Callable

from ..records import (
    BenchmarkDataError,
    Built,
    Draft,
    Record,
    TaskSpec,
    as_text,
    finish_records,
)
from .files import llava_question_file
from .images import Base64Image


def read_tsv(spec: TaskSpec, path: Path, build: Callable[[dict, str, str], Built], limit: int | None, pre: str,
             post: str) -> list[Record]:
    """The records of an MMBench ``.tsv`` (or of the one ``.tsv`` in the folder ``path``), each row
    built by the task's ``build(row, pre, post)``."""
    if path.is_dir():
        found = llava_question_file(spec, path)
        candidates = [found] if found else sorted(path.glob("*.tsv"))
        if len(candidates) != 1:
            raise BenchmarkDataError(
                f"{path}: expected one MMBench .tsv ({', '.join(spec.llava_files)}), found "
                f"{', '.join(c.name for c in candidates) or 'none'}", path)
        path = candidates[0]
    previous_limit = csv.field_size_limit()
    drafts: list[Draft] = []
    images_by_index: dict[str, str] = {}
    try:
        csv.field_size_limit(2**31 - 1)
        with open(path, encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh, delimiter="\t")
            header = reader.fieldnames or []
            missing = [c for c in (*spec.required_columns, *spec.answer_columns) if c not in header]
            if missing:
                raise BenchmarkDataError(
                    f"{path}: column {missing[0]!r} required by {spec.name} is missing; columns found: "
                    f"{', '.join(header)}", path)
            for line_no, raw in enumerate(reader, start=2):
                if limit is not None and len(drafts) >= limit:
                    break
                if None in raw:
                    raise BenchmarkDataError(f"{path}: line {line_no}: more fields than the header has", path)
                row = {k: (None if v == "" else v) for k, v in raw.items()}  # pandas reads empty cells as NaN
                index = as_text(row["index"])
                image = row.get("image") or ""
                if len(image) <= 64 and image in images_by_index:  # VLMEvalKit-style reference to another row
                    image = images_by_index[image]
                if not image:
                    raise BenchmarkDataError(f"{path}: line {line_no}: sample {index} has no image", path)
                images_by_index[index] = image
                built = build(row, pre, post)
                meta = {k: v for k, v in row.items() if k != "image"}
                meta.update(format="tsv", file=str(path), line=line_no, split=spec.default_split,
                            raw_question=built.raw_question)
                ref = Base64Image(image, f"{path} line {line_no} (base64)")
                drafts.append(Draft(index, built.question, built.answer, built.answers, built.options,
                                    built.category, meta, (ref,)))
    except csv.Error as exc:
        raise BenchmarkDataError(f"{path}: malformed tsv ({exc})", path) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise BenchmarkDataError(f"{path} could not be read ({exc})", path) from exc
    finally:
        csv.field_size_limit(previous_limit)
    return finish_records(spec, drafts)
