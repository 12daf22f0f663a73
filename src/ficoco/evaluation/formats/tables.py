"""Rows of parquet files and Arrow tables (lmms-lab parquet shards, ``save_to_disk`` folders) and
the drafts a task's row builder makes of them.

Rows are read in batches without their image columns; an image cell is read only when its
image is decoded (:class:`~ficoco.evaluation.formats.images.CellImage`).
"""

from __future__ import annotations

import bisect
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from ..records import BenchmarkDataError, Built, Draft, TaskSpec
from .files import read_json_file
from .images import CellImage, ImageRef
from .videos import VideoFile


def _pyarrow():
    try:
        import pyarrow  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError as exc:  # pragma: no cover - pyarrow is installed where the tests run
        raise BenchmarkDataError("reading parquet or Arrow benchmark files needs pyarrow: pip install pyarrow") from exc
    import pyarrow as pa
    import pyarrow.parquet as pq

    return pa, pq


def _is_image_type(pa, dtype) -> bool:
    if pa.types.is_struct(dtype):
        names = {dtype.field(i).name for i in range(dtype.num_fields)}
        return {"bytes", "path"} <= names
    if pa.types.is_list(dtype) or pa.types.is_large_list(dtype) or pa.types.is_fixed_size_list(dtype):
        return _is_image_type(pa, dtype.value_type)
    return False


class Source:
    """Rows of one parquet file or Arrow table."""

    origin: str
    base_dir: Path | None
    names: list[str]
    image_columns: set[str]

    def iter_rows(self, columns: Sequence[str]) -> Iterator[tuple[int, dict]]:
        raise NotImplementedError

    def cell(self, row: int, column: str) -> Any:
        raise NotImplementedError

    def _classify(self, schema, image_column_hint: str = "image") -> None:
        pa, _ = _pyarrow()
        self.names = list(schema.names)
        self.image_columns = {f.name for f in schema if _is_image_type(pa, f.type)}
        if image_column_hint in self.names:  # also when it holds raw bytes or file paths
            self.image_columns.add(image_column_hint)


def _parquet_problem(path: Path, exc: Exception) -> BenchmarkDataError:
    try:
        with open(path, "rb") as fh:
            head = fh.read(64)
    except OSError:
        head = b""
    if head.startswith(b"version https://git-lfs"):
        return BenchmarkDataError(f"{path} is a Git LFS pointer, not the parquet data (fetch it with `git lfs pull`)",
                                  path)
    return BenchmarkDataError(f"{path} could not be read as parquet ({type(exc).__name__}: {exc})", path)


class ParquetFileSource(Source):
    def __init__(self, path: Path):
        pa, pq = _pyarrow()
        self.path = path
        self.origin = str(path)
        self.base_dir = path.parent
        self._lock = threading.Lock()
        self._cache: tuple[int, str, list] | None = None
        try:
            with open(path, "rb") as fh:
                meta = pq.ParquetFile(fh).metadata
                schema = meta.schema.to_arrow_schema()
                counts = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        except (pa.ArrowException, OSError) as exc:
            raise _parquet_problem(path, exc) from exc
        self.num_rows = sum(counts)
        self._starts = [0]
        for n in counts[:-1]:
            self._starts.append(self._starts[-1] + n)
        self._classify(schema)

    def iter_rows(self, columns):
        pa, pq = _pyarrow()
        offset = 0
        try:
            with open(self.path, "rb") as fh:
                for batch in pq.ParquetFile(fh).iter_batches(batch_size=1024, columns=list(columns)):
                    for row in batch.to_pylist():
                        yield offset, row
                        offset += 1
        except (pa.ArrowException, OSError) as exc:
            raise _parquet_problem(self.path, exc) from exc

    def cell(self, row, column):
        pa, pq = _pyarrow()
        group = bisect.bisect_right(self._starts, row) - 1
        with self._lock:
            if self._cache is None or self._cache[:2] != (group, column):
                try:
                    with open(self.path, "rb") as fh:
                        table = pq.ParquetFile(fh).read_row_group(group, columns=[column])
                except (pa.ArrowException, OSError) as exc:
                    raise _parquet_problem(self.path, exc) from exc
                self._cache = (group, column, table.column(0).to_pylist())
            return self._cache[2][row - self._starts[group]]


class TableSource(Source):
    def __init__(self, table, origin: str, base_dir: Path | None):
        self.table = table
        self.origin = origin
        self.base_dir = base_dir
        self.num_rows = table.num_rows
        self._classify(table.schema)

    def iter_rows(self, columns):
        offset = 0
        for batch in self.table.select(list(columns)).to_batches(max_chunksize=1024):
            for row in batch.to_pylist():
                yield offset, row
                offset += 1

    def cell(self, row, column):
        return self.table.column(column)[row].as_py()


def parquet_sources(files: list[Path]) -> list[Source]:
    return [ParquetFileSource(f) for f in files]


# --------------------------------------------------------------------------------------------
# hf_disk (``save_to_disk`` folders)


