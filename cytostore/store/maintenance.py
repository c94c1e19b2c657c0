"""Store upkeep: optimize (compact + clean up), gc (old versions and orphan files of every
table), delete cells (naming the derived artefacts made stale), and the pins kept.

Each operation that writes takes the writer lock of the table it writes; readers go on.
Nothing here rebuilds a derived artefact: ``delete`` only names what is now stale.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from cytostore.errors import InputError, StoreError
from cytostore.store import layout, pins, schema
from cytostore.store.cells import CELLS_PREFIX, CellStore, folder_bytes, live_bytes
from cytostore.store.filters import check_where
from cytostore.store.lock import WriterLock
from cytostore.store.writer import GRACE, CellWriter, CommitPolicy, cleanup, compact

DERIVED = ("prototypes", "predictions", "umap")  # Lance tables written by cytostore.store.derived
FAILURES = "failures"


def table_stats(uri: str) -> dict[str, Any]:
    """Fragments, versions, rows and bytes (live data files, whole folder, ``_versions``) of a Lance table."""
    import lance

    ds = lance.dataset(uri)
    return {"version": int(ds.version), "fragments": len(ds.get_fragments()), "versions": len(ds.versions()),
            "rows": int(ds.count_rows()), "live_bytes": live_bytes(ds), "folder_bytes": folder_bytes(uri),
            "versions_bytes": folder_bytes(f"{uri}/_versions")}


def lance_tables(store: CellStore) -> list[tuple[str, str | None, str]]:
    """Every committed Lance table of the store: (kind, name, uri)."""
    out: list[tuple[str, str | None, str]] = []
    for kind in ("cells", "failures", *DERIVED):
        if "{name}" in layout.kind(kind).pattern:
            out += [(kind, n, store.uri(kind, n)) for n in store.names(kind)]
        elif store.has(kind):
            out.append((kind, None, store.uri(kind)))
    return out


def _lock(store: CellStore, kind: str, name: str | None) -> WriterLock | None:
    # The same lock names the writers take: cells.<t> (ingest), failures, <kind>.<name> (derived).
    if layout.is_uri(store.root):
        return None
    lock_name = FAILURES if kind == "failures" else f"{kind}.{name}"
    return WriterLock(store.root, lock_name).acquire(wait=kind != "cells", poll_s=0.05, timeout_s=600)


def optimize(store: CellStore, encoder: str | None = None, grace: dt.timedelta = GRACE) -> dict[str, Any]:
    """Compacts the cell table(s), then removes unpinned versions older than ``grace``.

    Returns:
        Per table: fragments, versions and bytes before and after.
    """
    names = [store.resolve(encoder)] if encoder else store.tables()
    out = []
    for table in names:
        uri = store.table_uri(table)
        writer = CellWriter(store, table)  # the writer lock: no ingest runs meanwhile
        try:
            before = table_stats(uri)
            compacted = compact(uri, CommitPolicy().commit_rows, None)
            if compacted:
                writer.record_checksums()
            removed = cleanup(uri, grace)
            after = table_stats(uri)
        finally:
            writer.release()
        out.append({"table": table, "compacted": compacted, "before": before, "after": after, **removed,
                    "pins": pins.pins(uri)})
    return {"store": store.root, "grace_seconds": grace.total_seconds(), "tables": out}


def gc(store: CellStore, grace: dt.timedelta = GRACE) -> dict[str, Any]:
    """Removes unpinned versions older than ``grace`` of every Lance table in the store, and
    data files no version references (fragments of killed Ray runs) older than ``grace``.

    Returns:
        Per table: bytes freed and the pins kept; totals.
    """
    out = []
    for kind, name, uri in lance_tables(store):
        lock = _lock(store, kind, name)
        try:
            before = folder_bytes(uri)
            removed = cleanup(uri, grace)
            orphans = remove_orphans(uri, grace)
            after = folder_bytes(uri)
        finally:
            if lock is not None:
                lock.release()
        freed = (before - after) if before is not None and after is not None else removed["bytes_removed"]
        out.append({"kind": kind, "name": name, "bytes_freed": freed, "old_versions": removed["old_versions"],
                    **orphans, "pins": pins.pins(uri)})
    out += _uncommitted_folders(store, grace)
    return {"store": store.root, "grace_seconds": grace.total_seconds(), "tables": out,
            "bytes_freed": sum(t["bytes_freed"] for t in out)}


def remove_orphans(uri: str, grace: dt.timedelta = GRACE) -> dict[str, int]:
    """Deletes the data files of a local Lance table that no remaining version references and
    that are older than ``grace`` (younger ones may belong to a write in flight)."""
    import lance

    data = Path(uri) / "data"
    if layout.is_uri(uri) or not data.is_dir():
        return {"orphan_files_removed": 0, "orphan_files_kept": 0}
    ds = lance.dataset(uri)
    referenced: set[str] = set()
    for v in ds.versions():
        for frag in lance.dataset(uri, version=v["version"]).get_fragments():
            referenced.update(f.path for f in frag.metadata.files)
    cutoff = time.time() - grace.total_seconds()
    removed = kept = 0
    for p in data.iterdir():
        if p.is_file() and p.name not in referenced:
            if p.stat().st_mtime < cutoff:
                p.unlink()
                removed += 1
            else:
                kept += 1
    return {"orphan_files_removed": removed, "orphan_files_kept": kept}


def _uncommitted_folders(store: CellStore, grace: dt.timedelta) -> list[dict[str, Any]]:
    # A killed first Ray ingest leaves cells.<t>.lance/data with no _versions: files only.
    if layout.is_uri(store.root):
        return []
    out = []
    cutoff = time.time() - grace.total_seconds()
    for folder in Path(store.root).glob(layout.kind("cells").pattern.format(name="*")):
        if (folder / "_versions").is_dir() or not folder.is_dir():
            continue
        table = folder.name[len(CELLS_PREFIX):-len(".lance")]
        writer = CellWriter(store, table)
        try:
            files = [p for p in folder.rglob("*") if p.is_file()]
            old = [p for p in files if p.stat().st_mtime < cutoff]
            freed = sum(p.stat().st_size for p in old)
            for p in old:
                p.unlink()
        finally:
            writer.release()
        out.append({"kind": "cells", "name": table, "bytes_freed": freed, "old_versions": 0,
                    "orphan_files_removed": len(old), "orphan_files_kept": len(files) - len(old), "pins": {}})
    return out


def slides_filter(slides: Sequence[str]) -> str:
    """A SQL filter matching the cells of ``slides``."""
    if not slides:
        raise StoreError("no slide ids given")
    return "slide_id IN (" + ", ".join("'" + s.replace("'", "''") + "'" for s in slides) + ")"


def delete_cells(store: CellStore, where: str, encoder: str | None = None,
                 dry_run: bool = False) -> dict[str, Any]:
    """Deletes the cells matching ``where`` from the cell table(s) under their writer locks.

    Args:
        store: the store.
        where: SQL filter on the cell table (``slides_filter`` builds one from slide ids).
        encoder: one table; default every cell table of the store.
        dry_run: count and name what would be stale, delete nothing.

    Returns:
        Per table: cells deleted, the new version, and the derived artefacts now stale
        (index, umap, prediction sets holding deleted cells). Nothing is rebuilt.
    """
    if not check_where(where):
        raise InputError("give a filter of the cells to delete (--where SQL or --slide ID)")
    names = [store.resolve(encoder)] if encoder else store.tables()
    if not names:
        raise StoreError(f"store {store.root} holds no cell tables; nothing to delete")
    out = []
    for table in names:
        writer = CellWriter(store, table)
        try:
            try:
                gone = store.cells(columns=["uid"], where=where, encoder=table).column("uid").to_numpy()
            except StoreError as e:
                raise StoreError(f"cannot delete with --where {where!r}: {e}") from e
            if not dry_run and len(gone):
                writer.delete(where)
            version = int(store.dataset(table).version)
        finally:
            writer.release()
        out.append({"table": table, "cells": int(len(gone)), "version": version, "dry_run": dry_run,
                    "stale": stale_artefacts(store, table, version, gone) if len(gone) else []})
    return {"store": store.root, "where": where, "tables": out, "cells": sum(t["cells"] for t in out)}


def stale_artefacts(store: CellStore, table: str, version: int, gone: np.ndarray) -> list[dict[str, Any]]:
    """The derived artefacts of ``table`` that deleting the cells ``gone`` makes stale."""
    import lance

    out = []
    sidecar = Path(store.uri("index", table)) / "sidecar.json"
    if not layout.is_uri(store.root) and sidecar.is_file():
        built = json.loads(sidecar.read_text()).get("table_version")
        if built is None or int(built) <= version:  # built before the deletion (or, dry run, before it would be)
            out.append({"kind": "index", "name": table, "built_from_version": built,
                        "fix": f"cytostore index build --store {store.root} --encoder {table}"})
    if store.has("umap", table):
        meta = schema.read_metadata(lance.dataset(store.uri("umap", table)).schema)
        out.append({"kind": "umap", "name": table, "built_from_version": meta.get("table_version"),
                    "fix": f"cytostore map --store {store.root} --encoder {table}"})
    for name in store.names("predictions"):
        uids = lance.dataset(store.uri("predictions", name)).to_table(columns=["uid"]).column("uid").to_numpy()
        n = int(np.isin(uids, gone).sum())
        if n:
            out.append({"kind": "predictions", "name": name, "deleted_cells_predicted": n,
                        "fix": f"cytostore fewshot predict --store {store.root} --name {name}"})
    return out


def list_pins(store: CellStore) -> dict[str, Any]:
    """Every pinned version in the store: table, version, holder."""
    rows = []
    for kind, name, uri in lance_tables(store):
        for holder, version in sorted(pins.pins(uri).items()):
            rows.append({"kind": kind, "name": name, "version": version, "holder": holder})
    return {"store": store.root, "pins": rows}


def check(store: CellStore, table: str | None = None, drop_damaged: bool = False) -> dict[str, Any]:
    """`cytostore store check`: verifies the data files against their checksums (``cytostore.store.check``).

    Args:
        store: the store.
        table: one cell table; default every one.
        drop_damaged: also remove the fragments of damaged files in one commit per table (under its
            writer lock), so that the table reads again and a re-run of the ingest re-embeds those cells.

    Returns:
        ``cytostore.store.check.verify``'s report; with ``drop_damaged``, per table ``dropped_rows``.
    """
    from cytostore.store.check import drop_damaged as drop, verify

    report = verify(store, table)
    if not drop_damaged:
        return report
    for t in report["tables"]:
        ids = sorted({d["fragment"] for d in t["damaged"] if "fragment" in d})
        if not ids:
            continue
        writer = CellWriter(store, t["table"])
        try:
            t["dropped_rows"] = drop(store, t["table"], ids)
        finally:
            writer.release()
    return report
