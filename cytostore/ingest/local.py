"""The single-process ingest engine: source -> crops (optionally in worker processes) -> encoder -> commits."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from cytostore.embed import CropSpec, Embedder, make_loader
from cytostore.ingest.config import IngestConfig, IngestReport
from cytostore.ingest.stages import FailureLog, clear_resolved_failures, failed_cells, to_arrow
from cytostore.store import CellStore, schema


def run_local(store: CellStore, table: str, source, encoder, prov: dict, config: IngestConfig,
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
            rows = to_arrow(pending_rows, np.concatenate(pending_emb), target, report.run_id)
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
    clear_resolved_failures(store, table)
    report.slides = len(slides)


