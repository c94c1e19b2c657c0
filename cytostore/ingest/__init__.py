"""Ingest: source -> crops -> encoder -> cell table, resumable and idempotent.

Rows go through the table's one writer (``cytostore.store.writer``), which commits
them by size or time (one atomic Lance commit each), so a killed ingest loses at
most the rows not yet committed; a re-run skips every cell already stored. On
KeyboardInterrupt (Ctrl-C) the rows already embedded are committed first and
``IngestInterrupted`` is raised with the report. Two
engines share the same stages (``stages``): ``local`` (this process) and ``ray``.
"""

from __future__ import annotations

import datetime as dt
import time
import uuid
from pathlib import Path
from typing import Callable

from cytostore.encoders.lazy import encoder_identity
from cytostore.errors import CytostoreError, InputError
from cytostore.ingest.config import ENGINES, IngestConfig, IngestReport, with_cell_options
from cytostore.ingest.local import run_local
from cytostore.ingest.provenance import (choose_runtime, detector_identity, make_provenance, resolve_compute,
                                        uses_detector)
from cytostore.ingest.validate import validate
from cytostore.store import CellStore, schema, table_name_for
from cytostore.store.writer import CellWriter, CommitPolicy
from cytostore.store.provenance import check_compatible

__all__ = ["ENGINES", "IngestConfig", "IngestInterrupted", "IngestReport", "ingest"]


class IngestInterrupted(CytostoreError):
    """The ingest was interrupted (Ctrl-C); what was embedded is committed.

    Attributes:
        report: the report up to the interruption (``cells_added`` = cells kept).
    """

    def __init__(self, report: IngestReport):
        super().__init__(f"ingest into table {report.table!r} interrupted: {report.cells_added} cells added "
                         "and kept; run the same command again to resume")
        self.report = report


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

    Raises:
        IngestInterrupted: on KeyboardInterrupt, after committing the cells already
            embedded (and their failures) and releasing the writer lock.
    """
    validate(source, config)  # options and source columns, before the store is touched (InputError)
    if config.engine == "ray":
        from cytostore.ingest.ray import require_ray

        require_ray()
    t0 = time.perf_counter()
    store = CellStore.create(store_path)
    # The model is built only when a cell needs embedding (the identity comes from a digest cache).
    encoder = encoder_identity(config.encoder, config.weights, config.input_size)
    config, encoder = with_cell_options(config, encoder, store)  # --features, --tta, --stain, --morphometrics
    table = table_name_for(config.table or encoder.name)
    device = _device(config)
    config, check, notes = choose_runtime(config, encoder, device,
                                          store.provenance(table) if store.has_table(table) else None)
    prov = make_provenance(encoder, config.crop, config.embedding_dtype, compute=_compute(config, device),
                           detector=detector_identity(config.detector) if uses_detector(source) else None,
                           runtime_check=check)
    run_id = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    report = IngestReport(store=store.root, table=table, run_id=run_id, notes=notes)
    writer = CellWriter(store, table, commit_policy(config), wait=config.wait_for_lock)
    if writer.lock is None:
        report.notes.append("object-store URI: no writer lock; run one ingest per table at a time")
    try:
        if store.has_table(table):
            compat = check_compatible(table, store.provenance(table), prov)  # ProvenanceError on identity
            report.notes += compat.notes
            if compat.record is not None:  # an older layout, or fields the table had not fixed yet
                schema.write_metadata(store.table_uri(table), compat.record)
        if config.engine == "ray":
            from cytostore.ingest.ray import run_ray

            run_ray(store, table, source, encoder, prov, config, report, progress, writer)
        else:
            run_local(store, table, source, encoder, prov, config, report, progress, writer)
    except KeyboardInterrupt as e:
        try:
            writer.flush()  # the cells already embedded, and the failures met so far
        finally:
            writer.release()
        report.seconds = round(time.perf_counter() - t0, 3)
        raise IngestInterrupted(report) from e
    except BaseException:
        writer.abort()  # what was committed stays; a re-run skips it
        raise
    writer.close()  # commits nothing new here (the engines flushed); compacts, cleans up, unlocks
    report.seconds = round(time.perf_counter() - t0, 3)
    report.cells_per_second = round(report.cells_added / report.seconds, 2) if report.seconds else 0.0
    return report


def _device(config: IngestConfig) -> str:
    # The device the encoder will really run on (Ray: what its actors get).
    if config.engine == "ray":
        from cytostore.ingest.ray import plan_cluster, start_ray

        return plan_cluster(start_ray(config.ray_address), config).device
    from cytostore.embed import resolve_device

    return resolve_device(config.device)


def _compute(config: IngestConfig, device: str) -> dict[str, str]:
    # Device kind, precision and runtime the encoder will really run in.
    if config.engine == "ray":
        return resolve_compute(device, config.precision, local=False, runtime=config.runtime)
    return resolve_compute(config.device, config.precision, runtime=config.runtime)


def commit_policy(config: IngestConfig) -> CommitPolicy:
    """The writer's commit policy for an ingest config (0 = the writer's defaults)."""
    if config.commit_rows < 0 or config.commit_seconds < 0:
        raise InputError(f"--commit-rows and --commit-seconds must be 0 (default) or more, got "
                         f"{config.commit_rows} and {config.commit_seconds}")
    default = CommitPolicy()
    return CommitPolicy(commit_rows=config.commit_rows or default.commit_rows,
                        commit_seconds=config.commit_seconds or default.commit_seconds)
