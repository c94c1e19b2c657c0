"""The stages both ingest engines share: rows to Arrow, failure bookkeeping, and the
finiteness check of embeddings before they are committed."""

from __future__ import annotations

import datetime as dt
from typing import Any

import numpy as np
import pyarrow as pa

from cytostore.errors import EncoderError
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


FLOAT16_MAX = 65504.0  # largest finite float16
BROKEN_FRACTION = 0.5  # an encoder giving unusable output for more than this share of cells is stopped ...
BROKEN_MIN_CELLS = 256  # ... once this many cells were checked (or at once when the whole first batch is)


def embedding_problems(emb: np.ndarray, dtype: str | pa.DataType) -> list[str | None]:
    """Why each embedding cannot be stored (None: it can): NaN/inf, or beyond float16's range.

    Args:
        emb: float32 (N, dim) embeddings from the encoder.
        dtype: the stored dtype, "float16"/"float32" or the Arrow type.
    """
    finite = np.isfinite(emb).all(axis=1)
    over = np.zeros(len(emb), bool)
    if dtype == "float16" or (isinstance(dtype, pa.DataType) and dtype == pa.float16()):
        over = finite & (np.abs(np.where(np.isfinite(emb), emb, 0)).max(axis=1, initial=0) > FLOAT16_MAX)
    return [None if ok and not o else
            ("the encoder gave NaN or infinite features for this cell; check the encoder's weights" if not ok else
             f"a feature's magnitude exceeds {FLOAT16_MAX:g}, the float16 limit; ingest into a float32 table "
             "(--float32)") for ok, o in zip(finite, over)]


def drop_unstorable(out: dict[str, Any], emb: np.ndarray, dtype: str | pa.DataType) -> np.ndarray:
    """Moves the cells of an embedded task output ``out`` whose embedding cannot be stored into
    its failures (stage "embed"); returns the embeddings of the cells kept."""
    why = embedding_problems(emb, dtype)
    if not any(why):
        return emb
    keep = np.array([w is None for w in why])
    for row, w in zip(out["cells"], why):
        if w is not None:
            out["failures"].append(SourceFailure(row.get("source_ref") or row["image"], w, "embed",
                                                 row["slide_id"], row["cell_id"], row["uid"]))
    out["cells"] = [r for r, k in zip(out["cells"], keep) if k]
    out["failed_cells"] = out.get("failed_cells", 0) + int((~keep).sum())
    return emb[keep]


class EmbeddingGuard:
    """Checks embeddings before commit: unstorable cells become failures, and a broken encoder
    (the whole first batch, or more than half the cells, unusable) stops the run."""

    def __init__(self, fails: FailureLog, dtype: str, encoder: str):
        self.fails, self.dtype, self.encoder = fails, dtype, encoder
        self.checked = self.bad = 0
        self.last_reason = ""

    def check(self, rows: list[dict[str, Any]], emb: np.ndarray) -> tuple[list[dict[str, Any]], np.ndarray]:
        """The rows (and embeddings) that can be stored; the others are recorded as failures."""
        out = {"cells": rows, "failures": [], "failed_cells": 0}
        emb = drop_unstorable(out, emb, self.dtype)
        self.fails.add(out["failures"], out["failed_cells"])
        self.account(len(rows), out["failed_cells"], out["failures"][0].reason if out["failures"] else "")
        return out["cells"], emb

    def account_failures(self, stored: int, failures: list[SourceFailure]) -> None:
        """``account`` from a written batch: ``stored`` rows kept and its failures (Ray driver)."""
        bad = [f for f in failures if f.stage == "embed"]
        self.account(stored + len(bad), len(bad), bad[0].reason if bad else "")

    def account(self, checked: int, bad: int, reason: str = "") -> None:
        """Counts ``bad`` unusable embeddings among ``checked``; raises EncoderError when the encoder is broken."""
        first = self.checked == 0
        self.checked += checked
        self.bad += bad
        self.last_reason = reason or self.last_reason
        whole_first = first and checked > 0 and bad == checked
        if whole_first or (self.checked >= BROKEN_MIN_CELLS and self.bad > BROKEN_FRACTION * self.checked):
            self.fails.flush()
            fix = ("store float32 embeddings (--float32)" if "float16" in self.last_reason
                   else "check its weights (--weights), or try --precision fp32")
            raise EncoderError(f"encoder {self.encoder} is broken: {self.bad} of the {self.checked} cells embedded so "
                               f"far have unusable features ({self.last_reason}); the run stopped (cells committed "
                               f"before are kept): {fix}")


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
