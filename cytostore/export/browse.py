"""What a store holds, slide by slide: the slide list and one slide's cells."""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Sequence

import pyarrow as pa
import pyarrow.compute as pc

from cytostore.errors import InputError, StoreError
from cytostore.export._common import HEAVY, as_store, slide_filter
from cytostore.store import CellStore
from cytostore.store.check import readable


def list_slides(store: CellStore | str | Path, encoder: str | None = None) -> dict[str, Any]:
    """Every slide of a cell table: cells, label counts, slide label, images, failures.

    Returns:
        ``{"table", "table_version", "slides": [{slide_id, cells, labels, slide_label,
        slide_labels, images, failures}]}``, slides sorted by id. ``slide_label`` is the
        slide's label when its cells agree on one (``slide_labels`` lists every value).
    """
    s = as_store(store)
    table = s.resolve(encoder)
    ds = s.dataset(table)
    t = ds.to_table(columns=["slide_id", "label", "slide_label", "image"])
    cells: Counter = Counter()
    labels: dict[str, Counter] = defaultdict(Counter)
    slide_labels: dict[str, set] = defaultdict(set)
    images: dict[str, set] = defaultdict(set)
    for batch in t.to_batches():
        for sid, lab, slab, img in zip(*(batch.column(c).to_pylist() for c in t.column_names)):
            cells[sid] += 1
            if lab is not None:
                labels[sid][lab] += 1
            if slab is not None:
                slide_labels[sid].add(slab)
            images[sid].add(img)
    fails: Counter = Counter()
    f = s.failures()
    if f.num_rows:
        mine = f.filter(pc.equal(f.column("table"), table))
        fails.update(v for v in mine.column("slide_id").to_pylist() if v is not None)
    rows = []
    for sid in sorted(cells):
        sl = sorted(slide_labels[sid])
        rows.append({"slide_id": sid, "cells": cells[sid],
                     "labels": dict(sorted(labels[sid].items(), key=lambda kv: (-kv[1], kv[0]))),
                     "slide_label": sl[0] if len(sl) == 1 else None, "slide_labels": sl,
                     "images": sorted(images[sid]), "failures": fails.get(sid, 0)})
    return {"store": s.root, "table": table, "table_version": int(ds.version), "slides": rows}


def slide_cells(store: CellStore | str | Path, slide_id: str, columns: Sequence[str] | None = None,
                limit: int | None = None, encoder: str | None = None) -> tuple[pa.Table, int]:
    """The cells of one slide (every column but the embedding and thumbnail by default).

    Returns:
        The first ``limit`` cells (all when None) in table order, and the slide's cell count.

    Raises:
        InputError: no such slide, or a column that is a vector or an image.
        StoreError: no such column (the message lists the table's columns).
    """
    s = as_store(store)
    table = s.resolve(encoder)
    heavy = [c for c in (columns or []) if c in HEAVY]
    if heavy:
        raise InputError(f"column(s) {heavy} hold vectors or images, not values to list; use "
                         "`cytostore export anndata|h5` for embeddings")
    ds = s.dataset(table)
    if columns:
        missing = [c for c in columns if c not in ds.schema.names]
        if missing:
            raise StoreError(f"no column(s) {missing} in table {table!r}; it has "
                             f"{[n for n in ds.schema.names if n not in HEAVY]}")
    cols = list(columns) if columns else [n for n in ds.schema.names if n not in HEAVY]
    where = slide_filter([slide_id])
    with readable(s.root):  # a missing data file names itself and the fix, not a traceback
        total = ds.count_rows(filter=where)
        if total == 0:
            raise InputError(f"slide {slide_id!r} has no cell in table {table!r} of {s.root}; list the slides "
                             f"with `cytostore slides --store {s.root}`")
        return ds.to_table(columns=cols, filter=where, limit=limit), total
