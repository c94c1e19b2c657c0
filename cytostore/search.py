"""Similar-cell search: a query cell, image or vector -> its nearest cells, as Arrow.

Correct on a table that moved on since its index was built: rows added since
are searched exactly and merged, deleted uids never come back, and filters
(``where``, excluding the query's slide) still give ``k`` results when that many
cells match.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from cytostore.errors import InputError, ProvenanceError, StoreError
from cytostore.index import (BoundIndex, as_store, faiss_module, load_index, prepare, raw_search, rebuild_command,
                             schema_provenance, update_command)
from cytostore.keys import cell_uid
from cytostore.search_montage import montage, montage_size  # noqa: F401  (re-exported: cytostore.search.montage)
from cytostore.store import CellStore
from cytostore.store.check import names_missing_files
from cytostore.store.filters import check_where

EXACT_SUBSET = 20_000  # a filter matching at most this many cells is searched exactly
EXACT_MAX_UNINDEXED = 200_000  # most rows searched exactly without an index
RESULT_COLUMNS = ["uid", "slide_id", "cell_id", "label", "slide_label", "x", "y", "image"]
_EMPTY = np.zeros(0, np.int64)


@dataclass
class SearchResult:
    """What `run_search` found: the query, the neighbours (best first), and how."""

    query: dict[str, Any]  # how the query was given and, for a stored cell, its keys and label
    table: pa.Table  # rank, score, then RESULT_COLUMNS (+ thumbnail when asked)
    index: dict[str, Any]  # kind, versions, and what was searched exactly
    notes: list[str] = field(default_factory=list)  # stale index, fallbacks
    query_pixels: np.ndarray | None = None  # RGB crop of the query, for montages

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: query, results (rows without thumbnails), index, notes."""
        rows = self.table.drop_columns([c for c in ("thumbnail",) if c in self.table.column_names]).to_pylist()
        return {"query": self.query, "results": rows, "index": self.index, "notes": self.notes}

    def to_polars(self):
        """The neighbours as a polars DataFrame (best first; thumbnails as binary when asked)."""
        import polars as pl

        return pl.from_arrow(self.table)


def _sql(value: str) -> str:
    return "'" + str(value).replace("'", "''") + "'"


