"""Finding and opening benchmark files: the parquet shards of a split and config, ``save_to_disk``
folders, LLaVA question files, JSON and JSONL files.

Files are looked for, never downloaded; a file that cannot be read raises
:class:`BenchmarkDataError` naming it.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..records import BenchmarkDataError, TaskSpec

# --------------------------------------------------------------------------------------------
# parquet shards by split and config


_SHARD = re.compile(r"^(?P<split>.+?)-\d{5}-of-\d{5}(?:-[0-9a-fA-F]+)?$")
_KNOWN_SPLITS = frozenset({"train", "validation", "val", "test", "testdev", "dev", "adversarial", "popular", "random"})


def find_files(root: Path, suffixes: tuple[str, ...], max_depth: int = 4) -> list[Path]:
    """Files under ``root`` (hidden folders skipped, at most ``max_depth`` levels down), sorted."""
    found: list[Path] = []

    def walk(folder: Path, depth: int) -> None:
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            return
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                if depth < max_depth:
                    walk(Path(entry.path), depth + 1)
            elif entry.name.lower().endswith(suffixes):
                found.append(Path(entry.path))

    walk(root, 1)
    return found


def split_of(path: Path) -> str | None:
    stem = path.name[: -len(".parquet")] if path.name.lower().endswith(".parquet") else path.stem
    match = _SHARD.match(stem)
    if match:
        return match.group("split")
    if stem.isdigit():  # refs/convert/parquet layout: <config>/<split>/0000.parquet
        return path.parent.name
    return stem if stem in _KNOWN_SPLITS else None


def _config_parts(path: Path, root: Path) -> set[str]:
    parts = set(path.parent.relative_to(root).parts) if path != root else set()
    parts.add(root.name if root.is_dir() else root.parent.name)
    return parts


def _restrict_config(files: list[Path], root: Path, config: str | None, others: tuple[str, ...]) -> list[Path]:
    if config is None:
        return files
    hits = [f for f in files if config in _config_parts(f, root)]
    if hits:
        return hits
    wrong = sorted({o for f in files for o in others if o in _config_parts(f, root)})
    if wrong:
        raise BenchmarkDataError(
            f"{root} holds config(s) {', '.join(wrong)} of the dataset, not {config!r}", root)
    return files


@dataclass
class _Selection:
    files: list[Path]
    split: str
    category: str | None  # keep only rows whose ``category`` equals this


def select_parquet(spec: TaskSpec, root: Path, split: str | None, config: str | None) -> _Selection:
    wanted = split or spec.default_split
    if root.is_file():
        own = split_of(root)
        category = wanted if (wanted in spec.category_splits and own != wanted) else None
        if split is not None and own is not None and own != split and category is None:
            raise BenchmarkDataError(f"{root} holds split {own!r}, not {split!r}", root)
        return _Selection([root], own or wanted, category)
    files = find_files(root, (".parquet",))
    if not files:
        raise BenchmarkDataError(f"no .parquet files under {root}", root)
    files = _restrict_config(files, root, config, spec.other_configs)
    by_split: dict[str | None, list[Path]] = {}
    for f in files:
        by_split.setdefault(split_of(f), []).append(f)
    if wanted in by_split:
        return _Selection(by_split[wanted], wanted, None)
    if wanted in spec.category_splits and spec.default_split in by_split:
        return _Selection(by_split[spec.default_split], spec.default_split, wanted)
    if list(by_split) == [None] and split is None:
        return _Selection(files, wanted, None)
    found = sorted(str(s) for s in by_split if s is not None)
    raise BenchmarkDataError(
        f"no parquet files for split {wanted!r} under {root}; splits found: {', '.join(found) or 'none'}", root)


# --------------------------------------------------------------------------------------------
# save_to_disk folders, question files


def is_saved_dataset(folder: Path) -> bool:
    return (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()


def llava_question_file(spec: TaskSpec, folder: Path) -> Path | None:
    for name in spec.llava_files:
        if (folder / name).is_file():
            return folder / name
    return None


def first_file(*candidates: Path) -> Path | None:
    return next((c for c in candidates if c.is_file()), None)


# --------------------------------------------------------------------------------------------
# JSON and JSONL


def read_json_file(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as exc:
        raise BenchmarkDataError(f"{path}: line {exc.lineno}: not valid JSON ({exc.msg})", path) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise BenchmarkDataError(f"{path} could not be read ({exc})", path) from exc


def read_jsonl(path: Path) -> list[tuple[int, dict]]:
    rows = []
    try:
        with open(path, encoding="utf-8") as fh:
            for line_no, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise BenchmarkDataError(f"{path}: line {line_no}: not valid JSON ({exc.msg})", path) from exc
                if not isinstance(obj, dict):
                    raise BenchmarkDataError(f"{path}: line {line_no}: expected a JSON object, got "
                                             f"{type(obj).__name__}", path)
                rows.append((line_no, obj))
    except (OSError, UnicodeDecodeError) as exc:
        raise BenchmarkDataError(f"{path} could not be read ({exc})", path) from exc
    return rows


def require_keys(path: Path, where: str, obj: dict, keys: Sequence[str]) -> None:
    for key in keys:
        if key not in obj:
            raise BenchmarkDataError(f"{path}: {where}: key {key!r} is missing; keys found: "
                                     f"{', '.join(obj) or 'none'}", path)
