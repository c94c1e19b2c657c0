"""Support sets: labelled examples named in a CSV/Parquet file, turned into embeddings.

A support file either names cells already in the store (``slide_id, cell_id,
label``) or images (``image, label``, optionally ``x, y`` for a cell centre in
a larger image). Images are embedded exactly as the table was: same encoder,
same weights (checked by sha256), same crop and resize.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from cytostore.errors import InputError, ProvenanceError
from cytostore.keys import cell_uid
from cytostore.store import CellStore

SHOW = 5  # offending rows named in an error


@dataclass(frozen=True)
class SupportSet:
    """Raw embeddings of the support examples with their labels and where they came from."""

    embeddings: np.ndarray  # (N, dim) float32, as stored (before any normalisation)
    labels: np.ndarray  # (N,) str class labels
    kind: str  # "cells" (named store cells) or "images"
    ids: list[dict[str, Any]] = field(default_factory=list)  # per example: slide_id/cell_id/uid or image/x/y

    def record(self) -> dict[str, Any]:
        """The support ids kept in the prototype table's metadata."""
        uids = [d["uid"] for d in self.ids if "uid" in d]
        return {"kind": self.kind, "n": len(self.labels), "uids": uids, "ids": self.ids}


def _column(table: pa.Table, name: str) -> list:
    return table.column(name).to_pylist() if name in table.column_names else [None] * table.num_rows


def _labels(table: pa.Table, path: Path) -> np.ndarray:
    if "label" not in table.column_names:
        raise InputError(f"{path}: needs a 'label' column; it has {table.column_names}")
    labels = _column(table, "label")
    empty = [i for i, v in enumerate(labels) if v is None or str(v).strip() == ""]
    if empty:
        lines = ", ".join(str(i + 2) for i in empty[:SHOW])
        raise InputError(f"{path}: {len(empty)} row(s) have no label (line(s) {lines}); "
                         "every support example needs its class")
    return np.array([str(v).strip() for v in labels], dtype=object)


def read_support(path: str | Path, store: CellStore, encoder: str | None = None,
                 device: str = "cpu", batch_size: int = 32) -> SupportSet:
    """Reads a support file and returns the embeddings of its examples.

    Raises:
        InputError: unreadable file, missing columns, empty labels, unknown cells.
        ProvenanceError: the encoder built here has other weights than the table's.
    """
    from cytostore.sources.manifest import read_table

    path = Path(path)
    if not path.is_file():
        raise InputError(f"support file {path} not found")
    table = read_table(path)
    if table.num_rows == 0:
        raise InputError(f"{path}: the support file has no rows")
    labels = _labels(table, path)
    cols = set(table.column_names)
    if {"slide_id", "cell_id"} <= cols:
        return _from_cells(table, labels, path, store, encoder)
    if "image" in cols:
        return _from_images(table, labels, path, store, encoder, device, batch_size)
    raise InputError(f"{path}: name store cells (columns slide_id, cell_id, label) or images "
                     f"(image, label, optionally x, y); it has {table.column_names}")


