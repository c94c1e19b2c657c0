"""The stages both ingest engines share: rows to Arrow, failure bookkeeping."""

from __future__ import annotations

import datetime as dt
from typing import Any

import numpy as np
import pyarrow as pa

from cytostore.ingest.config import IngestReport
from cytostore.keys import key_hashes
from cytostore.sources.base import SourceFailure
from cytostore.store import CellStore, schema
from cytostore.store.writer import append_failures, delete_failures


def failed_cells(out: dict[str, Any]) -> int:
    """Cells an image task's output lost: those its crops failed on, plus what it counted itself."""
    return out.get("failed_cells", 0) + sum(1 for f in out["failures"] if f.stage == "crop")


class FailureLog:
    """The failures of one ingest run: counted in its report (the first 20 listed),
    stored once per (where, reason) in the store's failures table at each commit
    (``flush`` is hooked to the writer's commits)."""

    def __init__(self, store: CellStore, table: str, report: IngestReport):
        self.store, self.table, self.report = store, table, report
        self.known = {(r["where"], r["reason"]) for r in store.failures().select(["where", "reason"]).to_pylist()}
        self.pending: list[SourceFailure] = []

    def add(self, failures: list[SourceFailure], cells: int) -> None:
        self.report.cells_failed += cells
        for f in failures:
            if len(self.report.failures) < 20:
                self.report.failures.append({"where": f.where, "stage": f.stage, "reason": f.reason})
        self.pending.extend(failures)

    def flush(self) -> None:
        new = [f for f in self.pending if (f.where, f.reason) not in self.known]
        if new:
            self.known.update((f.where, f.reason) for f in new)
            append_failures(self.store, failures_to_arrow(new, self.table, self.report.run_id))
        self.pending.clear()


def clear_resolved_failures(store: CellStore, table: str) -> None:
    """Drops failure rows of cells that a later run did ingest."""
    fails = store.failures()
    if fails.num_rows == 0:
        return
    uids = [u for u, t in zip(fails.column("uid").to_pylist(), fails.column("table").to_pylist())
            if u is not None and t == table]
    if not uids:
        return
    present = store.stored_uids(table).contains(np.asarray(uids, dtype=np.int64))
    done = [u for u, p in zip(uids, present) if p]
    if done:
        delete_failures(store, f"\"table\" = '{table}' AND uid IN ({', '.join(str(u) for u in done)})")


def to_arrow(rows: list[dict[str, Any]], emb: np.ndarray, target: pa.Schema, run_id: str) -> pa.Table:
    n = len(rows)
    cols: dict[str, Any] = {}
    base = set(schema.column_names("cells"))
    for f in target:
        if f.name == "embedding":
            np_dtype = np.float16 if f.type.value_type == pa.float16() else np.float32
            flat = pa.array(emb.astype(np_dtype, copy=False).reshape(-1))
            cols[f.name] = pa.FixedSizeListArray.from_arrays(flat, f.type.list_size)
        elif f.name == "run_id":
            cols[f.name] = pa.array([run_id] * n, f.type)
        elif f.name == "key_hash":
            cols[f.name] = pa.array(key_hashes([r["slide_id"] for r in rows], [r["cell_id"] for r in rows]), f.type)
        elif f.name in base:
            cols[f.name] = pa.array([r[f.name] for r in rows], f.type)
        else:
            values = [r["extra"].get(f.name) for r in rows]
            try:
                cols[f.name] = pa.array(values, f.type)
            except (pa.ArrowInvalid, pa.ArrowTypeError):
                cols[f.name] = pa.array([None if v is None else str(v) for v in values]).cast(f.type, safe=False)
    return pa.Table.from_pydict(cols, schema=target)


def failures_to_arrow(fails: list[SourceFailure], table: str, run_id: str) -> pa.Table:
    now = dt.datetime.now(dt.timezone.utc)
    target = schema.arrow_schema("failures")
    return pa.Table.from_pylist([
        {"table": table, "where": f.where, "slide_id": f.slide_id, "cell_id": f.cell_id, "uid": f.uid,
         "stage": f.stage, "reason": f.reason, "run_id": run_id, "time": now} for f in fails
    ], schema=target)
