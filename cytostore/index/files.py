"""The files of an index beside its table, and what ties them to that table.

``<store>/indexes/<table>/`` holds ``index.faiss`` (ids are the table's stable
``uid``), ``uids.npy`` (the indexed uids, in the order added), ``rowids.npy`` (their
Lance stable row ids, when the table has them) and ``sidecar.json`` (what was
indexed, from which table and version, how, and when to rebuild). The sidecar is
written last and names a fresh ``build_id`` at every build or update: a reader that
finds a sidecar finds the files it describes, and a cache keyed on the build id
never serves an older file.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from cytostore.errors import StoreError
from cytostore.index.faiss import faiss_module, uid_digest
from cytostore.store import CellStore
from cytostore.store.check import digest

SIDECAR, INDEX_FILE, UIDS_FILE, ROWIDS_FILE = "sidecar.json", "index.faiss", "uids.npy", "rowids.npy"
FORMAT_VERSION = 2  # 2: build_id, table identity, max_rowid, rowids.npy, index file size and sha256
TABLE_ID_KEY = "cytostore.table_id"  # Lance table config key naming one table for its whole life
PIN_HOLDER = "index"  # the Lance tag that keeps the indexed table version through cleanup


def as_store(store: CellStore | str | Path) -> CellStore:
    """A CellStore, opened from a path when needed."""
    return store if isinstance(store, CellStore) else CellStore.open(store)


def index_dir(store: CellStore, table: str) -> Path:
    """``<store>/indexes/<table>/``; refuses object-store URIs."""
    if "://" in store.root:
        raise StoreError(f"indexes live beside a local store folder; {store.root} is an object-store URI "
                         "(copy the store locally to index it)")
    return Path(store.uri("index", table))


def table_dim(ds) -> int:
    """The embedding dimension of a cell table."""
    return int(ds.schema.field("embedding").type.list_size)


def rebuild_command(store: CellStore, table: str) -> str:
    """The command that (re)builds the index of ``table``."""
    enc = "" if len(store.tables()) == 1 else f" --encoder {table}"
    return f"cytostore index build --store {store.root}{enc}"


def update_command(store: CellStore, table: str) -> str:
    """The command that adds a table's new rows to its index in place."""
    return rebuild_command(store, table).replace("index build", "index update")


def schema_provenance(ds) -> dict[str, Any]:
    """The provenance stored in a Lance dataset's schema."""
    from cytostore.store import schema

    return schema.read_metadata(ds.schema)


# -- which table, which version --------------------------------------------------------
def table_id(ds) -> str | None:
    """The id the store writer gives a table at creation (Lance config), or None for older tables."""
    try:
        return ds.config().get(TABLE_ID_KEY)
    except (AttributeError, OSError, ValueError):
        return None


def stable_row_ids(ds) -> bool:
    """Whether the table keeps stable row ids (``_rowid`` grows with appends, survives compaction)."""
    return bool(getattr(ds, "has_stable_row_ids", False))


def fingerprint(ds) -> str:
    """sha256 of the data file names of one table version (random per write: a recreated table differs)."""
    names = []
    for frag in ds.get_fragments():
        for f in frag.data_files():
            names.append(str(f.path))  # a str (callable in older Lance, deprecated there)
    return "sha256:" + hashlib.sha256("\n".join(sorted(names)).encode()).hexdigest()


def same_table(store: CellStore, table: str, ds, sidecar: dict) -> tuple[bool | None, str]:
    """Whether ``ds`` is the table the index was made from: (True/False, why), or (None, why) when unknown.

    The table id decides when both sides have one; else the fingerprint of the
    indexed version (kept by its pin) is compared.
    """
    built = sidecar.get("table_id")
    now = table_id(ds)
    if built and now:
        if built != now:
            return False, f"table {table!r} was recreated since the index was built (table id {built} -> {now})"
        return True, ""
    fp = sidecar.get("table_fingerprint")
    if not fp:
        return None, "the index predates table identity checks"
    try:
        then = store.dataset(table, version=int(sidecar["table_version"]))
    except (ValueError, OSError) as e:
        return None, f"table version {sidecar['table_version']} the index was made from is gone ({str(e)[:80]})"
    if fingerprint(then) != fp:
        return False, (f"table {table!r} was recreated since the index was built (version "
                       f"{sidecar['table_version']} holds other files)")
    return True, ""


def pin_version(store: CellStore, table: str, version: int) -> str | None:
    """Pins the indexed table version so cleanup keeps it; returns a note when it cannot."""
    from cytostore.store import pins

    try:
        pins.pin(store.table_uri(table), PIN_HOLDER, int(version))
    except (OSError, ValueError, RuntimeError, StoreError) as e:
        return f"could not pin table version {version} for the index ({e}); version cleanup may remove it"
    return None


# -- reading and writing the files ----------------------------------------------------
def new_build_id() -> str:
    """A fresh id for one written generation of the index files."""
    return uuid.uuid4().hex


def read_sidecar_at(folder: Path) -> dict[str, Any] | None:
    """The sidecar in ``folder``, or None when there is none."""
    path = folder / SIDECAR
    if not path.is_file():
        return None
    try:
        sidecar = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise StoreError(f"{path} is unreadable ({e}); rebuild with `cytostore index build`") from e
    check_sidecar(sidecar, path)
    return sidecar


