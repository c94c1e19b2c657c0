"""Ingest: source -> crops -> encoder -> cell table, resumable and idempotent.

Rows are committed in batches (one Lance commit each), so a killed ingest loses
at most the batch in flight; a re-run skips every cell already stored.
"""

from __future__ import annotations

import datetime as dt
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa

from cytostore import schema
from cytostore.embed import CropSpec, Embedder, make_loader
from cytostore.encoders import create_encoder
from cytostore.errors import InputError
from cytostore.imaging import CropPolicy
from cytostore.lock import WriterLock
from cytostore.provenance import check_compatible, make_provenance
from cytostore.sources.base import SourceFailure
from cytostore.store import CELLS_PREFIX, CellStore, table_name_for


ENGINES = ("local", "ray")


@dataclass(frozen=True)
class IngestConfig:
    """How an ingest runs."""

    encoder: str = "efficientnet_lite0"  # registry, timm or hub name
    weights: str | None = None  # local checkpoint loaded into the encoder
    table: str | None = None  # cell-table name; default derived from the encoder name
    crop: CropPolicy = field(default_factory=CropPolicy)  # crop geometry
    detector: Any = None  # DetectorParams for sources without coordinates
    device: str = "auto"  # auto, cpu or cuda
    precision: str = "auto"  # auto (bf16/fp16 on GPU, fp32 on CPU), fp32, bf16, fp16
    batch_size: int = 64  # cells per forward pass
    workers: int = 0  # DataLoader worker processes reading and cropping
    embedding_dtype: str = "float16"  # stored dtype: float16 or float32
    commit_rows: int = 0  # rows per commit; 0 = one batch
    wait_for_lock: bool = False  # wait for another writer instead of exiting
    engine: str = "local"  # local (this process) or ray (a Ray Data pipeline)
    ray_address: str | None = None  # Ray cluster to join; None starts a local one
    gpus_per_worker: float = 0.0  # GPU share of each Ray encoder actor (0 = one GPU when there are GPUs)
    ray_actors: int = 0  # Ray encoder actors; 0 = one per GPU share, or half the CPU cores


@dataclass
class IngestReport:
    """What an ingest did."""

    store: str
    table: str
    run_id: str
    cells_added: int = 0
    cells_skipped: int = 0
    cells_failed: int = 0
    slides: int = 0
    seconds: float = 0.0
    cells_per_second: float = 0.0
    failures: list[dict[str, Any]] = field(default_factory=list)  # the first ones, for the summary
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def ingest(source, store_path: str | Path, config: IngestConfig = IngestConfig(),
           progress: Callable[[int, int, IngestReport], None] | None = None) -> IngestReport:
    """Embeds every cell of ``source`` into the store at ``store_path``.

    Args:
        source: a cytostore.sources source (see ``open_source``).
        store_path: store folder or URI; created when absent.
        config: encoder, crop, device, batching.
        progress: called after each work item with (cells done, images done, report).

    Returns:
        The report; ``cells_failed`` > 0 means some inputs were recorded as failures.
    """
    if config.batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {config.batch_size}")
    if config.workers < 0:
        raise InputError(f"--workers must be 0 or more, got {config.workers}")
    if config.engine not in ENGINES:
        raise InputError(f"unknown engine {config.engine!r}; use one of {', '.join(ENGINES)}")
    if config.engine == "ray":
        from cytostore.distributed import require_ray

        require_ray()
    if config.embedding_dtype not in schema.EMBEDDING_DTYPES:
        raise InputError(f"embedding dtype must be float16 or float32, got {config.embedding_dtype!r}")
    t0 = time.perf_counter()
    store = CellStore.create(store_path)
    encoder = create_encoder(config.encoder, config.weights)
    table = table_name_for(config.table or encoder.name)
    prov = make_provenance(encoder, config.crop, config.embedding_dtype)
    run_id = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    report = IngestReport(store=store.root, table=table, run_id=run_id)
    lock = None
    if "://" not in store.root:
        lock = WriterLock(store.root, CELLS_PREFIX + table).acquire(wait=config.wait_for_lock)
    else:
        report.notes.append("object-store URI: no writer lock; run one ingest per table at a time")
    try:
        if store.has_table(table):
            stored_prov = schema.read_metadata(store.dataset(table).schema)
            for d in check_compatible(table, stored_prov, prov):
                report.notes.append(f"library version differs from the table's: {d}")
        if config.engine == "ray":
            from cytostore.distributed import run_ray

            run_ray(store, table, source, encoder, prov, config, report, progress)
        else:
            _run(store, table, source, encoder, prov, config, report, progress)
        store.compact(table)
    finally:
        if lock is not None:
            lock.release()
    report.seconds = round(time.perf_counter() - t0, 3)
    report.cells_per_second = round(report.cells_added / report.seconds, 2) if report.seconds else 0.0
    return report


