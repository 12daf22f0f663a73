"""GQA testdev-balanced (lmms-eval ``gqa``): compositional questions about scene images.

Files: lmms-lab/GQA keeps questions and images in two parts, ``testdev_balanced_instructions``
(rows name their image by ``imageId``) and ``testdev_balanced_images`` (parquet shards or
``save_to_disk`` folders, next to each other: :func:`read_gqa`); or LLaVA-1.5's
``llava_gqa_testdev_balanced.jsonl`` with ``data/images/``, the answers joined from
``testdev_balanced_questions.json``.  Scoring: lmms-eval ``tasks/gqa/gqa.yaml``
(:func:`~ficoco.evaluation.metrics.score_exact_match`).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..formats.files import (
    find_files,
    first_file,
    is_saved_dataset,
    read_json_file,
    split_of,
)
from ..formats.images import CellImage, ImageRef
from ..formats.llava import no_entry
from ..formats.tables import (
    ParquetFileSource,
    Source,
    TableSource,
    arrow_table_of,
    check_columns,
    parquet_sources,
    rows_to_drafts,
)
from ..metrics import ScoredRecord, score_exact_match
from ..records import (
    VQA_POST,
    BenchmarkDataError,
    Built,
    Record,
    Task,
    TaskSpec,
    as_text,
    finish_records,
    single_answer,
)

SPEC = TaskSpec("gqa", "lmms-lab/GQA", "testdev_balanced_instructions", "testdev", "", VQA_POST,
                ("id", "imageId", "question"), ("answer",), "vqa",
                llava_files=("llava_gqa_testdev_balanced.jsonl",), llava_image_dirs=("data/images", "images"))


def build_row(row, pre, post):
    q = as_text(row["question"])
    answer, answers = single_answer(row)
    return Built(as_text(row["id"]), f"{pre}{q}{post}", q, answer, answers)


# --------------------------------------------------------------------------------------------
# the two parts of lmms-lab/GQA


def _gqa_part(root: Path, config: str, fmt: str, split: str) -> tuple[list[Source], str]:
    """The instructions or images part of GQA: ``<config>/`` holding parquet shards or a
    ``save_to_disk`` folder, looked for in ``root``, next to it, or ``root`` itself."""
    if root.is_file():
        return [ParquetFileSource(root)], str(root)
    candidates = [root] if root.name == config else []
    candidates += [root / config, root.parent / config]
    for folder in candidates:
        if not folder.is_dir():
            continue
        if is_saved_dataset(folder):
            if (folder / "dataset_dict.json").is_file():
                info = read_json_file(folder / "dataset_dict.json")
                splits = list(info.get("splits", [])) if isinstance(info, dict) else []
                if split not in splits:
                    raise BenchmarkDataError(f"{folder} has no split {split!r}; splits: {', '.join(splits)}", folder)
                folder = folder / split
            return [TableSource(arrow_table_of(folder), str(folder), folder)], str(folder)
        if fmt == "parquet":
            files = find_files(folder, (".parquet",))
            if files:
                return parquet_sources(_gqa_split(files, folder, config, split)), str(folder)
    if fmt == "parquet":  # deeper, e.g. <root>/GQA/<config>/testdev-00000-of-00001.parquet
        files = [f for f in find_files(root, (".parquet",)) if config in f.relative_to(root).parts]
        if files:
            return parquet_sources(_gqa_split(files, root, config, split)), str(root)
    raise BenchmarkDataError(
        f"GQA needs the {config!r} part of lmms-lab/GQA in or next to {root}: not found", root)


def _gqa_split(files: list[Path], folder: Path, config: str, split: str) -> list[Path]:
    chosen = [f for f in files if split_of(f) == split]
    if chosen:
        return chosen
    if not any(split_of(f) for f in files):
        return files
    found = sorted({str(split_of(f)) for f in files})
    raise BenchmarkDataError(
        f"no GQA {config} parquet for split {split!r} under {folder}; splits found: {', '.join(found)}", folder)


def read_gqa(spec: TaskSpec, root: Path, fmt: str, split: str | None, limit: int | None,
             pre: str, post: str) -> list[Record]:
    wanted = split or spec.default_split
    instr_cfg = f"{wanted}_balanced_instructions"
    image_cfg = f"{wanted}_balanced_images"
    instructions, _ = _gqa_part(root, instr_cfg, fmt, wanted)
    image_root = root if root.is_dir() else root.parent
    if image_root.name == instr_cfg:
        image_root = image_root.parent
    image_sources, image_origin = _gqa_part(image_root, image_cfg, fmt, wanted)
    by_id: dict[str, ImageRef] = {}
    for source in image_sources:
        check_columns(spec, source, ["id", "image"])
        for row_index, row in source.iter_rows(["id"]):
            by_id[as_text(row["id"])] = CellImage(source, row_index, "image")

    def lookup(row: dict) -> tuple[ImageRef, ...]:
        ref = by_id.get(as_text(row.get("imageId")))
        if ref is None:
            raise BenchmarkDataError(
                f"gqa: sample {row.get('id')}: image {row.get('imageId')!r} is missing from {image_origin}",
                image_origin)
        return (ref,)

    drafts = rows_to_drafts(spec, instructions, build_row, split=wanted, category=None, limit=limit, pre=pre,
                            post=post, fmt=fmt, image_lookup=lookup)
    return finish_records(spec, drafts)


def join_llava(spec, drafts, qfile, folder, ann):
    name = "testdev_balanced_questions.json"
    ann = ann or first_file(qfile.parent / name, qfile.parent / "data" / name, folder.parent / name)
    if ann is None:
        return
    data = read_json_file(ann)
    if not isinstance(data, dict):
        raise BenchmarkDataError(f"{ann}: expected a JSON object keyed by question id (GQA questions file)", ann)
    for d in drafts:
        entry = data.get(d.raw_id)
        if not isinstance(entry, dict) or "answer" not in entry:
            raise no_entry(spec, d, ann, d.raw_id)
        d.answer = as_text(entry["answer"])
        d.answers = [d.answer]
        d.meta["fullAnswer"] = entry.get("fullAnswer")
        d.meta["types"] = entry.get("types")


def score_gqa(records: Iterable[ScoredRecord]) -> dict[str, Any]:
    """GQA testdev-balanced as lmms-eval ``gqa``."""
    return score_exact_match(records)


TASK = Task(SPEC, build_row, score_gqa, join_llava)
