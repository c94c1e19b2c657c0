"""Manifest source: a CSV or Parquet table of images and (optionally) cell coordinates."""

from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa

from cytostore.errors import InputError
from cytostore.keys import box_cell_id, check_id, position_cell_id
from cytostore.sources.base import CellRecord, ImageTask, SourceFailure, SourceItem, SourceOptions, safe_slide_id

KNOWN = {"image", "slide_id", "cell_id", "x", "y", "x0", "y0", "x1", "y1", "label", "slide_label"}


def read_table(path: Path) -> pa.Table:
    """Reads a CSV, TSV or Parquet file into Arrow, with a clear error when it can't."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path)
        if suffix in {".csv", ".tsv", ".txt"}:
            from pyarrow import csv

            parse = csv.ParseOptions(delimiter="\t" if suffix == ".tsv" else ",")
            return csv.read_csv(path, parse_options=parse)
    except (pa.ArrowInvalid, OSError) as e:
        raise InputError(f"{path}: cannot be read as a table ({e})") from e
    raise InputError(f"{path}: unknown table format {suffix!r}; use .csv, .tsv or .parquet")


def _num(value: Any) -> float | None:
    if value is None or value == "":
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{value!r} is not a number") from None
    if not math.isfinite(out):
        raise InputError(f"{value!r} is not a finite number")
    return out


class ManifestSource:
    """Rows of ``image, slide_id`` with optional ``cell_id``, ``x,y`` or ``x0,y0,x1,y1``,
    ``label``, ``slide_label`` and extra columns (kept as columns of the cell table).

    A row with no coordinates means the image itself is the cell crop.
    """

    def __init__(self, path: str | Path, options: SourceOptions = SourceOptions()):
        self.path = Path(path)
        self.options = options
        table = read_table(self.path)
        missing = {"image"} - set(table.column_names)
        if missing:
            raise InputError(f"{self.path}: needs an 'image' column; it has {table.column_names}")
        if "slide_id" not in table.column_names and options.slide_id is None:
            raise InputError(f"{self.path}: needs a 'slide_id' column (or pass --slide-id)")
        extra = [f for f in table.schema if f.name not in KNOWN]
        self.extra_schema = pa.schema(
            [pa.field(f.name, pa.string() if pa.types.is_null(f.type) else f.type) for f in extra]
        )
        self._n_rows = table.num_rows
        self._row_label = "line" if self.path.suffix.lower() != ".parquet" else "row"

    def __len__(self) -> int:
        return self._n_rows

    def _where(self, i: int) -> str:
        # CSV: line numbers as an editor shows them (header is line 1).
        n = i + 2 if self._row_label == "line" else i + 1
        return f"{self.path}:{self._row_label} {n}"

    def __iter__(self) -> Iterator[SourceItem]:
        rows = read_table(self.path).to_pylist()
        groups: OrderedDict[tuple[str, str], list[CellRecord]] = OrderedDict()
        slide_labels: dict[tuple[str, str], str | None] = {}
        slide_images: dict[str, set[str]] = {}
        parsed: list[tuple[int, dict[str, Any], str, str]] = []
        for i, row in enumerate(rows):
            where = self._where(i)
            try:
                image = str(row.get("image") or "").strip()
                if not image:
                    raise InputError("the 'image' cell is empty")
                img_path = Path(image) if Path(image).is_absolute() else self.path.parent / image
                slide_id = safe_slide_id(row.get("slide_id", self.options.slide_id) or self.options.slide_id, where)
            except InputError as e:
                yield SourceFailure(where, str(e))
                continue
            parsed.append((i, row, str(img_path), slide_id))
            slide_images.setdefault(slide_id, set()).add(str(img_path))
        seen: set[tuple[str, str]] = set()
        for i, row, image, slide_id in parsed:
            where = self._where(i)
            try:
                rec = self._record(row, image, slide_id, len(slide_images[slide_id]) > 1, where)
            except InputError as e:
                yield SourceFailure(where, f"{e}; fix or remove the row", slide_id=slide_id)
                continue
            key = (rec.slide_id, rec.cell_id)
            if key in seen:
                yield SourceFailure(where, f"duplicate key slide_id={rec.slide_id!r} cell_id={rec.cell_id!r}; the first row was kept",
                                    slide_id=rec.slide_id, cell_id=rec.cell_id)
                continue
            seen.add(key)
            gk = (image, slide_id)
            groups.setdefault(gk, []).append(rec)
            if row.get("slide_label") not in (None, ""):
                slide_labels[gk] = str(row["slide_label"])
        for (image, slide_id), cells in groups.items():
            yield ImageTask(image=image, slide_id=slide_id, cells=cells, slide_label=slide_labels.get((image, slide_id)),
                            source_ref=str(self.path))

    def _record(self, row: dict[str, Any], image: str, slide_id: str, multi_image: bool, where: str) -> CellRecord:
        x, y = _num(row.get("x")), _num(row.get("y"))
        box_vals = [_num(row.get(k)) for k in ("x0", "y0", "x1", "y1")]
        box = None
        if all(v is not None for v in box_vals):
            box = tuple(box_vals)  # type: ignore[assignment]
            if box[2] <= box[0] or box[3] <= box[1]:
                raise InputError(f"box ({box[0]}, {box[1]}, {box[2]}, {box[3]}) is empty or inverted")
            if x is None or y is None:
                x, y = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        elif any(v is not None for v in box_vals):
            raise InputError("a box needs all four of x0, y0, x1, y1")
        if (x is None) != (y is None):
            raise InputError("a centre needs both x and y")
        stem = Path(image).stem
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
