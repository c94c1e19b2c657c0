"""Ingest: source -> crops -> encoder -> cell table, resumable and idempotent.

Rows are committed in batches (one Lance commit each), so a killed ingest loses
at most the batch in flight; a re-run skips every cell already stored. Two
engines share the same stages (``stages``): ``local`` (this process) and ``ray``.
"""

from __future__ import annotations

import datetime as dt
import time
import uuid
from pathlib import Path
from typing import Callable

from cytostore.encoders import create_encoder
from cytostore.errors import InputError
from cytostore.ingest.config import ENGINES, IngestConfig, IngestReport
from cytostore.ingest.local import run_local
from cytostore.ingest.provenance import make_provenance
from cytostore.store import CELLS_PREFIX, CellStore, schema, table_name_for
from cytostore.store.lock import WriterLock
from cytostore.store.provenance import check_compatible

__all__ = ["ENGINES", "IngestConfig", "IngestReport", "ingest"]


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
        from cytostore.ingest.ray import require_ray

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
            from cytostore.ingest.ray import run_ray

            run_ray(store, table, source, encoder, prov, config, report, progress)
        else:
            run_local(store, table, source, encoder, prov, config, report, progress)
        store.compact(table)
    finally:
        if lock is not None:
            lock.release()
    report.seconds = round(time.perf_counter() - t0, 3)
    report.cells_per_second = round(report.cells_added / report.seconds, 2) if report.seconds else 0.0
    return report