# -- nearest neighbours -------------------------------------------------------------
def _top(scores: np.ndarray, uids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    if len(scores) > 4 * k + 1024:  # keep the k best (and every tie of the k-th) before the full sort
        keep = scores >= np.partition(scores, len(scores) - k)[len(scores) - k]
        scores, uids = scores[keep], uids[keep]
    order = np.lexsort((uids, -scores))[:k]  # best score first; uid breaks ties
    return scores[order], uids[order]


def _exact(bound: BoundIndex, q: np.ndarray, uids: np.ndarray, k: int, chunk: int = 50_000):
    best_s, best_u = np.zeros(0, np.float32), _EMPTY
    for start in range(0, len(uids), chunk):
        part = uids[start:start + chunk]
        s = bound.vectors(part) @ q
        best_s, best_u = _top(np.concatenate([best_s, s]), np.concatenate([best_u, part]), k)
    return best_s, best_u


def knn(bound: BoundIndex, q: np.ndarray, k: int, allowed: np.ndarray | None = None,
        banned: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The ``k`` stored cells most similar to one prepared query vector.

    Args:
        bound: the index loaded against the current table (`load_index`).
        q: prepared (normalised for cosine) float32 vector of the table's dimension.
        k: how many neighbours.
        allowed: uids that may be returned (a ``where`` filter); None = all.
        banned: uids never returned (the query cell, its slide).

    Returns:
        (scores, uids, notes), best first; fewer than ``k`` only when fewer cells qualify.
    """
    faiss = faiss_module()
    notes: list[str] = []
    banned = np.unique(np.asarray(banned if banned is not None else _EMPTY, np.int64))
    if allowed is not None:
        allowed = np.setdiff1d(np.asarray(allowed, np.int64), banned)
        if bound.index is None or len(allowed) <= EXACT_SUBSET:
            s, u = _exact(bound, q, allowed, k)
            return s, u, notes
    scores, uids = [np.zeros(0, np.float32)], [_EMPTY]
    index, info = bound.index, bound.info
    if index is not None and index.ntotal:
        excl = np.union1d(banned, bound.deleted)
        compressed = info["kind"] == "ivf-pq"
        want = max(int(info.get("rerank", k)), k) if compressed else k
        keep: list[Any] = []  # FAISS selectors hold raw pointers: keep every part alive
        if allowed is None and len(excl) <= 64:  # over-fetch and drop: cheaper than a selector
            sel, extra = None, len(excl)
        else:
            if allowed is not None:
                keep.append(faiss.IDSelectorBatch(allowed))
            if len(excl):
                keep.append(faiss.IDSelectorBatch(excl))
                keep.append(faiss.IDSelectorNot(keep[-1]))
            sel = keep[-1] if allowed is None or not len(excl) else faiss.IDSelectorAnd(keep[0], keep[-1])
            extra = 0
        widen = 1
        while True:
            d, i = raw_search(index, info, q[None, :], want + extra, sel, widen, gpu=bound.gpu)
            d, i = d[0], i[0]
            ok = (i >= 0) & ~np.isin(i, excl)
            d, i = d[ok][:want], i[ok][:want]
            exhausted = (info["kind"] == "flat" or (compressed and info["nprobe"] * widen >= info["nlist"])
                         or (info["kind"] == "hnsw" and widen >= 64))
            if len(i) >= min(want, index.ntotal - len(excl)) or exhausted:
                break
            widen *= 4
        if len(i) < k and allowed is not None and widen > 1:
            notes.append("the filter is too selective for the index: searched the matching cells exactly")
            s, u = _exact(bound, q, allowed, k)
            return s, u, notes
        if compressed and len(i):
            d = bound.vectors(i) @ q  # exact re-ranking from the stored vectors
        scores.append(d.astype(np.float32))
        uids.append(i.astype(np.int64))
    if len(bound.added):
        mask = ~np.isin(bound.added, banned)
        if allowed is not None:
            mask &= np.isin(bound.added, allowed)
        if mask.all():  # no copy of the added rows' vectors (a boolean index would copy them every query)
            scores.append((bound.added_vectors() @ q).astype(np.float32))
            uids.append(bound.added)
        elif mask.any():
            scores.append((bound.added_vectors()[mask] @ q).astype(np.float32))
            uids.append(bound.added[mask])
    s, u = _top(np.concatenate(scores), np.concatenate(uids), k)
    return s, u, notes


# -- queries ------------------------------------------------------------------------
def load_vector(vector: np.ndarray | str | Path, dim: int) -> np.ndarray:
    """A query vector from an array or a .npy file: shape (dim,) or (1, dim), finite."""
    where = "--vector"
    if isinstance(vector, (str, Path)):
        where = str(vector)
        from cytostore.limits import load_npy

        try:  # the header is checked first: a file claiming 10^12 values is refused before reading
            vector = load_npy(vector, max_values=dim)
        except (OSError, ValueError) as e:
            raise InputError(f"{where}: not a readable .npy array ({e}); save one with numpy.save") from e
    arr = np.asarray(vector)
    if arr.ndim == 2 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 1 or arr.shape[0] != dim:
        raise InputError(f"{where}: query vector has shape {tuple(np.asarray(vector).shape)}; "
                         f"the table's embeddings have dimension {dim}: give shape ({dim},) or (1, {dim})")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise InputError(f"{where}: query vector has dtype {arr.dtype}; give float16/float32/float64 numbers")
    return check_query(arr.astype(np.float32), where)


MIN_QUERY_NORM = 1e-6  # a query vector shorter than this has no usable direction in float32


def check_query(vec: np.ndarray, where: str) -> np.ndarray:
    """``vec`` when it is a usable query: finite, and neither near zero nor overflowing once squared.

    Cosine similarity divides by the vector's norm: computed in float32 (as FAISS does) a
    near-zero norm underflows to 0 and every score comes out 0; a huge one overflows.
    """
    if not np.isfinite(vec).all():
        raise InputError(f"{where}: query vector holds NaN or infinite values; give finite numbers")
    with np.errstate(over="ignore", under="ignore"):
        norm = float(np.linalg.norm(vec.astype(np.float32)))
    if not np.any(vec):
        raise InputError(f"{where}: query vector is all zeros; cosine similarity is undefined for it")
    if not (MIN_QUERY_NORM <= norm < np.inf):
        state = "near zero" if norm < 1 else "overflowing"
        raise InputError(f"{where}: query vector has norm {norm:.3g} in float32 ({state}): every score would "
                         f"be 0. Give a vector of the table's scale (norm between "
                         f"{MIN_QUERY_NORM:g} and 1e18), e.g. a stored cell's embedding")
    return vec


def embed_image(bound: BoundIndex, path: str | Path, x: float | None = None, y: float | None = None,
                device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Embeds an image (or the cell at (x, y) in it) the way the table was made.

    Returns (float32 vector, RGB crop). Refuses when the encoder's weights differ
    from those recorded in the table.
    """
    from cytostore.embed import Embedder
    from cytostore.encoders import create_encoder
    from cytostore.encoders.lazy import with_input_size  # the table's --input-size
    from cytostore.imaging import CropPolicy, crop_cell, open_image, resize

    if (x is None) != (y is None):
        raise InputError("give both --x and --y (a cell centre in the image), or neither (the whole image)")
    prov = schema_provenance(bound.dataset)
    pre, enc_prov = prov.get("preprocessing", {}), prov.get("encoder", {})
    img = open_image(path)
    try:
        if x is None:
            w, h = img.size
            crop = crop_cell(img, w / 2, h / 2, max(w, h))
        else:
            side = CropPolicy(int(pre.get("crop_size", 64)), float(pre.get("box_margin", 0.15))).side(None)
            crop = crop_cell(img, float(x), float(y), side)
    finally:
        img.close()
    encoder = with_input_size(create_encoder(enc_prov.get("name", "")), int(enc_prov.get("input_size") or 0))
    if encoder.weights_sha256 != enc_prov.get("weights_sha256"):
        raise ProvenanceError(
            f"table {bound.table!r} was embedded with weights {str(enc_prov.get('weights_sha256'))[:16]}... "
            f"({enc_prov.get('weights_source')}) but encoder {encoder.name!r} here has {encoder.weights_sha256[:16]}...; "
            "install the same weights, or query by --vector / --cell instead")
    pixels = resize(crop, encoder.input_size, encoder.interpolation)
    vec = Embedder(encoder, device=device, batch_size=1)(np.array(pixels[None]))[0]  # writable copy for torch
    return vec, crop


def _uids_where(bound: BoundIndex, where: str) -> np.ndarray:
    try:
        t = bound.dataset.to_table(columns=["uid"], filter=where)
    except Exception as e:
        raise InputError(f"cannot apply --where {where!r}: {e}. Columns: {bound.dataset.schema.names}") from e
    return t.column("uid").to_numpy().astype(np.int64)


@names_missing_files
def run_search(store: CellStore | str | Path, slide_id: str | None = None, cell_id: str | None = None, *,
               image: str | Path | None = None, x: float | None = None, y: float | None = None,
               vector: np.ndarray | str | Path | None = None, k: int = 10, where: str | None = None,
               exclude_same_slide: bool = False, encoder: str | None = None, device: str = "cpu",
               thumbnails: bool = False) -> SearchResult:
    """Finds the ``k`` cells most similar to a query; see `search` for the arguments."""
    modes = [m for m, given in (("cell", slide_id is not None or cell_id is not None),
                                ("image", image is not None), ("vector", vector is not None)) if given]
    if len(modes) != 1:
        raise InputError("give exactly one query: --slide SLIDE --cell CELL, --image PATH, or --vector FILE.npy")
    if (x is not None or y is not None) and modes[0] != "image":
        raise InputError("--x/--y locate a cell inside --image; they mean nothing for another query")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise InputError(f"-k must be a positive whole number, got {k!r}")
    where = check_where(where) or None
    store = as_store(store)
    bound = load_index(store, encoder, device=device)
    if bound.index is None and bound.count > EXACT_MAX_UNINDEXED:
        raise StoreError(f"table {bound.table!r} has {bound.count} cells and no usable index; "
                         f"build one with `{rebuild_command(store, bound.table)}`")
    if len(bound.added) > EXACT_MAX_UNINDEXED:
        raise StoreError(f"{len(bound.added)} cells were added since the index was built, too many to search "
                         f"exactly; rebuild it with `{rebuild_command(store, bound.table)}`")
    query: dict[str, Any] = {"mode": modes[0]}
    banned, pixels, slide = [], None, None
    if modes[0] == "cell":
        if slide_id is None or cell_id is None:
            raise InputError("a cell query needs both --slide SLIDE_ID and --cell CELL_ID")
        uid = cell_uid(str(slide_id), str(cell_id))
        if not bound.contains(np.array([uid]))[0]:
            raise InputError(f"no cell {cell_id!r} on slide {slide_id!r} in table {bound.table!r}; check the ids "
                             f"with `cytostore cells --store {store.root} --slide {slide_id}`")
        cols = ["uid", "slide_id", "cell_id", "label"] + (["thumbnail"] if thumbnails else [])
        row = bound.rows(np.array([uid]), cols).to_pylist()[0]
        if thumbnails:
            from cytostore.imaging import decode_thumbnail

            pixels = decode_thumbnail(row.pop("thumbnail"))
        query.update(row)
        q = check_query(bound.vectors(np.array([uid]))[0], f"stored cell {slide_id}/{cell_id}")
        banned.append(np.array([uid]))
        slide = row["slide_id"]
    elif modes[0] == "vector":
        q = prepare(load_vector(vector, bound.dim)[None], bound.metric)[0]
        query["source"] = str(vector) if isinstance(vector, (str, Path)) else "array"
    else:
        raw, pixels = embed_image(bound, image, x, y, device)
        check_query(raw, f"--image {image}")
        q = prepare(raw[None], bound.metric)[0]
        query.update({"image": str(image), "x": x, "y": y})
        slide = _image_slide(bound, image, x, y, query, banned)
    if exclude_same_slide:
        if slide is None:
            raise InputError("--exclude-same-slide needs a query slide: query a stored cell (--slide --cell) "
                             "or an image the store holds")
        banned.append(_uids_where(bound, f"slide_id = {_sql(slide)}"))
    allowed = _uids_where(bound, where) if where else None
    scores, uids, notes = knn(bound, q, int(k), allowed, np.concatenate(banned) if banned else None)
    table = _result_table(bound, scores, uids, thumbnails)
    query.update({"k": int(k), "where": where, "exclude_same_slide": exclude_same_slide})
    return SearchResult(query, table, _index_summary(bound), notes + list(bound.info.get("notes", [])) + _stale_notes(bound), pixels)


def _image_slide(bound: BoundIndex, image, x, y, query: dict, banned: list) -> str | None:
    """The slide of a stored image; with (x, y) on a stored cell centre, that cell is the query."""
    path = str(Path(image).resolve())
    t = bound.dataset.to_table(columns=["uid", "slide_id", "cell_id", "x", "y"],
                               filter=f"image = {_sql(path)} OR image = {_sql(str(image))}")
    if t.num_rows == 0:
        return None
    if x is not None:
        dist = np.hypot(t.column("x").to_numpy() - float(x), t.column("y").to_numpy() - float(y))
        j = int(np.argmin(dist))
        if dist[j] <= 2.0:
            query["matched_cell"] = {"slide_id": t.column("slide_id")[j].as_py(), "cell_id": t.column("cell_id")[j].as_py()}
            banned.append(np.array([t.column("uid")[j].as_py()], np.int64))
    return t.column("slide_id")[0].as_py()


def _result_table(bound: BoundIndex, scores: np.ndarray, uids: np.ndarray, thumbnails: bool) -> pa.Table:
    cols = [c for c in RESULT_COLUMNS if c in bound.dataset.schema.names] + (["thumbnail"] if thumbnails else [])
    rows = bound.rows(uids, cols) if len(uids) else bound.dataset.schema.empty_table().select(cols)
    rank = pa.array(np.arange(1, len(uids) + 1, dtype=np.int32))
    table = rows.add_column(0, "score", pa.array(scores.astype(np.float32)))
    return table.add_column(0, "rank", rank).replace_schema_metadata(None)


def _index_summary(bound: BoundIndex) -> dict[str, Any]:
    side = bound.info.get("sidecar", {})
    out = {"table": bound.table, "kind": bound.info["kind"], "table_version": int(bound.dataset.version),
           "index_table_version": side.get("table_version"), "searched_exactly": int(len(bound.added)),
           "deleted_filtered": int(len(bound.deleted)), "changed": int(len(bound.changed)),
           "located_by": bound.mode}
    for key in ("nprobe", "nlist", "rerank", "ef_search"):
        if key in bound.info:
            out[key] = bound.info[key]
    return out


def _stale_notes(bound: BoundIndex) -> list[str]:
    fix = rebuild_command(bound.store, bound.table)
    if bound.index is None:
        return [f"table {bound.table!r} has no usable index: searched its {bound.count} cells exactly; "
                f"build one with `{fix}`"]
    if len(bound.added) or len(bound.deleted):
        return [f"index is stale: {len(bound.added)} new or changed cells searched exactly, {len(bound.deleted)} "
                f"deleted or replaced cells filtered out; refresh it with `{update_command(bound.store, bound.table)}` "
                f"(or `{fix}`)"]
    return []


def search(store: CellStore | str | Path, slide_id: str | None = None, cell_id: str | None = None, *,
           image: str | Path | None = None, x: float | None = None, y: float | None = None,
           vector: np.ndarray | str | Path | None = None, k: int = 10, where: str | None = None,
           exclude_same_slide: bool = False, encoder: str | None = None, device: str = "cpu",
           thumbnails: bool = False, as_polars: bool = False):
    """The ``k`` cells most similar to a query, best first (cosine similarity by default).

    Give one query: a stored cell (``slide_id`` + ``cell_id``; it is never among
    its own results), an ``image`` (the whole image, or the cell centred at
    ``x``, ``y``), embedded with the table's own encoder, or a ``vector``
    (array or .npy path of the table's dimension).

    Args:
        store: a CellStore or its path.
        k: how many neighbours.
        where: SQL filter on the cell table, e.g. ``"label = 'spherocyte'"``.
        exclude_same_slide: drop neighbours from the query's slide.
        encoder: which encoder table; default the only (or default) one.
        device: cpu, cuda or auto: where an ``image`` query is embedded and, with a GPU build of
            faiss, where unfiltered searches run (else the CPU, with a note).
        thumbnails: add the stored JPEG thumbnails.
        as_polars: return a polars DataFrame (same columns, without the metadata).

    Returns:
        Arrow table: rank, score, uid, slide_id, cell_id, label, slide_label, x, y, image;
        its schema metadata ``cytostore.search`` holds the query, index summary and notes (JSON).
    """
    res = run_search(store, slide_id, cell_id, image=image, x=x, y=y, vector=vector, k=k, where=where,
                     exclude_same_slide=exclude_same_slide, encoder=encoder, device=device, thumbnails=thumbnails)
    if as_polars:
        return res.to_polars()
    meta = {"query": res.query, "index": res.index, "notes": res.notes}
    return res.table.replace_schema_metadata({b"cytostore.search": json.dumps(meta, default=str).encode()})
