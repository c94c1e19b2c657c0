"""Manifest source: a CSV or Parquet table of images and (optionally) cell coordinates,
streamed in row chunks so that memory stays flat in the number of rows."""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cytostore import limits
from cytostore.errors import InputError
from cytostore.keys import DUPLICATE, KeySet, box_cell_id, cell_key_hash, check_id, position_cell_id
from cytostore.sources.base import (CONTINUED, CellRecord, ImageTask, SourceFailure, SourceItem, SourceOptions,
                                    finite_number)
from cytostore.sources.tables import CHUNK_ROWS, TableStream, read_table

KNOWN = {"image", "slide_id", "cell_id", "x", "y", "x0", "y0", "x1", "y1", "label", "slide_label"}
TEXT_COLUMNS = ("label", "slide_label")  # read from a CSV as text, never as numbers
GROUP_MAX = 1024  # most rows of one image gathered into one task (planning splits it further)

__all__ = ["KNOWN", "ManifestSource", "read_table"]


def _num(value: Any) -> float | None:
    if value is None or value == "":
        return None
    return finite_number(value)


def _text(value: Any) -> Any:
    """A cell read as bytes (a column with bytes that are not UTF-8) as text, or None when it is not UTF-8."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return None
    return value


def _text_column(arr: pa.Array) -> tuple[pa.Array, pa.Array | None]:
    """A column as text, and (for a binary column) the mask of cells that are not UTF-8."""
    if not (pa.types.is_binary(arr.type) or pa.types.is_large_binary(arr.type)):
        return arr, None
    values = arr.to_pylist()
    text = [_text(v) for v in values]
    return pa.array(text, pa.string()), pa.array([v is not None and t is None for v, t in zip(values, text)])


def _slide_id(value: Any) -> str:
    """check_id for a row's slide id; the failure already names the file and line."""
    try:
        return check_id(value, "slide_id")
    except InputError as e:
        raise InputError(f"{e}; fix the id in the source") from e


