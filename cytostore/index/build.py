"""Building, updating in place and verifying the index of a cell table."""

from __future__ import annotations

import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from cytostore.errors import InputError, StoreError
from cytostore.index.bound import _uid_delta, delta, load_files, provenance_diff
from cytostore.index.faiss import (IndexParams, add_vectors, can_remove, faiss_module, fill_index, gpu_available,
                                   ivf_imbalance, prepare, remove_ids, resolve_kind, uid_digest)
from cytostore.index.files import (FORMAT_VERSION, INDEX_FILE, as_store, file_sha256, fingerprint, index_dir,
                                   new_build_id, pin_version, read_index_file, read_sidecar_at, rebuild_command,
                                   same_table, schema_provenance, stable_row_ids, table_dim, table_id, update_command,
                                   write_files)
from cytostore.store import CellStore, embedding_matrix
from cytostore.store.check import names_missing_files


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@names_missing_files
def build_index(store: CellStore | str | Path, encoder: str | None = None, kind: str = "auto", device: str = "cpu",
                params: IndexParams | None = None, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Builds the index of a cell table and writes it with its sidecar; pins the indexed table version.

    Args:
        store: a CellStore or its path.
        encoder: which encoder table; default the only (or default) one.
        kind: auto (exact below ``params.exact_max`` cells, else IVF-PQ), flat, ivf-pq or hnsw.
        device: cpu, cuda or auto (cuda needs a GPU build of faiss; else cpu with a note).
        params: layout, tuning and rebuild thresholds (its ``kind`` is overridden by ``kind``).
        progress: called with (rows added, total rows).

    Returns:
        The sidecar written (a dict).
    """
    from cytostore.store.lock import WriterLock

    t0 = time.perf_counter()
    store = as_store(store)
    params = replace(params or IndexParams(), kind=kind)
    if params.metric not in {"cosine", "ip"}:
        raise InputError(f"unknown metric {params.metric!r}; use cosine or ip")
    if device not in {"auto", "cpu"} and not device.startswith("cuda"):
        raise InputError(f"unknown device {device!r}; use auto, cpu or cuda")
    table = store.resolve(encoder)
    ds = store.dataset(table)  # one version, read throughout
    n, dim = ds.count_rows(), table_dim(ds)
    if n == 0:
        raise StoreError(f"table {table!r} has no cells to index; run `cytostore ingest` first")
    chosen = resolve_kind(kind, n, params)
    device = ("cuda" if gpu_available() else "cpu") if device == "auto" else device
    train = _sample(ds, n, params) if chosen != "flat" else None
    stable = stable_row_ids(ds)
    rowid_parts: list[np.ndarray] = []

    def batches() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        rowid_parts.clear()
        for b in ds.to_batches(columns=["uid", "embedding"], batch_size=params.batch_size, with_row_id=stable):
            if stable:
                rowid_parts.append(b.column("_rowid").to_numpy().astype(np.int64))
            yield (b.column("uid").to_numpy().astype(np.int64),
                   prepare(embedding_matrix(b.column("embedding")), params.metric))

    folder = index_dir(store, table)
    folder.mkdir(parents=True, exist_ok=True)
    lock = WriterLock(store.root, f"index.{table}").acquire(wait=False)
    try:
        index, info, uids = fill_index(chosen, dim, n, batches, train, params, device,
                                       (lambda done: progress(done, n)) if progress else None)
        if len(np.unique(uids)) != len(uids):
            raise StoreError(f"table {table!r} holds duplicate uids; it cannot be indexed by uid")
        rowids = np.concatenate(rowid_parts) if stable and rowid_parts else None
        enc = schema_provenance(ds).get("encoder", {})
        notes = list(info["notes"])
        if not stable:
            notes.append("the table has no stable row ids (written by an older cytostore): changes since the build "
                         "are found by comparing uids, and content changes under the same key go unseen")
        note = pin_version(store, table, int(ds.version))
        if note:
            notes.append(note)
        sidecar = {
            "format": "cytostore-index", "format_version": FORMAT_VERSION, "build_id": new_build_id(),
            "table": table, "table_id": table_id(ds), "table_fingerprint": fingerprint(ds),
            "table_version": int(ds.version), "built_table_version": int(ds.version),
            "max_rowid": int(rowids.max()) if rowids is not None else None,
            "rows": int(n), "rows_at_build": int(n), "updated_rows": 0, "updates": [], "dim": dim,
            "uid_digest": uid_digest(uids),
            "encoder": {"name": enc.get("name"), "weights_sha256": enc.get("weights_sha256")},
            "metric": params.metric, "kind": chosen, "requested_kind": kind,
            "params": {k: v for k, v in info.items() if k not in {"notes", "kind", "metric", "device", "tuning"}},
            "tuning": info.get("tuning"), "device": info["device"],
            "rebuild_threshold": {"max_update_fraction": params.max_update_fraction,
                                  "max_imbalance_growth": params.max_imbalance_growth,
                                  "imbalance_at_build": ivf_imbalance(index)},
            "faiss_version": faiss_module().__version__, "built_at": _now(),
            "build_seconds": round(time.perf_counter() - t0, 2), "notes": notes, "build_params": asdict(params),
        }
        write_files(folder, index, uids, rowids, sidecar)
    finally:
        lock.release()
    return sidecar


def _sample(ds, n: int, params: IndexParams) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(params.seed)
    pos = rng.choice(n, size=min(n, params.train_size), replace=False)
    chunks_u, chunks_x = [], []
    for start in range(0, len(pos), params.batch_size):  # bounded takes; then restore the random order
        part = np.sort(pos[start:start + params.batch_size])
        t = ds.take(part.tolist(), columns=["uid", "embedding"])
        perm = rng.permutation(len(part))
        chunks_u.append(t.column("uid").to_numpy()[perm])
        chunks_x.append(prepare(embedding_matrix(t.column("embedding")), params.metric)[perm])
    return np.concatenate(chunks_u).astype(np.int64), np.ascontiguousarray(np.concatenate(chunks_x))


def read_sidecar(store: CellStore | str | Path, encoder: str | None = None) -> dict[str, Any] | None:
    """The sidecar of a table's index, or None when the table has no index."""
    store = as_store(store)
    return read_sidecar_at(index_dir(store, store.resolve(encoder)))


@names_missing_files
def update_index(store: CellStore | str | Path, encoder: str | None = None,
                 progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Adds the rows appended since the build to the index in place and removes deleted or changed ones.

    Flat and IVF-PQ indexes take ``add_with_ids`` and ``remove_ids``; an HNSW graph
    cannot remove, so its deleted rows stay filtered at search (a changed row there
    needs a rebuild). Past the rebuild threshold the sidecar records (share of rows
    changed since the build, or IVF list sizes grown too skewed) nothing is written
    and the answer says to rebuild.

    Returns:
        ``{"action": "updated" | "none" | "rebuild", "added", "removed", "reason", "fix", "sidecar"}``.
    """
    from cytostore.store.lock import WriterLock

    t0 = time.perf_counter()
    store = as_store(store)
    table = store.resolve(encoder)
    folder = index_dir(store, table)
    fix = rebuild_command(store, table)
    lock = WriterLock(store.root, f"index.{table}").acquire(wait=False)
    try:
        sidecar = read_sidecar_at(folder)
        if sidecar is None:
            raise StoreError(f"table {table!r} has no index to update; build one with `{fix}`")
        ds = store.dataset(table)
        out: dict[str, Any] = {"table": table, "table_version": int(ds.version), "added": 0, "removed": 0,
                               "fix": fix, "reason": None}
        diffs = provenance_diff(sidecar, schema_provenance(ds))
        same, why = same_table(store, table, ds, sidecar)
        if diffs or same is False:
            return {**out, "action": "rebuild", "reason": "; ".join(diffs) or why}
        files = load_files(folder, sidecar, fix)
        index = faiss_module().clone_index(files.index)  # a private copy: searches keep using the loaded one
        stable = same is True and files.rowids is not None and stable_row_ids(ds)
        d = delta(ds, files, True) if stable else _uid_delta(ds, files)
        changed = d.get("changed", np.zeros(0, np.int64))
        removable = can_remove(sidecar["kind"])
        remove = d["deleted"] if removable else np.zeros(0, np.int64)
        if not removable and len(changed):
            return {**out, "action": "rebuild",
                    "reason": f"{len(changed)} rows changed content and a {sidecar['kind']} index cannot remove vectors"}
        if not len(d["added"]) and not len(remove):
            return {**out, "action": "none", "reason": "no rows added, changed or deleted since the index was made",
                    "sidecar": sidecar}
        thr = sidecar.get("rebuild_threshold", {})
        total = int(sidecar.get("updated_rows", 0)) + len(d["added"]) + len(remove)
        base = int(sidecar.get("rows_at_build", sidecar["rows"]))
        limit = float(thr.get("max_update_fraction", IndexParams.max_update_fraction))
        if total > limit * base:
            return {**out, "action": "rebuild", "reason": (f"{total} rows added or removed since the build, more than "
                                                          f"{limit:.0%} of the {base} rows it was built on")}
        removed = remove_ids(index, sidecar["kind"], remove)
        metric = sidecar["metric"]
        added_uids = d["added"]
        for start in range(0, len(added_uids), 16_384):
            part = added_uids[start:start + 16_384]
            x = _vectors(ds, d, part, start, metric)
            add_vectors(index, part, x)
            if progress is not None:
                progress(start + len(part), len(added_uids))
        grown = ivf_imbalance(index)
        at_build = thr.get("imbalance_at_build")
        if grown is not None and at_build and grown > float(thr.get("max_imbalance_growth", 1.5)) * at_build:
            return {**out, "action": "rebuild", "reason": (f"IVF list sizes grew skewed (imbalance {grown:.2f} vs "
                                                          f"{at_build:.2f} at the build)")}
        keep = ~np.isin(files.uids, remove)
        uids = np.concatenate([files.uids[keep], added_uids])
        rowids = None
        if stable:
            rowids = np.concatenate([files.rowids[keep], d["added_rowids"]])
        new = {**sidecar, "build_id": new_build_id(), "table_version": int(ds.version),
               "table_fingerprint": fingerprint(ds), "table_id": table_id(ds) or sidecar.get("table_id"),
               "max_rowid": int(max(int(sidecar.get("max_rowid") or -1), int(rowids.max()) if len(rowids) else -1))
               if stable else None,
               "rows": int(len(uids)), "uid_digest": uid_digest(uids), "updated_rows": total,
               "kept_deleted": int(len(d["deleted"]) - removed),  # in an HNSW graph, filtered at search
               "updates": [*sidecar.get("updates", []), {"at": _now(), "table_version": int(ds.version),
                                                         "added": int(len(added_uids)), "removed": removed,
                                                         "seconds": round(time.perf_counter() - t0, 2)}][-20:],
               "rebuild_threshold": {**thr, "imbalance_now": grown}}
        if not stable:
            new.pop("max_rowid", None)
            new["notes"] = [*sidecar.get("notes", []), "updated by comparing uids (no stable row ids)"][-10:]
        note = pin_version(store, table, int(ds.version))
        write_files(folder, index, uids, rowids, new)
    finally:
        lock.release()
    return {**out, "action": "updated", "added": int(len(added_uids)), "removed": removed, "changed": int(len(changed)),
            "kept_filtered": int(len(d["deleted"]) - removed), "seconds": round(time.perf_counter() - t0, 2),
            "notes": [note] if note else [], "sidecar": new}


def _vectors(ds, d: dict, part: np.ndarray, start: int, metric: str) -> np.ndarray:
    if "added_rowids" in d:
        rows = d["added_rowids"][start:start + len(part)]
        t = ds._take_rows(rows.tolist(), columns=["embedding"])  # by stable row id
    else:
        order = np.argsort(d["table_uids"], kind="stable")
        off = order[np.searchsorted(d["table_uids"][order], part)]
        t = ds.take(off.tolist(), columns=["embedding"])
    if t.num_rows != len(part):
        raise StoreError("the table changed during the index update; run it again")
    return prepare(embedding_matrix(t.column("embedding")), metric)


@names_missing_files
def verify_index(store: CellStore | str | Path, encoder: str | None = None) -> dict[str, Any]:
    """Says whether a table's index matches the table, and what is stale or broken if not.

    Opens ``index.faiss`` itself (a deleted, truncated or garbage file is broken,
    never fresh) and checks the table identity, the encoder and the delta.

    Returns:
        A dict with ``fresh`` (bool), ``exists``, ``broken``, ``added`` (rows to index),
        ``deleted`` (indexed rows gone), ``changed`` (rows whose content changed under
        the same key), ``provenance_changed``, ``recreated``, ``problems`` and ``fix``.
    """
    store = as_store(store)
    table = store.resolve(encoder)
    ds = store.dataset(table)
    folder = index_dir(store, table)
    fix = rebuild_command(store, table)
    out: dict[str, Any] = {"table": table, "index_dir": str(folder), "table_version": int(ds.version),
                           "rows_table": int(ds.count_rows()), "exists": False, "fresh": False, "broken": False,
                           "added": 0, "deleted": 0, "changed": 0, "provenance_changed": False, "recreated": False,
                           "problems": [], "fix": fix}
    sidecar = read_sidecar_at(folder)
    if sidecar is None:
        out["problems"].append(f"table {table!r} has no index")
        return out
    out.update(exists=True, kind=sidecar["kind"], index_table_version=sidecar["table_version"],
               rows_indexed=sidecar["rows"], built_at=sidecar["built_at"], build_id=sidecar.get("build_id"))
    try:
        index = read_index_file(folder, sidecar, fix)
        if sidecar.get("index_sha256") and file_sha256(folder / INDEX_FILE) != sidecar["index_sha256"]:
            raise StoreError(f"{folder / INDEX_FILE} differs from the file its sidecar describes (sha256); "
                             f"rebuild with `{fix}`")
        del index
        files = load_files(folder, sidecar, fix)
    except StoreError as e:
        out.update(broken=True)
        out["problems"].append(str(e))
        return out
    diffs = provenance_diff(sidecar, schema_provenance(ds))
    if diffs:
        out["provenance_changed"] = True
        out["problems"] += ["provenance changed: " + d for d in diffs]
    same, why = same_table(store, table, ds, sidecar)
    if same is False:
        out["recreated"] = True
        out["problems"].append(why)
        return out
    if same is None:
        out["note"] = why
    d = delta(ds, files, same is True)
    changed = d.get("changed", np.zeros(0, np.int64))
    out.update(added=int(len(d["added"]) - len(changed)), changed=int(len(changed)),
               deleted=int(len(np.setdiff1d(d["deleted"], changed))), mode="uids" if "table_uids" in d else "rowids")
    kept = int(sidecar.get("kept_deleted", 0)) if sidecar["kind"] == "hnsw" else 0
    if kept and out["deleted"] == kept:  # an update already handled them: the graph keeps them, search filters them
        out["deleted"] = 0
        out["note"] = f"{kept} deleted cells stay in the HNSW graph, filtered at search; rebuild to drop them"
    if out["added"]:
        out["problems"].append(f"{out['added']} cells added since the index was made (searched exactly until updated)")
    if out["changed"]:
        out["problems"].append(f"{out['changed']} cells changed content under the same key (old copies filtered, "
                               "new ones searched exactly)")
    if out["deleted"]:
        out["problems"].append(f"{out['deleted']} indexed cells deleted since (filtered out of results)")
    if out["added"] or out["changed"] or out["deleted"]:
        out["update"] = update_command(store, table)
    if not out["problems"] and sidecar["table_version"] != out["table_version"] and not out.get("note"):
        out["note"] = (f"table version moved {sidecar['table_version']} -> {out['table_version']} "
                       "without changing its cells")
    out["fresh"] = not out["problems"]
    return out