# What every reader of a sidecar relies on, and the type it must have.
REQUIRED = {"table_version": int, "rows": int, "dim": int, "kind": str, "metric": str, "uid_digest": str,
            "built_at": str, "encoder": dict, "params": dict}
REQUIRED_PARAMS = {"ivf-pq": ("nprobe", "nlist", "rerank", "factory"), "hnsw": ("ef_search", "factory"),
                   "flat": ("factory",)}


def check_sidecar(sidecar: Any, path: Path) -> None:
    """Raises StoreError naming what a sidecar lacks (a hand-edited, damaged or foreign file)."""
    fix = f"rebuild the index with `cytostore index build --store {path.parent.parent.parent}`"
    if not isinstance(sidecar, dict):
        raise StoreError(f"{path} is not an index sidecar (a JSON object); {fix}")
    problems = [f"{k} (missing)" if k not in sidecar else f"{k} (not {t.__name__})"
                for k, t in REQUIRED.items() if k not in sidecar or not isinstance(sidecar[k], t)
                or (t is int and isinstance(sidecar[k], bool))]
    if not problems:
        problems = [f"params.{k} (missing)" for k in REQUIRED_PARAMS.get(sidecar["kind"], ())
                    if k not in sidecar["params"]]
    if problems:
        raise StoreError(f"index sidecar {path} lacks or mistypes {', '.join(problems)}; {fix}")


def build_key(sidecar: dict) -> str:
    """The id of the files a sidecar describes (older sidecars: their build time and uid digest)."""
    return sidecar.get("build_id") or f"{sidecar.get('built_at')}:{sidecar.get('uid_digest')}"


def file_sha256(path: Path) -> str:
    """``sha256:<hex>`` of a file, as index sidecars record it."""
    return "sha256:" + digest(path)


def write_files(folder: Path, index, uids: np.ndarray, rowids: np.ndarray | None, sidecar: dict) -> dict:
    """Writes the index, uids, rowids and then the sidecar, each by atomic rename; returns the sidecar."""
    faiss = faiss_module()
    tmp = folder / f".{INDEX_FILE}.{os.getpid()}.tmp"
    faiss.write_index(index, str(tmp))
    sidecar["index_bytes"] = tmp.stat().st_size
    sidecar["index_sha256"] = file_sha256(tmp)
    os.replace(tmp, folder / INDEX_FILE)
    for name, arr in ((UIDS_FILE, uids), (ROWIDS_FILE, rowids)):
        if arr is None:
            (folder / name).unlink(missing_ok=True)
            continue
        tmp = folder / f".{name}.{os.getpid()}.tmp"
        with open(tmp, "wb") as fh:
            np.save(fh, np.asarray(arr).astype("<i8"))
        os.replace(tmp, folder / name)
    sidecar["files"] = {"index": INDEX_FILE, "uids": UIDS_FILE, **({"rowids": ROWIDS_FILE} if rowids is not None else {})}
    tmp = folder / f".{SIDECAR}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(sidecar, indent=1, default=str))
    os.replace(tmp, folder / SIDECAR)
    return sidecar


def read_index_file(folder: Path, sidecar: dict, fix: str):
    """Reads ``index.faiss``; a missing, truncated or garbage file is a StoreError naming the fix."""
    path = folder / INDEX_FILE
    try:
        size = path.stat().st_size
    except OSError as e:
        raise StoreError(f"{path} is missing ({e.strerror}); rebuild with `{fix}`") from e
    want = sidecar.get("index_bytes")
    if want is not None and size != want:
        raise StoreError(f"{path} has {size} bytes, its sidecar says {want} (truncated or replaced); "
                         f"rebuild with `{fix}`")
    try:
        index = faiss_module().read_index(str(path))
    except RuntimeError as e:
        raise StoreError(f"{path} is not a readable FAISS index ({str(e).splitlines()[0][:120]}); "
                         f"rebuild with `{fix}`") from e
    if index.ntotal != sidecar["rows"]:
        raise StoreError(f"{folder}: index holds {index.ntotal} vectors, its sidecar says {sidecar['rows']} "
                         f"(an interrupted build?); rebuild with `{fix}`")
    return index


def read_ids(folder: Path, sidecar: dict, fix: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(indexed uids, their stable row ids or None), checked against the sidecar."""
    try:
        uids = np.load(folder / UIDS_FILE, allow_pickle=False).astype(np.int64)
        rowids = (np.load(folder / ROWIDS_FILE, allow_pickle=False).astype(np.int64)
                  if "rowids" in sidecar.get("files", {}) else None)
    except (OSError, ValueError) as e:
        raise StoreError(f"{folder}: {UIDS_FILE}/{ROWIDS_FILE} missing or unreadable ({e}); rebuild with `{fix}`") from e
    if len(uids) != sidecar["rows"] or uid_digest(uids) != sidecar["uid_digest"] or (
            rowids is not None and len(rowids) != len(uids)):
        raise StoreError(f"{folder} holds files from different builds (an interrupted build?); rebuild with `{fix}`")
    return uids, rowids
