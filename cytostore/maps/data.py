"""What a map draws: the selected cells, their UMAP coordinates and their colours.

``--color-by`` is resolved here: ``label``, ``slide_id``, any column of the cell
table, or ``prediction:NAME`` (the ``prediction`` column of ``predictions.NAME.lance``, joined on
``uid``; sets written with layout 1 name it ``label`` and read the same).
Text and boolean columns are categorical (a legend), numeric columns continuous
(a colour bar).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa

from cytostore.store import schema
from cytostore.errors import InputError, StoreError
from cytostore.maps.coords import UmapParams, as_store, compute_umap
from cytostore.store import CellStore

PREDICTION_PREFIX = "prediction:"
MISSING = "(none)"  # category of cells without a value (no label, no prediction)
NOT_COLOURABLE = {"embedding", "thumbnail"}


@dataclass(frozen=True)
class ColorSpec:
    """What ``--color-by`` asks for, checked against the store."""

    by: str  # as given: label, slide_id, prediction:NAME or a column name
    column: str | None  # cell-table column to read (None for predictions)
    prediction: str | None  # predictions.<name> table to join on uid
    numeric: bool  # colour bar instead of a legend


@dataclass(frozen=True)
class MapData:
    """The cells a map draws, in drawing order (shuffled so no group hides another)."""

    table: str  # cell-table name
    uid: np.ndarray  # int64 (N,)
    x: np.ndarray  # float32 (N,) UMAP coordinates
    y: np.ndarray
    slide_id: list[str]
    cell_id: list[str]
    label: list[str]  # label or MISSING
    color: ColorSpec
    values: np.ndarray  # numeric: float64 (N,); categorical: int32 category index (N,)
    categories: list[str]  # categorical: names ordered by count (largest first); numeric: []
    umap_meta: dict[str, Any]  # stored coordinates' metadata (params, table version, reused...)
    total_cells: int  # cells matching --where before --sample

    @property
    def n(self) -> int:
        return len(self.uid)


def _predictions_uri(store: CellStore, name: str) -> str:
    return store.uri("predictions", name)


def resolve_color(store: CellStore, color_by: str, encoder: str | None = None) -> ColorSpec:
    """Checks ``color_by`` against the store before any work is done.

    Raises:
        InputError: no such column, a column that cannot colour points, or no such predictions.
    """
    color_by = (color_by or "label").strip()
    if color_by.startswith(PREDICTION_PREFIX):
        name = color_by[len(PREDICTION_PREFIX):]
        if not name:
            raise InputError("--color-by prediction:NAME needs the name of a predictions table")
        uri = _predictions_uri(store, name)
        if "://" not in uri and not Path(uri).is_dir():
            have = store.names("predictions")
            raise InputError(f"--color-by {color_by}: no predictions table {uri}; "
                             f"the store has {have or 'none'} (make one with `cytostore fewshot predict`)")
        return ColorSpec(color_by, None, name, numeric=False)
    fields = store.dataset(encoder).schema
    names = [f.name for f in fields if f.name not in NOT_COLOURABLE]
    if color_by not in fields.names or color_by in NOT_COLOURABLE:
        raise InputError(f"--color-by {color_by!r}: the table {store.resolve(encoder)!r} has no such column; "
                         f"use label, slide_id, prediction:NAME or one of {names}")
    typ = fields.field(color_by).type
    numeric = pa.types.is_integer(typ) or pa.types.is_floating(typ)
    if not numeric and not (pa.types.is_string(typ) or pa.types.is_large_string(typ) or pa.types.is_boolean(typ)
                            or pa.types.is_dictionary(typ)):
        raise InputError(f"--color-by {color_by!r}: column type {typ} cannot colour points; "
                         "use a text, boolean or numeric column")
    return ColorSpec(color_by, color_by, None, numeric=numeric)


def _categorise(values: list[Any]) -> tuple[np.ndarray, list[str]]:
    text = [MISSING if v is None else str(v) for v in values]
    names, inverse, counts = np.unique(np.array(text, dtype=object), return_inverse=True, return_counts=True)
    order = np.lexsort((names, -counts))  # largest first, ties by name; MISSING last
    order = np.concatenate([order[names[order] != MISSING], order[names[order] == MISSING]])
    rank = np.empty(len(order), dtype=np.int32)
    rank[order] = np.arange(len(order), dtype=np.int32)
    return rank[inverse].astype(np.int32), [str(names[i]) for i in order]


def _prediction_labels(store: CellStore, name: str, uids: np.ndarray) -> list[Any]:
    from cytostore.fewshot.tables import read_predictions

    pred = read_predictions(store, name, columns=["uid", "prediction"])
    p_uid = pred.column("uid").to_numpy()
    p_lab = np.array(pred.column("prediction").to_pylist(), dtype=object)
    order = np.argsort(p_uid, kind="stable")
    p_uid, p_lab = p_uid[order], p_lab[order]
    pos = np.clip(np.searchsorted(p_uid, uids), 0, max(len(p_uid) - 1, 0))
    hit = (p_uid[pos] == uids) if len(p_uid) else np.zeros(len(uids), dtype=bool)
    return [p_lab[p] if h else None for p, h in zip(pos, hit)]


def load_map_data(store: CellStore | str | Path, color_by: str = "label", where: str | None = None,
                  sample: int | None = None, encoder: str | None = None, seed: int = 0,
                  params: UmapParams | None = None, force: bool = False,
                  progress: Callable[[str], None] | None = None) -> MapData:
    """Gathers what a map draws; computes (or reuses) the stored UMAP coordinates.

    Args:
        store: a CellStore or a store path.
        color_by: label, slide_id, prediction:NAME or a column of the cell table.
        where: SQL filter on the cell table selecting the cells drawn.
        sample: draw at most this many of them (uniform, seeded).
        encoder: which encoder table.
        seed: seed of the drawing sample and order (and of UMAP when ``params`` is None).
        params: UMAP parameters; default ``UmapParams(seed=seed)``.
        force: recompute the coordinates even when stored ones are current.
        progress: called with a short message at each stage.
    """
    s = as_store(store)
    table = s.resolve(encoder)
    spec = resolve_color(s, color_by, table)  # fail fast, before UMAP
    if sample is not None and sample < 1:
        raise InputError(f"--sample must be a positive number of cells, got {sample}")
    cols = ["uid", "slide_id", "cell_id", "label"]
    if spec.column and spec.column not in cols:
        cols.append(spec.column)
    cells = s.cells(columns=cols, where=where, encoder=table)
    total = cells.num_rows
    if total == 0:
        raise InputError(f"no cell of table {table!r} matches --where {where!r}; nothing to draw")
    coords = compute_umap(s, table, params=params or UmapParams(seed=seed), force=force, progress=progress)
    meta = schema.read_metadata(coords.schema)

    # Colours are resolved on every matching cell before sampling, so a category keeps
    # its colour (ranked by count) whatever --sample draws.
    all_uid = cells.column("uid").to_numpy()
    if spec.prediction:
        values, categories = _categorise(_prediction_labels(s, spec.prediction, all_uid))
    elif spec.numeric:
        values, categories = np.asarray(cells.column(spec.column).to_numpy(zero_copy_only=False), np.float64), []
    else:
        values, categories = _categorise(cells.column(spec.column).to_pylist())

    rng = np.random.default_rng(seed)
    rows = np.arange(total)
    if sample is not None and total > sample:
        rows = np.sort(rng.choice(total, size=sample, replace=False))
    rows = rng.permutation(rows)
    cells = cells.take(pa.array(rows))
    values = values[rows]
    uid = all_uid[rows]

    c_uid = coords.column("uid").to_numpy()
    order = np.argsort(c_uid, kind="stable")
    pos = order[np.clip(np.searchsorted(c_uid, uid, sorter=order), 0, len(c_uid) - 1)]
    if not np.array_equal(c_uid[pos], uid):
        raise StoreError(f"the UMAP coordinates of {table!r} miss some cells; recompute them with --force")
    x = coords.column("umap_x").to_numpy()[pos]
    y = coords.column("umap_y").to_numpy()[pos]
    labels = [MISSING if v is None else str(v) for v in cells.column("label").to_pylist()]
    return MapData(table=table, uid=uid, x=x, y=y, slide_id=cells.column("slide_id").to_pylist(),
                   cell_id=cells.column("cell_id").to_pylist(), label=labels, color=spec,
                   values=values, categories=categories, umap_meta=meta, total_cells=total)


def fetch_thumbnails(store: CellStore | str | Path, uids: np.ndarray, encoder: str | None = None,
                     chunk: int = 2000) -> dict[int, bytes]:
    """The stored JPEG thumbnails of some cells, by uid (read in ``uid IN (...)`` chunks)."""
    s = as_store(store)
    ds = s.dataset(encoder)
    out: dict[int, bytes] = {}
    uids = np.asarray(uids, dtype=np.int64)
    for start in range(0, len(uids), chunk):
        part = uids[start:start + chunk]
        where = "uid IN (" + ",".join(str(int(u)) for u in part) + ")"
        t = ds.to_table(columns=["uid", "thumbnail"], filter=where)
        out.update(zip(t.column("uid").to_pylist(), t.column("thumbnail").to_pylist()))
    return out
