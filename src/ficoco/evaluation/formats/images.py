"""Images of benchmark samples, decoded only when
:meth:`~ficoco.evaluation.records.Record.image` asks for them.

A reference says where an image is (a file, a base64 text, a parquet or Arrow cell) and decodes it
as RGB; a missing or corrupt image raises :class:`BenchmarkDataError` naming the sample and where
the image was looked for.
"""

from __future__ import annotations

import base64
import binascii
import io
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from PIL import Image, UnidentifiedImageError

from ..records import BenchmarkDataError

if TYPE_CHECKING:
    from .tables import Source


def decode_image(data: bytes | None, path: Path | None, task: str, sample_id: str, origin: str) -> Image.Image:
    if data is None:
        if path is None:
            raise BenchmarkDataError(f"{task}: sample {sample_id} has no image ({origin})")
        if not path.is_file():
            raise BenchmarkDataError(f"{task}: sample {sample_id}: image file not found: {path}", path)
        source: Any = path
    else:
        source = io.BytesIO(data)
    try:
        with Image.open(source) as img:
            img.load()
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise BenchmarkDataError(
            f"{task}: sample {sample_id}: image {origin} is corrupt or not an image ({exc})",
            path if data is None else None) from exc


class ImageRef:
    """Where an image of a sample is: :meth:`load` decodes it (a list: an Arrow cell may hold
    several frames), :meth:`describe` says where it is."""

    def load(self, task: str, sample_id: str) -> list[Image.Image]:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError


class FileImage(ImageRef):
    __slots__ = ("path",)

    def __init__(self, path: Path):
        self.path = path

    def load(self, task, sample_id):
        return [decode_image(None, self.path, task, sample_id, str(self.path))]

    def describe(self):
        return str(self.path)


class Base64Image(ImageRef):
    __slots__ = ("text", "origin")

    def __init__(self, text: str, origin: str):
        self.text = text
        self.origin = origin

    def load(self, task, sample_id):
        try:
            data = base64.b64decode(self.text, validate=False)
        except (binascii.Error, ValueError) as exc:
            raise BenchmarkDataError(
                f"{task}: sample {sample_id}: image {self.origin} is not valid base64 ({exc})") from exc
        return [decode_image(data, None, task, sample_id, self.origin)]

    def describe(self):
        return self.origin


class CellImage(ImageRef):
    """An image cell of a parquet file or Arrow table, read when needed."""

    __slots__ = ("source", "row", "column")

    def __init__(self, source: "Source", row: int, column: str):
        self.source = source
        self.row = row
        self.column = column

    def describe(self):
        return f"{self.source.origin} row {self.row} column {self.column!r}"

    def load(self, task, sample_id):
        value = self.source.cell(self.row, self.column)
        values = value if isinstance(value, list) else [value]
        if not values:
            raise BenchmarkDataError(f"{task}: sample {sample_id} has no image ({self.describe()})",
                                     self.source.origin)
        return [self._one(v, task, sample_id) for v in values]

    def _one(self, value: Any, task: str, sample_id: str) -> Image.Image:
        origin = self.describe()
        if isinstance(value, Mapping):  # the Hugging Face Image feature: {"bytes": ..., "path": ...}
            data, path = value.get("bytes"), value.get("path")
        elif isinstance(value, (bytes, bytearray)):
            data, path = bytes(value), None
        elif isinstance(value, str):
            data, path = None, value
        else:
            data, path = None, None
        resolved = None
        if data is None and path:
            resolved = Path(path)
            if not resolved.is_absolute() and self.source.base_dir is not None:
                resolved = self.source.base_dir / resolved
        return decode_image(data, resolved, task, sample_id, origin)
