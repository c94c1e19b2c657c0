"""Cells out to QuPath: one GeoJSON FeatureCollection of detections per slide.

Each cell becomes one feature the way QuPath (v0.4+) writes and reads its objects:
``id`` a UUID, ``geometry`` a Polygon (the cell's box, when stored) or a Point (its
centre), and ``properties`` with ``objectType: "detection"``, ``name`` (the cell id),
``classification: {"name", "color": [r, g, b]}``, ``measurements`` (name -> number)
and ``metadata`` (name -> string: slide_id, cell_id, uid, the stored label).
Coordinates are level-0 pixels, origin at the top-left of the image, as QuPath uses.
"""

from __future__ import annotations

import json
import math
import uuid
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa

from cytostore.errors import InputError
from cytostore.export._common import Progress, as_store, choose_slides, safe_file_stem, slide_filter, written_whole
from cytostore.store import CellStore, schema

# A fixed namespace: the same cell always gets the same feature id, in every export.
UUID_NAMESPACE = uuid.UUID("6f1c2a53-8d0e-4b7a-9c1e-2f4b5d6a7c80")
# Distinct colours (Tableau 10, then 10 more), given to class names in sorted order.
PALETTE = [
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
    (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (174, 199, 232), (255, 187, 120),
    (152, 223, 138), (255, 152, 150), (197, 176, 213), (196, 156, 148), (247, 182, 210), (199, 199, 199),
    (219, 219, 141), (158, 218, 229),
]
BOX = ("x0", "y0", "x1", "y1")
BASE_COLUMNS = ["uid", "slide_id", "cell_id", "x", "y", *BOX, "label"]


def feature_id(uid: int) -> str:
    """The QuPath object id of a cell: a UUID derived from its uid alone."""
    return str(uuid.uuid5(UUID_NAMESPACE, str(int(uid))))


def class_colors(names: Sequence[str]) -> dict[str, list[int]]:
    """A colour per class name, fixed by the sorted order of all names in one export."""
    return {n: list(PALETTE[i % len(PALETTE)]) for i, n in enumerate(sorted(set(names)))}


def numeric_extras(sch: pa.Schema) -> list[str]:
    """Extra (non-layout) columns of a cell table holding numbers: they become measurements."""
    core = set(schema.column_names("cells"))
    return [f.name for f in sch if f.name not in core
            and (pa.types.is_integer(f.type) or pa.types.is_floating(f.type))]


def _geometry(x: float, y: float, box: tuple) -> dict[str, Any]:
    if all(v is not None and math.isfinite(v) for v in box):
        x0, y0, x1, y1 = (float(v) for v in box)
        return {"type": "Polygon", "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]}
    return {"type": "Point", "coordinates": [float(x), float(y)]}


def _number(v: Any) -> float | None:
    # QuPath reads measurements as doubles; a missing value is left out rather than written as NaN.
    if v is None or isinstance(v, bool):
        return None
    f = float(v)
    return f if math.isfinite(f) else None


def cell_feature(cell: dict[str, Any], name: str | None, colors: dict[str, list[int]],
                 measurements: dict[str, Any]) -> dict[str, Any]:
    """One QuPath detection feature for a cell (a dict of its stored columns)."""
    props: dict[str, Any] = {"objectType": "detection", "name": str(cell["cell_id"])}
    if name is not None:
        props["classification"] = {"name": str(name), "color": colors[str(name)]}
    values = {k: _number(v) for k, v in measurements.items()}
    values = {k: v for k, v in values.items() if v is not None}
    if values:
        props["measurements"] = values
    meta = {"slide_id": str(cell["slide_id"]), "cell_id": str(cell["cell_id"]), "uid": str(int(cell["uid"]))}
    if cell.get("label") is not None:
        meta["label"] = str(cell["label"])
    props["metadata"] = meta
    return {"type": "Feature", "id": feature_id(cell["uid"]),
            "geometry": _geometry(cell["x"], cell["y"], tuple(cell.get(k) for k in BOX)), "properties": props}


def _predictions(store: CellStore, name: str, slides: list[str]) -> dict[int, dict[str, Any]]:
    from cytostore.fewshot.tables import read_predictions

    t = read_predictions(store, name, columns=["uid", "prediction", "score", "margin"], where=slide_filter(slides))
    return {int(r["uid"]): r for r in t.to_pylist()}


def export_geojson(store: CellStore | str | Path, out: str | Path, slides: Sequence[str] | None = None,
                   predictions: str | None = None, attention: str | Path | None = None,
                   encoder: str | None = None, progress: Progress | None = None) -> dict[str, Any]:
    """Writes ``OUT/<slide_id>.geojson`` for each slide: one QuPath detection per cell.

    Args:
        store: the store (or its path).
        out: folder to write into (created when absent).
        slides: slide ids to export; default every slide of the table.
        predictions: a prediction set (``fewshot predict`` or ``cluster``): its prediction becomes the
            classification and its score and margin measurements.
        attention: a MIL model folder (``mil train``): each cell's attention becomes a measurement.
        encoder: which cell table; default the only (or default) one.
        progress: called after each slide with (done, total, slide_id).

    Returns:
        A summary: table, folder, per-slide files and cell counts, cells without a prediction.

    Raises:
        InputError: a slide asked for is not in the table.
        StoreError: no such store, table or prediction set.
    """
    s = as_store(store)
    table = s.resolve(encoder)
    chosen = choose_slides(s, table, slides)
    ds = s.dataset(table)
    extras = numeric_extras(ds.schema)
    columns = [c for c in BASE_COLUMNS if c in ds.schema.names] + extras
    preds = _predictions(s, predictions, chosen) if predictions else {}
    names = ({str(p["prediction"]) for p in preds.values()} if predictions else
             {str(v) for v in ds.to_table(columns=["label"], filter=slide_filter(chosen)).column("label").to_pylist()
              if v is not None})
    colors = class_colors(names)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files, unpredicted = [], 0
    for done, slide in enumerate(chosen, 1):
        cells = ds.to_table(columns=columns, filter=slide_filter([slide]))
        att, mil = _attention(s, attention, slide, table) if attention else ({}, None)
        path = out / f"{safe_file_stem(slide)}.geojson"
        n = 0
        with written_whole(path) as fh:
            fh.write('{"type": "FeatureCollection", "features": [\n')
            for cell in cells.to_pylist():
                m = {c: cell.get(c) for c in extras}
                name = cell.get("label")
                if predictions:
                    p = preds.get(int(cell["uid"]))
                    name = p["prediction"] if p else None
                    unpredicted += p is None
                    m.update({"score": p["score"], "margin": p["margin"]} if p else {})
                if attention:
                    m["attention"] = att.get(int(cell["uid"]))
                fh.write((",\n" if n else "") + json.dumps(cell_feature(cell, name, colors, m)))
                n += 1
            fh.write("\n]}\n")
        files.append({"slide_id": slide, "file": str(path), "cells": n, **({"mil_label": mil} if mil else {})})
        if progress:
            progress(done, len(chosen), slide)
    return {"table": table, "out": str(out), "slides": len(files), "cells": sum(f["cells"] for f in files),
            "classification": f"prediction:{predictions}" if predictions else "label",
            "unpredicted_cells": unpredicted if predictions else None,
            "attention": str(attention) if attention else None, "classes": colors, "files": files}


def _attention(store: CellStore, model_dir: str | Path, slide: str, table: str) -> tuple[dict[int, float], str]:
    from cytostore.mil import explain

    if not Path(model_dir).is_dir():
        raise InputError(f"--attention {model_dir}: no such MIL model folder; train one with `cytostore mil train`")
    e = explain(store.root, model_dir, slide, table=table, device="cpu")
    uids = e.cells.column("uid").to_numpy()
    att = np.asarray(e.cells.column("attention").to_numpy(), dtype=np.float64)
    return dict(zip(uids.tolist(), att.tolist())), e.label
