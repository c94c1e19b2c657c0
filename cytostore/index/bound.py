"""An index bound to the current version of its table: the delta since the build, and the load cache.

One FAISS object is loaded per generation of the index files (keyed by folder and
the sidecar's ``build_id``) and reused across table commits; a new table version
only recomputes the delta since the build:

- on a table with stable row ids (``_rowid`` grows with appends and survives
  compaction), appended rows are those with ``_rowid`` above the build's
  ``max_rowid`` (plus rows Lance updated in place, by their row version); deleted
  rows are looked for only when the count of rows at or below ``max_rowid``
  differs from the indexed count; an appended row whose uid is indexed is a
  changed row: its indexed copy is filtered out and the new row searched exactly;
- on an older table (no stable row ids, or an index that predates them) the uid
  sets are compared in full, as before, and content changes go unseen.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cytostore.errors import InputError, ProvenanceError, StoreError
from cytostore.index.faiss import _gpu_copy, faiss_module, gpu_available, prepare
from cytostore.index.files import (INDEX_FILE, as_store, build_key, index_dir, read_ids, read_index_file, read_sidecar_at,
                                   rebuild_command, same_table, schema_provenance, stable_row_ids, table_dim)
from cytostore.keys import UidSet
from cytostore.store import CellStore, embedding_matrix

_EMPTY = np.zeros(0, np.int64)
# What loading did, for tests and benchmarks: index files read, full uid scans, delta scans.
STATS = {"index_loads": 0, "uid_scans": 0, "delta_scans": 0, "rowid_scans": 0}


def stats() -> dict[str, int]:
    """A copy of the load counters (``index_loads``: times an index.faiss was read, ...)."""
    return dict(STATS)


def _lookup(keys: np.ndarray, order: np.ndarray, values: np.ndarray | None, q: np.ndarray):
    """(found mask, positions or values) of ``q`` in ``keys`` sorted by ``order``."""
    if not len(keys):
        return np.zeros(len(q), bool), np.full(len(q), -1, np.int64)
    s = keys[order]
    pos = np.minimum(np.searchsorted(s, q), len(s) - 1)
    found = s[pos] == q
    hit = order[pos]
    out = values[hit] if values is not None else hit
    return found, np.where(found, out, -1)


@dataclass
class IndexFiles:
    """One generation of an index's files, loaded once and shared by every table version."""

    folder: Path
    sidecar: dict[str, Any]
    index: Any
    uids: np.ndarray  # indexed uids, in the order added
    rowids: np.ndarray | None  # their stable row ids (None: table without them, or an older index)
    order: np.ndarray = field(init=False)
    gpus: dict[str, tuple] = field(default_factory=dict)  # device -> (gpu copy, resources, note)

    def __post_init__(self) -> None:
        self.order = np.argsort(self.uids, kind="stable")

    def find(self, uids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(indexed mask, stable row ids or -1) of ``uids``."""
        return _lookup(self.uids, self.order, self.rowids if self.rowids is not None else None, uids)


@dataclass
class BoundIndex:
    """An index loaded against one version of its table.

    ``index`` is None when the table has no usable index: every row is then
    ``added`` (searched exactly). ``deleted`` holds the indexed uids to filter out
    of FAISS results: rows deleted since, and rows whose content changed (their
    new copy is among ``added``).
    """

    store: CellStore
    table: str
    dataset: Any  # the Lance dataset at the version loaded
    index: Any  # faiss index or None
    info: dict[str, Any]  # sidecar (kind, params, ...) or {"kind": "none"}
    count: int  # rows in the table version
    added: np.ndarray  # uids of rows to search exactly (new or changed since the build)
    deleted: np.ndarray  # indexed uids never to return (deleted or changed)
    changed: np.ndarray = field(default_factory=lambda: _EMPTY)  # indexed uids whose row was replaced
    gpu: Any = None  # GPU copy of ``index`` (load_index(device="cuda")), or None
    files: IndexFiles | None = None
    mode: str = "offsets"  # "rowids": located by stable row id; "offsets": by row offset (full uid scan)
    added_rowids: np.ndarray | None = None  # stable row ids of ``added`` (rowids mode)
    table_uids: np.ndarray | None = None  # every uid in table order (offsets mode)
    _order: np.ndarray | None = None
    _added_order: np.ndarray | None = None
    _added_vectors: np.ndarray | None = None

    @property
    def metric(self) -> str:
        return self.info.get("metric", "cosine")

    @property
    def dim(self) -> int:
        return table_dim(self.dataset)

    def locate(self, uids: np.ndarray) -> np.ndarray:
        """Where ``uids`` sit in the loaded version (stable row ids or row offsets); -1 where absent."""
        uids = np.asarray(uids, dtype=np.int64)
        if self.mode == "offsets":
            if self._order is None:
                self._order = np.argsort(self.table_uids, kind="stable")
            return _lookup(self.table_uids, self._order, None, uids)[1]
        if self._added_order is None:
            self._added_order = np.argsort(self.added, kind="stable")
        found, loc = _lookup(self.added, self._added_order, self.added_rowids, uids)  # a changed row's new copy
        rest = ~found
        if rest.any() and self.files is not None:
            f2, loc2 = self.files.find(uids[rest])
            gone = np.isin(uids[rest], self.deleted)
            loc[rest] = np.where(f2 & ~gone, loc2, -1)
        return loc

    def contains(self, uids: np.ndarray) -> np.ndarray:
        """Whether each uid is a row of the loaded version."""
        return self.locate(uids) >= 0

    def rows(self, uids: np.ndarray, columns: list[str]):
        """Arrow rows of present ``uids``, in the given order."""
        loc = self.locate(uids)
        if (loc < 0).any():
            raise StoreError(f"uids {np.asarray(uids)[loc < 0][:3].tolist()} are not in table {self.table!r}")
        if self.mode == "offsets":
            return self.dataset.take(loc.tolist(), columns=columns)
        t = self.dataset._take_rows(loc.tolist(), columns=columns)  # by stable row id (Lance's own take)
        if t.num_rows != len(loc):
            raise StoreError(f"table {self.table!r} changed under the loaded index (rows taken by row id are "
                             f"missing); search again")
        return t

    def vectors(self, uids: np.ndarray) -> np.ndarray:
        """Prepared float32 vectors of present ``uids`` (the exact stored values)."""
        if len(uids) == 0:
            return np.zeros((0, self.dim), np.float32)
        t = self.rows(uids, ["embedding"])
        return prepare(embedding_matrix(t.column("embedding")), self.metric)

    def added_vectors(self) -> np.ndarray:
        """Prepared vectors of the rows added since the build (cached)."""
        if self._added_vectors is None:
            self._added_vectors = self.vectors(self.added)
        return self._added_vectors


# -- the delta ----------------------------------------------------------------------------
def _uids(t) -> np.ndarray:
    return t.column("uid").to_numpy().astype(np.int64)


def _rowid_delta(ds, files: IndexFiles) -> dict[str, np.ndarray]:
    """Appended, changed and deleted rows since the build, from stable row ids (no full uid scan)."""
    side = files.sidecar
    top, version = int(side["max_rowid"]), int(side["table_version"])
    STATS["delta_scans"] += 1
    try:  # rows appended, and rows Lance updated in place (same row id, newer row version)
        t = ds.to_table(columns=["uid"], with_row_id=True,
                        filter=f"_rowid > {top} OR _row_last_updated_at_version > {version}")
    except (ValueError, OSError, RuntimeError):  # a Lance without row versions: appended rows only
        t = ds.to_table(columns=["uid"], with_row_id=True, filter=f"_rowid > {top}")
    new_uids, new_rowids = _uids(t), t.column("_rowid").to_numpy().astype(np.int64)
    changed = new_uids[files.find(new_uids)[0]]
    deleted = _EMPTY
    # Rows at or below max_rowid = all rows (from metadata) - appended ones; rows updated in place keep their id.
    if int(ds.count_rows()) - int((new_rowids > top).sum()) != len(files.uids):
        STATS["rowid_scans"] += 1  # some indexed rows are gone: which (row ids only)
        live = ds.to_table(columns=[], with_row_id=True, filter=f"_rowid <= {top}").column("_rowid").to_numpy()
        deleted = files.uids[~UidSet(live).contains(files.rowids)]
    return {"added": new_uids, "added_rowids": new_rowids, "changed": changed,
            "deleted": np.union1d(deleted, changed)}


def _uid_delta(ds, files: IndexFiles | None) -> dict[str, np.ndarray]:
    """The delta by comparing uid sets in full (tables without stable row ids)."""
    STATS["uid_scans"] += 1
    current = _uids(ds.to_table(columns=["uid"]))
    if files is None:
        return {"table_uids": current, "added": current, "deleted": _EMPTY}
    indexed = files.uids
    return {"table_uids": current, "added": current[~UidSet(indexed).contains(current)],
            "deleted": indexed[~UidSet(current).contains(indexed)]}


# -- loading ------------------------------------------------------------------------------
_FILES: dict[tuple, IndexFiles] = {}
_BOUND: dict[tuple, BoundIndex] = {}


def _stamp(folder: Path) -> tuple:
    """Size and mtime of index.faiss: a file replaced or truncated behind the sidecar's back is read again."""
    try:
        st = (folder / INDEX_FILE).stat()
    except OSError:
        return (None, None)
    return (st.st_size, st.st_mtime_ns)


def load_files(folder: Path, sidecar: dict, fix: str) -> IndexFiles:
    """The loaded files of one index generation (read once, then cached)."""
    key = (str(folder), build_key(sidecar), *_stamp(folder))
    if key in _FILES:
        return _FILES[key]
    index = read_index_file(folder, sidecar, fix)
    STATS["index_loads"] += 1
    uids, rowids = read_ids(folder, sidecar, fix)
    files = IndexFiles(folder, sidecar, index, uids, rowids)
    for old in [k for k in _FILES if k[0] == str(folder)]:  # an older generation of the same index
        del _FILES[old]
    if len(_FILES) >= 4:
        _FILES.pop(next(iter(_FILES)))
    _FILES[key] = files
    return files


def clear_cache() -> None:
    """Forgets every loaded index (the next search reads the files again)."""
    _FILES.clear()
    _BOUND.clear()


def load_index(store: CellStore | str | Path, encoder: str | None = None, *, require: bool = False,
               device: str = "cpu") -> BoundIndex:
    """Loads a table's index against the table's current version.

    The FAISS object is read once per generation of the index files and reused
    across table commits; only the delta is recomputed for a new table version.
    ``device="cuda"`` (or ``auto`` with a GPU build of faiss) also puts a copy of
    the index on the GPU for unfiltered searches; when faiss cannot, the index
    stays on the CPU and ``info["notes"]`` says why.

    Raises ProvenanceError when the index was built from another encoder's
    embeddings, and StoreError when ``require`` and there is no index, or when
    the index files are missing, truncated or unreadable.
    """
    if device not in {"auto", "cpu"} and not device.startswith("cuda"):
        raise InputError(f"unknown device {device!r}; use auto, cpu or cuda")
    store = as_store(store)
    table = store.resolve(encoder)
    ds = store.dataset(table)
    folder = index_dir(store, table)
    fix = rebuild_command(store, table)
    sidecar = read_sidecar_at(folder)
    key = (store.root, table, int(ds.version), build_key(sidecar) if sidecar else None, *_stamp(folder), device)
    if key in _BOUND:
        return _BOUND[key]
    notes: list[str] = []
    files = None
    if sidecar is None:
        if require:
            raise StoreError(f"table {table!r} has no index; build one with `{fix}`")
    else:
        _check_provenance(sidecar, ds, folder, table, fix)
        same, why = same_table(store, table, ds, sidecar)
        if same is False:
            notes.append(f"{why}: its index is not used; rebuild it with `{fix}`")
        else:
            files = load_files(folder, sidecar, fix)
            if same is None:
                notes.append(f"{why}: new and deleted cells found by comparing uids; content changes cannot be seen")
    bound = _bind(store, table, ds, files, device, same is True if sidecar else False)
    bound.info["notes"] = notes + bound.info.get("notes", [])
    if len(_BOUND) >= 8:
        _BOUND.pop(next(iter(_BOUND)))
    _BOUND[key] = bound
    return bound


def _check_provenance(sidecar: dict, ds, folder: Path, table: str, fix: str) -> None:
    diffs = provenance_diff(sidecar, schema_provenance(ds))
    if diffs:
        raise ProvenanceError(f"the index in {folder} was built from other embeddings than table {table!r} "
                              f"holds ({'; '.join(diffs)}); rebuild it with `{fix}`")
    if sidecar["dim"] != table_dim(ds):
        raise StoreError(f"index dimension {sidecar['dim']} != table dimension {table_dim(ds)}; rebuild with `{fix}`")


def provenance_diff(sidecar: dict, prov: dict) -> list[str]:
    """What differs between the encoder an index was built from and the table's."""
    enc = prov.get("encoder", {})
    return [f"encoder {k}: index has {sidecar['encoder'].get(k)!r}, table has {enc.get(k)!r}"
            for k in ("name", "weights_sha256") if sidecar["encoder"].get(k) != enc.get(k)]


def delta(ds, files: IndexFiles | None, identified: bool) -> dict[str, np.ndarray]:
    """The rows to search exactly and to filter out, by row id when possible."""
    if files is None:
        return _uid_delta(ds, None)
    side = files.sidecar
    if int(side["table_version"]) == int(ds.version) and identified and not side.get("kept_deleted"):
        return {"added": _EMPTY, "deleted": _EMPTY, "added_rowids": _EMPTY, "changed": _EMPTY}
    if identified and files.rowids is not None and "max_rowid" in side and stable_row_ids(ds):
        return _rowid_delta(ds, files)
    return _uid_delta(ds, files)


def _bind(store: CellStore, table: str, ds, files: IndexFiles | None, device: str, identified: bool) -> BoundIndex:
    d = delta(ds, files, identified)
    rowids_mode = "table_uids" not in d
    if rowids_mode and files is not None and files.rowids is None:
        d = _uid_delta(ds, files)  # same version of an index without row ids: locate by offsets
        rowids_mode = False
    count = int(ds.count_rows()) if rowids_mode else len(d["table_uids"])
    if files is None:
        bound = BoundIndex(store, table, ds, None, {"kind": "none", "metric": "cosine"}, count, d["added"], _EMPTY,
                           table_uids=d["table_uids"])
        return bound
    sidecar = files.sidecar
    info = {**sidecar["params"], "kind": sidecar["kind"], "metric": sidecar["metric"], "sidecar": sidecar,
            "notes": []}
    bound = BoundIndex(store, table, ds, files.index, info, count, d["added"], d["deleted"],
                       changed=d.get("changed", _EMPTY), files=files, mode="rowids" if rowids_mode else "offsets",
                       added_rowids=d.get("added_rowids"), table_uids=d.get("table_uids"))
    _attach_gpu(bound, files, device)
    return bound


def _attach_gpu(bound: BoundIndex, files: IndexFiles, device: str) -> None:
    if device == "cpu" or (device == "auto" and not gpu_available()):
        bound.info["device"] = "cpu"
        return
    if device not in files.gpus:
        files.gpus[device] = _gpu_copy(files.index, bound.info["kind"], "searching")
    bound.gpu, res, note = files.gpus[device]
    if res is not None:
        bound.info["gpu_resources"] = res
    bound.info["device"] = "cuda" if bound.gpu is not None else "cpu"
    if note:
        bound.info["notes"].append(note)


__all__ = ["BoundIndex", "IndexFiles", "STATS", "clear_cache", "delta", "faiss_module", "load_files", "load_index",
           "provenance_diff", "stats"]