class ManifestSource:
    """Rows of ``image, slide_id`` with optional ``cell_id``, ``x,y`` or ``x0,y0,x1,y1``,
    ``label``, ``slide_label`` and extra columns (kept as columns of the cell table).

    A row with no coordinates means the image itself is the cell crop. Image paths
    are made absolute against the manifest's folder. A CSV is read as UTF-8 text
    (``options.encoding`` names another encoding, e.g. ``latin1``); a row with a
    cell that is not valid text in it becomes a failure naming the column, never
    text spelled from its bytes. Rows are read in chunks of
    ``chunk_rows``; ``shard(i, n)`` reads only chunks i, i+n, ... A slide's cell ids
    carry the image's stem when the slide spans several images, which one streaming
    pass (``prepare``) finds, holding one entry per slide.
    """

    chunk_rows = CHUNK_ROWS

    def __init__(self, path: str | Path, options: SourceOptions = SourceOptions()):
        self.path = Path(os.path.abspath(path))
        self.options = options
        # Labels are text ("007" stays "007"); ids keep the types they were always read with, so the
        # keys of stores written before are unchanged.
        self.table = TableStream(self.path, encoding=options.encoding, text_columns=TEXT_COLUMNS)
        names = self.table.schema.names
        for k, name in enumerate(names):  # refused before anything is read further, or written
            if not name.strip():
                raise InputError(f"{self.path}: column #{k + 1} has an empty name; name it or delete it")
            if len(name) > limits.MAX_COLUMN_NAME_LENGTH:
                raise InputError(f"{self.path}: column #{k + 1} has a name of {len(name)} characters; at most "
                                 f"{limits.MAX_COLUMN_NAME_LENGTH} (cytostore.limits.MAX_COLUMN_NAME_LENGTH)")
            if name in names[:k]:
                raise InputError(f"{self.path}: columns #{names.index(name) + 1} and #{k + 1} are both named "
                                 f"{name!r}; rename one")
        if "image" not in names:
            raise InputError(f"{self.path}: needs an 'image' column; it has {names}")
        if "slide_id" not in names and options.slide_id is None:
            raise InputError(f"{self.path}: needs a 'slide_id' column (or pass --slide-id)")
        self._row_label = "line" if not self.table.parquet else "row"
        self._dir = str(self.path.parent)
        self._where_prefix = f"{self.path}:{self._row_label} "
        self._line0 = 2 if self._row_label == "line" else 1
        self._has_box = bool({"x0", "y0", "x1", "y1"} & set(names))
        self._slides: dict[str, str | None] | None = None  # slide id -> its image, None when several
        self.shard_index, self.shard_count = 0, 1

    @property
    def extra_schema(self) -> pa.Schema:
        """Arrow schema of the extra columns kept (settled over the whole file)."""
        extra = [f for f in self.table.settle() if f.name not in KNOWN]
        return pa.schema([pa.field(f.name, pa.string() if pa.types.is_null(f.type) or self._is_text(f) else f.type)
                          for f in extra])

    def _is_text(self, field: pa.Field) -> bool:
        """Whether a binary column holds text (every CSV column, and the known columns of a Parquet file)."""
        binary = pa.types.is_binary(field.type) or pa.types.is_large_binary(field.type)
        return binary and (not self.table.parquet or field.name in KNOWN)

    def __len__(self) -> int:
        self.table.settle()
        return int(self.table.num_rows or 0)

    def prepare(self) -> None:
        """Runs the one pass over the whole file (types, slides spanning several images), once.

        Call it in the process that opened the source: its result travels with the
        source to the workers, which then read only their own chunks.
        """
        if self._slides is None:
            self._slides = self._scan_slides()

    def shard(self, index: int, count: int) -> ManifestSource:
        """The part of this source that worker ``index`` of ``count`` plans: chunks index, index+count, ..."""
        self.prepare()
        part = copy.copy(self)
        part.shard_index, part.shard_count = index, count
        return part

    def _where(self, i: int) -> str:
        # CSV: line numbers as an editor shows them (header is line 1).
        return f"{self._where_prefix}{i + self._line0}"

    def _image_path(self, raw: str) -> str:
        return os.path.normpath(os.path.join(self._dir, raw))

    def _slide_value(self, raw: Any) -> Any:
        return raw or self.options.slide_id

    def _scan_slides(self) -> dict[str, str | None]:
        has_slide = "slide_id" in self.table.schema.names
        slides: dict[str, str | None] = {}
        for batch in self.table.batches(["image", "slide_id"] if has_slide else ["image"]):
            image, bad_image = _text_column(batch.column("image"))
            image = pc.utf8_trim_whitespace(pc.cast(image, pa.string()))
            sid, bad_slide = _text_column(batch.column("slide_id")) if has_slide else (pa.nulls(batch.num_rows), None)
            t = pa.table({"s": sid, "i": image})
            keep = pc.and_(pc.is_valid(t["i"]), pc.not_equal(t["i"], ""))
            for bad in (bad_image, bad_slide):  # rows that are not text become failures, not slides
                keep = keep if bad is None else pc.and_(keep, pc.invert(bad))
            t = t.filter(keep)
            g = t.group_by("s", use_threads=False).aggregate([("i", "min"), ("i", "max")])
            for s, lo, hi in zip(g["s"].to_pylist(), g["i_min"].to_pylist(), g["i_max"].to_pylist()):
                try:
                    slide = check_id(self._slide_value(s))
                except InputError:
                    continue  # its rows become failures
                if slides.get(slide, "") is None:
                    continue  # already known to span several images
                images = {self._image_path(lo), self._image_path(hi)}
                if lo != hi and len(images) == 1:  # spelled differently: look at every spelling
                    rows = t.filter(pc.is_null(t["s"]) if s is None else pc.equal(t["s"], pa.scalar(s, t["s"].type)))
                    images = {self._image_path(v) for v in pc.unique(rows["i"]).to_pylist()}
                if len(images) > 1 or slides.setdefault(slide, next(iter(images))) != next(iter(images)):
                    slides[slide] = None
        return slides

    def _key_of(self, image_raw: Any, slide_raw: Any) -> tuple[str, str] | None:
        """(image path, slide id) of a row, or None when either is unusable."""
        image = str(_text(image_raw) or "").strip()
        if not image:
            return None
        try:
            return self._image_path(image), check_id(self._slide_value(_text(slide_raw)))
        except InputError:
            return None

    def __iter__(self) -> Iterator[SourceItem]:
        self.prepare()
        # Repeated keys are found here when this source is read whole; a shard
        # cannot see the other shards, so the ingest checks its keys across workers.
        keys = KeySet() if self.shard_count == 1 else None
        has_slide = "slide_id" in self.table.schema.names
        carry: dict[tuple[str, str], _Group] = {}
        prev_key: tuple[str, str] | None = None
        for k, first, chunk in self.table.chunks(self.chunk_rows):
            if k % self.shard_count != self.shard_index:
                last_slide = chunk.column("slide_id")[-1].as_py() if has_slide else None
                prev_key = self._key_of(chunk.column("image")[-1].as_py(), last_slide)
                continue  # (a shard carries no group over: its chunks are not adjacent)
            groups, prev_key = yield from self._chunk(chunk, first, keys, carry, prev_key)
            last = groups.get(prev_key) if self.shard_count == 1 and prev_key else None
            carry = {prev_key: last} if last is not None else {}
            yield from (g.task(self.path) for key, g in groups.items() if g is not last)
        yield from (g.task(self.path) for g in carry.values())

    def _chunk(self, chunk: pa.RecordBatch, first: int, keys: KeySet | None, carry: dict,
               prev_key: tuple[str, str] | None):
        """Turns one chunk into failures (yielded) and groups of records per image (returned)."""
        accepted: list[tuple[CellRecord, tuple[str, str], Any]] = []
        keys_of_rows: list[tuple[str, str] | None] = []
        paths: dict[Any, tuple[str, str]] = {}  # raw image cell -> (absolute path, stem)
        slides: dict[Any, str] = {}  # raw slide cell -> checked slide id
        binary = [f.name for f in chunk.schema if self._is_text(f)]
        for j, row in enumerate(chunk.to_pylist()):
            where = self._where(first + j)
            try:
                self._decode(row, binary)
                raw = row.get("image")
                if raw not in paths:
                    image = str(raw or "").strip()
                    if not image:
                        raise InputError("the 'image' cell is empty")
                    image = self._image_path(image)
                    paths[raw] = (image, os.path.splitext(os.path.basename(image))[0])
                image, stem = paths[raw]
                raw_slide = row.get("slide_id")
                slide_id = slides.get(raw_slide) or slides.setdefault(
                    raw_slide, _slide_id(self._slide_value(raw_slide)))
            except InputError as e:
                keys_of_rows.append(None)
                yield SourceFailure(where, str(e))
                continue
            key = (image, slide_id)
            keys_of_rows.append(key)
            try:
                rec = self._record(row, stem, slide_id, self._slides.get(slide_id, "") is None, where)
            except InputError as e:
                yield SourceFailure(where, f"{e}; fix or remove the row", slide_id=slide_id)
                continue
            accepted.append((rec, key, j))
        if keys is not None and accepted:
            uids = np.fromiter((r.uid for r, _, _ in accepted), dtype=np.int64, count=len(accepted))
            hashes = np.fromiter((cell_key_hash(r.slide_id, r.cell_id) for r, _, _ in accepted),
                                 dtype=np.int64, count=len(accepted))
            verdict = keys.classify(uids, hashes)
            for (rec, _, _), v in zip(accepted, verdict):
                if v == DUPLICATE:
                    yield SourceFailure(rec.source_ref, f"duplicate key slide_id={rec.slide_id!r} "
                                        f"cell_id={rec.cell_id!r}; the first row was kept",
                                        slide_id=rec.slide_id, cell_id=rec.cell_id)
            accepted = [a for a, v in zip(accepted, verdict) if v != DUPLICATE]
        groups: dict[tuple[str, str], _Group] = dict(carry)
        labels = chunk.column("slide_label").to_pylist() if "slide_label" in chunk.schema.names else None
        for rec, key, j in accepted:
            g = groups.get(key)
            if g is None or len(g.cells) >= GROUP_MAX:
                if g is not None:
                    yield g.task(self.path)
                before = keys_of_rows[j - 1] if j else prev_key
                g = groups[key] = _Group(key, continued=before == key or g is not None)
            g.cells.append(rec)
            if labels is not None and labels[j] not in (None, ""):
                g.label = str(labels[j])
        return groups, keys_of_rows[-1] if keys_of_rows else prev_key

    def _decode(self, row: dict[str, Any], columns: list[str]) -> None:
        """Turns the bytes of ``columns`` into text in place; InputError naming the first that is not text."""
        for name in columns:
            value = row.get(name)
            if isinstance(value, bytes):
                try:
                    row[name] = value.decode("utf-8")
                except UnicodeDecodeError as e:
                    pos = self.table.schema.names.index(name) + 1
                    raise InputError(
                        f"column {name!r} (#{pos}) is not {self.options.encoding} text: byte "
                        f"0x{value[e.start]:02x} at {e.start} of {value[:60]!r}; save the file as UTF-8, or read "
                        "it with its encoding (SourceOptions(encoding='latin1'), for instance)") from None

    def _record(self, row: dict[str, Any], stem: str, slide_id: str, multi_image: bool, where: str) -> CellRecord:
        x, y = _num(row.get("x")), _num(row.get("y"))
        box = self._box(row) if self._has_box else None
        if box is not None and (x is None or y is None):
            x, y = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        if (x is None) != (y is None):
            raise InputError("a centre needs both x and y")
        cell_id = row.get("cell_id")
        if cell_id in (None, ""):
            prefix = stem if multi_image else None
            if box is not None:
                cell_id = box_cell_id(box, prefix)
            elif x is not None:
                cell_id = position_cell_id(x, y, prefix)
            else:
                cell_id = stem
        cell_id = check_id(cell_id, "cell_id")
        label = row.get("label")
        extra = {k: v for k, v in row.items() if k not in KNOWN}
        return CellRecord(slide_id=slide_id, cell_id=cell_id, x=x, y=y, box=box,
                          label=None if label in (None, "") else str(label), source_ref=where, extra=extra)


    @staticmethod
    def _box(row: dict[str, Any]) -> tuple[float, float, float, float] | None:
        vals = [_num(row.get(k)) for k in ("x0", "y0", "x1", "y1")]
        if all(v is not None for v in vals):
            box = tuple(vals)
            if box[2] <= box[0] or box[3] <= box[1]:
                raise InputError(f"box ({box[0]}, {box[1]}, {box[2]}, {box[3]}) is empty or inverted")
            return box  # type: ignore[return-value]
        if any(v is not None for v in vals):
            raise InputError("a box needs all four of x0, y0, x1, y1")
        return None


class _Group:
    """Rows of one image (and slide) gathered into one task."""

    __slots__ = ("key", "cells", "label", "continued")

    def __init__(self, key: tuple[str, str], continued: bool):
        self.key, self.continued = key, continued
        self.cells: list[CellRecord] = []
        self.label: str | None = None

    def task(self, path: Path) -> ImageTask:
        ref = str(path) + (CONTINUED if self.continued else "")
        return ImageTask(image=self.key[0], slide_id=self.key[1], cells=self.cells, slide_label=self.label,
                         source_ref=ref)