def arrow_table_of(folder: Path):
    """The pyarrow Table of one saved ``Dataset`` folder."""
    pa, _ = _pyarrow()
    try:
        import datasets  # type: ignore
    except ImportError:
        datasets = None
    if datasets is not None:
        try:
            ds = datasets.load_from_disk(str(folder))
        except Exception as exc:  # datasets raises many types here; report them all the same way
            raise BenchmarkDataError(f"{folder} could not be loaded with datasets.load_from_disk ({exc})",
                                     folder) from exc
        if not isinstance(ds, datasets.Dataset):
            raise BenchmarkDataError(f"{folder} is not a single saved Dataset", folder)
        table = ds.data.table
        if getattr(ds, "_indices", None) is not None:
            table = table.take(ds._indices.column(0))
        return table
    state_path = folder / "state.json"
    state = read_json_file(state_path)
    try:
        names = [entry["filename"] for entry in state["_data_files"]]
    except (KeyError, TypeError) as exc:
        raise BenchmarkDataError(f"{state_path} has no '_data_files' list of {{'filename': ...}}", state_path) from exc
    tables = []
    for name in names:
        arrow_path = folder / name
        if not arrow_path.is_file():
            raise BenchmarkDataError(f"{arrow_path} (listed in {state_path}) does not exist", arrow_path)
        try:
            tables.append(pa.ipc.open_stream(pa.memory_map(str(arrow_path))).read_all())
        except (pa.ArrowException, OSError) as exc:
            raise BenchmarkDataError(f"{arrow_path} could not be read as an Arrow stream ({exc})", arrow_path) from exc
    if not tables:
        raise BenchmarkDataError(f"{state_path} lists no data files", state_path)
    try:
        return pa.concat_tables(tables)
    except pa.ArrowException as exc:
        raise BenchmarkDataError(f"the data files of {folder} do not share one schema ({exc})", folder) from exc


def hf_disk_sources(spec: TaskSpec, root: Path, split: str | None) -> tuple[list[Source], str, str | None]:
    wanted = split or spec.default_split
    if (root / "dataset_dict.json").is_file():
        info = read_json_file(root / "dataset_dict.json")
        splits = list(info.get("splits", [])) if isinstance(info, dict) else []
        category = None
        chosen = wanted
        if wanted not in splits:
            if wanted in spec.category_splits and spec.default_split in splits:
                chosen, category = spec.default_split, wanted
            else:
                raise BenchmarkDataError(
                    f"{root} has no split {wanted!r}; splits: {', '.join(splits) or 'none'}", root)
        folder = root / chosen
        return [TableSource(arrow_table_of(folder), str(folder), folder)], chosen, category
    category = wanted if wanted in spec.category_splits else None
    return [TableSource(arrow_table_of(root), str(root), root)], wanted, category


# --------------------------------------------------------------------------------------------
# rows into drafts


def check_columns(spec: TaskSpec, source: Source, needed: Sequence[str]) -> None:
    missing = [c for c in needed if c not in source.names]
    if missing:
        raise BenchmarkDataError(
            f"{source.origin}: column {missing[0]!r} required by {spec.name} is missing"
            + (f" (also missing: {', '.join(missing[1:])})" if len(missing) > 1 else "")
            + f"; columns found: {', '.join(source.names)}", source.origin)


def rows_to_drafts(spec: TaskSpec, sources: list[Source], build: Callable[[dict, str, str], Built], *, split: str,
                   category: str | None, limit: int | None, pre: str, post: str, fmt: str,
                   image_lookup: Callable[[dict], tuple[ImageRef, ...]] | None = None,
                   video_lookup: Callable[[Source, tuple[str, ...]], tuple[VideoFile, ...]] | None = None,
                   ) -> list[Draft]:
    """The drafts of the rows of ``sources`` (``limit`` at most; only those whose ``category`` is
    ``category`` where it is given), each built by the task's ``build(row, pre, post)``; its images
    are the row's image cells (those the builder names in ``image_columns``, else all of them), or
    ``image_lookup(row)`` where they are in another table (GQA); its videos are
    ``video_lookup(source, names)`` of the names the builder gives (video benchmarks)."""
    needed = list(spec.required_columns)
    if split == spec.default_split:
        needed += [c for c in spec.answer_columns if c not in needed]
    if category is not None and "category" not in needed:
        needed.append("category")
    if image_lookup is not None:
        needed = [c for c in needed if c != "image"]
    drafts: list[Draft] = []
    running = 0
    for source in sources:
        check_columns(spec, source, needed)
        columns = [c for c in source.names if c not in source.image_columns]
        images = [c for c in source.names if c in source.image_columns]
        for row_index, row in source.iter_rows(columns):
            if limit is not None and len(drafts) >= limit:
                return drafts
            global_index = running + row_index
            if category is not None and row.get("category") != category:
                continue
            try:
                built = build(row, pre, post)
            except BenchmarkDataError as exc:
                raise BenchmarkDataError(f"{source.origin} row {row_index}: {exc}", source.origin) from exc
            own = images if built.image_columns is None else [c for c in built.image_columns if c in images]
            refs = image_lookup(row) if image_lookup else tuple(CellImage(source, row_index, c) for c in own)
            if built.video_names and video_lookup is None:
                raise BenchmarkDataError(f"{spec.name}: {source.origin} row {row_index} names videos but the task "
                                         f"has no video folders", source.origin)
            videos = video_lookup(source, built.video_names) if built.video_names else ()
            meta = {k: v for k, v in row.items()}
            meta.update(format=fmt, file=source.origin, row=row_index, split=split, raw_question=built.raw_question)
            raw_id = built.raw_id if built.raw_id is not None else str(global_index)
            drafts.append(Draft(raw_id, built.question, built.answer, built.answers, built.options,
                                built.category, meta, refs, videos))
        running += getattr(source, "num_rows", 0)
    return drafts