def _from_cells(table: pa.Table, labels: np.ndarray, path: Path, store: CellStore,
                encoder: str | None) -> SupportSet:
    slides = [str(v) for v in _column(table, "slide_id")]
    cells = [str(v) for v in _column(table, "cell_id")]
    uids = np.array([cell_uid(s, c) for s, c in zip(slides, cells)], dtype=np.int64)
    seen: dict[int, str] = {}
    clash = [f"{s}/{c}" for s, c, u, lab in zip(slides, cells, uids, labels) if seen.setdefault(int(u), lab) != lab]
    if clash:
        raise InputError(f"{path}: {len(clash)} cell(s) carry two different labels: {', '.join(clash[:SHOW])}; "
                         "keep one label per cell")
    parts = [store.embeddings(encoder, where=_uid_filter(chunk), columns=("uid",))
             for chunk in np.array_split(np.unique(uids), max(1, -(-len(np.unique(uids)) // 1000)))]
    emb = np.concatenate([np.asarray(p[0], dtype=np.float32) for p in parts])
    found = {int(u): i for i, u in enumerate(np.concatenate([p[1].column("uid").to_numpy() for p in parts]))}
    missing = [(s, c) for s, c, u in zip(slides, cells, uids) if int(u) not in found]
    if missing:
        shown = ", ".join(f"{s}/{c}" for s, c in missing[:SHOW])
        raise InputError(f"{path}: {len(missing)} support cell(s) are not in table {store.resolve(encoder)!r} "
                         f"of {store.root}: {shown}{' ...' if len(missing) > SHOW else ''}; "
                         "check slide_id and cell_id (see `cytostore slides` and `cytostore cells --slide ID`)")
    order = np.array([found[int(u)] for u in uids])
    ids = [{"slide_id": s, "cell_id": c, "uid": int(u)} for s, c, u in zip(slides, cells, uids)]
    return SupportSet(emb[order], labels, "cells", ids)


def _uid_filter(uids: np.ndarray) -> str:
    return "uid IN (" + ",".join(str(int(u)) for u in uids) + ")"


def _from_images(table: pa.Table, labels: np.ndarray, path: Path, store: CellStore, encoder: str | None,
                 device: str, batch_size: int) -> SupportSet:
    from cytostore.embed import Embedder
    from cytostore.imaging import CropPolicy, crop_cell, open_image, resize

    prov = store.provenance(encoder)
    enc = load_table_encoder(prov, store.resolve(encoder))
    pre = prov.get("preprocessing", {})
    policy = CropPolicy(int(pre.get("crop_size", 64)), float(pre.get("box_margin", 0.15)))
    images, xs, ys = _column(table, "image"), _column(table, "x"), _column(table, "y")
    pixels, ids = [], []
    for i, (image, x, y) in enumerate(zip(images, xs, ys)):
        where = f"{path}:line {i + 2}"
        if image is None or str(image).strip() == "":
            raise InputError(f"{where}: the 'image' cell is empty")
        img_path = Path(str(image))
        img_path = img_path if img_path.is_absolute() else path.parent / img_path
        try:
            img = open_image(img_path)
        except InputError as e:
            raise InputError(f"{where}: {e}") from e
        try:
            if x is None or y is None:  # the whole image is the crop, as at ingest
                w, h = img.size
                cx, cy, side = w / 2, h / 2, max(w, h)
            else:
                cx, cy, side = float(x), float(y), policy.side(None)
            crop = crop_cell(img, cx, cy, side)
        except InputError as e:
            raise InputError(f"{where}: {e}") from e
        finally:
            img.close()
        pixels.append(resize(crop, enc.input_size, enc.interpolation))
        ids.append({"image": str(img_path), "x": None if x is None else float(x), "y": None if y is None else float(y)})
    embedder = Embedder(enc, device=device, batch_size=batch_size)
    stack = np.stack(pixels)
    out = np.concatenate([embedder(stack[i:i + batch_size]) for i in range(0, len(stack), batch_size)])
    # Round through the table's storage dtype so support and stored cells match exactly.
    dtype = np.float16 if prov.get("embedding_dtype", "float16") == "float16" else np.float32
    return SupportSet(out.astype(dtype).astype(np.float32), labels, "images", ids)


def load_table_encoder(prov: dict[str, Any], table: str):
    """Builds the encoder a table was made with and checks its weights' sha256."""
    from cytostore.encoders import create_encoder
    from cytostore.encoders.lazy import with_input_size

    info = prov.get("encoder", {})
    if not info.get("name"):
        raise ProvenanceError(f"table {table!r} records no encoder; it cannot embed new images")
    enc = with_input_size(create_encoder(info["name"]), int(info.get("input_size") or 0))  # the table's --input-size
    want = info.get("weights_sha256")
    if want and enc.weights_sha256 != want:
        raise ProvenanceError(
            f"encoder {info['name']!r} here has weights sha256 {enc.weights_sha256[:16]}..., but table {table!r} "
            f"was embedded with {str(want)[:16]}...; install the same weights, or name store cells "
            "(slide_id, cell_id) in the support file instead of images")
    return enc


SUGGESTION_COLUMNS = ("slide_id", "cell_id", "label", "predicted", "reason")


def append_suggestions(path: str | Path, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Writes suggested cells to a support-file CSV with an empty ``label`` to fill in.

    A new file gets the columns ``slide_id, cell_id, label, predicted, reason``
    (``predicted``: the nearest class now, a hint, never read as the label). An existing
    file (the support file itself, or an earlier ``--out``) keeps its own columns and
    rows: suggestions are appended below, and cells it already names are skipped.

    Returns:
        path, rows appended, cells skipped as already present, and the file's columns.

    Raises:
        InputError: the existing file is not a CSV naming cells by slide_id and cell_id.
    """
    import csv

    path = Path(path)
    fields, present, ends_clean = list(SUGGESTION_COLUMNS), set(), True
    if path.exists() and path.stat().st_size > 0:
        if path.suffix.lower() in {".parquet", ".pq"}:
            raise InputError(f"--out {path}: suggestions are appended to CSV files; name a .csv file")
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
            fields = list(reader.fieldnames or [])
            if not {"slide_id", "cell_id"} <= set(fields):
                raise InputError(f"--out {path}: an existing support file needs slide_id and cell_id columns; "
                                 f"it has {fields}; write the suggestions to a new file instead")
            present = {(str(r["slide_id"]), str(r["cell_id"])) for r in reader}
        with open(path, "rb") as fh:
            fh.seek(-1, 2)
            ends_clean = fh.read(1) == b"\n"
        new_file = False
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        new_file = True
    fresh = []
    for r in rows:
        key = (str(r["slide_id"]), str(r["cell_id"]))
        if key not in present:
            present.add(key)
            fresh.append({"slide_id": key[0], "cell_id": key[1], "label": "", "predicted": r.get("nearest", ""),
                          "reason": r.get("reason", "")})
    with open(path, "a" if not new_file else "w", newline="") as fh:
        if not ends_clean:
            fh.write("\n")
        w = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore", restval="")
        if new_file:
            w.writeheader()
        w.writerows(fresh)
    return {"path": str(path), "appended": len(fresh), "already_present": len(rows) - len(fresh), "columns": fields}