def _run(store: CellStore, table: str, source, encoder, prov: dict, config: IngestConfig,
         report: IngestReport, progress) -> None:
    stored = store.stored_uids(table)
    spec = CropSpec(config.crop, encoder.input_size, encoder.interpolation, config.detector)
    embedder = Embedder(encoder, config.device, config.batch_size, config.precision)
    extra_schema = getattr(source, "extra_schema", None) or pa.schema([])
    target = schema.arrow_schema("cells", dim=encoder.dim, embedding_dtype=config.embedding_dtype,
                                 extra=extra_schema, metadata=prov)
    commit_rows = config.commit_rows or config.batch_size
    fails = FailureLog(store, table, report)
    slides: set[str] = set()
    meta: list[dict[str, Any]] = []
    pixels: list[np.ndarray] = []
    pending_rows: list[dict[str, Any]] = []
    pending_emb: list[np.ndarray] = []
    cells_done = images_done = 0

    def embed_ready(final: bool) -> None:
        while meta and (len(meta) >= config.batch_size or final):
            take = min(config.batch_size, len(meta))
            batch_px = np.concatenate(pixels) if len(pixels) > 1 else pixels[0]
            emb = embedder(batch_px[:take])
            pending_rows.extend(meta[:take])
            pending_emb.append(emb)
            del meta[:take]
            rest = batch_px[take:]
            pixels.clear()
            if len(rest):
                pixels.append(rest)
            if len(pending_rows) >= commit_rows:
                commit()

    def commit() -> None:
        if pending_rows:
            rows = _to_arrow(pending_rows, np.concatenate(pending_emb), target, report.run_id)
            store.append(table, rows)
            report.cells_added += rows.num_rows
            pending_rows.clear()
            pending_emb.clear()
        fails.flush()

    loader = make_loader(source, spec, stored, config.workers)
    for out in loader:
        if out.get("slide_id"):
            slides.add(out["slide_id"])
        report.cells_skipped += out["skipped"]
        fails.add(out["failures"], failed_cells(out))
        if out["cells"]:
            meta.extend(out["cells"])
            pixels.append(out["pixels"])
        embed_ready(final=False)
        cells_done += len(out["cells"]) + out["skipped"]
        images_done += out.get("images", 0)
        if progress is not None:
            progress(cells_done, images_done, report)
    embed_ready(final=True)
    commit()
    _clear_resolved_failures(store, table)
    report.slides = len(slides)


def failed_cells(out: dict[str, Any]) -> int:
    """Cells an image task's output lost: those its crops failed on, plus what it counted itself."""
    return out.get("failed_cells", 0) + sum(1 for f in out["failures"] if f.stage == "crop")


class FailureLog:
    """The failures of one ingest run: counted in its report (the first 20 listed),
    stored once per (where, reason) in the store's failures table at each commit."""

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
            self.store.append_failures(_failures_to_arrow(new, self.table, self.report.run_id))
        self.pending.clear()


def _clear_resolved_failures(store: CellStore, table: str) -> None:
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
        store.delete_failures(f"\"table\" = '{table}' AND uid IN ({', '.join(str(u) for u in done)})")


def _to_arrow(rows: list[dict[str, Any]], emb: np.ndarray, target: pa.Schema, run_id: str) -> pa.Table:
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
        elif f.name in base:
            cols[f.name] = pa.array([r[f.name] for r in rows], f.type)
        else:
            values = [r["extra"].get(f.name) for r in rows]
            try:
                cols[f.name] = pa.array(values, f.type)
            except (pa.ArrowInvalid, pa.ArrowTypeError):
                cols[f.name] = pa.array([None if v is None else str(v) for v in values]).cast(f.type, safe=False)
    return pa.Table.from_pydict(cols, schema=target)


def _failures_to_arrow(fails: list[SourceFailure], table: str, run_id: str) -> pa.Table:
    now = dt.datetime.now(dt.timezone.utc)
    target = schema.arrow_schema("failures")
    return pa.Table.from_pylist([
        {"table": table, "where": f.where, "slide_id": f.slide_id, "cell_id": f.cell_id, "uid": f.uid,
         "stage": f.stage, "reason": f.reason, "run_id": run_id, "time": now} for f in fails
    ], schema=target)
