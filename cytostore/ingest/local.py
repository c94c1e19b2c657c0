"""The single-process ingest engine: source -> crops (optionally in worker processes) -> encoder -> commits."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from cytostore.embed import CropSpec, Embedder, make_loader
from cytostore.ingest.config import IngestConfig, IngestReport
from cytostore.ingest.stages import EmbeddingGuard, FailureLog, clear_resolved_failures, failed_cells, to_arrow
from cytostore.store import CellStore, schema
from cytostore.store.writer import CellWriter


def run_local(store: CellStore, table: str, source, encoder, prov: dict, config: IngestConfig,
              report: IngestReport, progress, writer: CellWriter) -> None:
    """The local engine of ``cytostore.ingest.ingest``: every row goes to ``writer``, which commits by size/time."""
    stored = store.stored_keys(table)
    spec = CropSpec(config.crop, encoder.input_size, encoder.interpolation, config.detector, **config.crop_hooks())
    embedder = _LazyEmbedder(encoder, config)  # built at the first cell to embed: a no-op re-run never loads it
    extra_schema = getattr(source, "extra_schema", None) or pa.schema([])
    target = writer.prepare(schema.arrow_schema("cells", dim=encoder.dim, embedding_dtype=config.embedding_dtype,
                                                extra=extra_schema, metadata=prov))
    fails = FailureLog(store, table, report)
    writer.on_commit(lambda rows: _committed(report, fails, rows))
    guard = EmbeddingGuard(fails, config.embedding_dtype, encoder.name)  # NaN/inf/float16 overflow: not stored
    slides: set[str] = set()
    meta: list[dict[str, Any]] = []
    pixels: list[np.ndarray] = []
    cells_done = images_done = 0

    def embed_ready(final: bool) -> None:
        while meta and (len(meta) >= config.batch_size or final):
            take = min(config.batch_size, len(meta))
            batch_px = np.concatenate(pixels) if len(pixels) > 1 else pixels[0]
            kept, emb = guard.check(meta[:take], embedder(batch_px[:take]))
            writer.append(to_arrow(kept, emb, target, report.run_id))
            del meta[:take]
            rest = batch_px[take:]
            pixels.clear()
            if len(rest):
                pixels.append(rest)

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
        writer.tick()
        cells_done += len(out["cells"]) + out["skipped"]
        images_done += out.get("images", 0)
        if progress is not None:
            progress(cells_done, images_done, report)
    embed_ready(final=True)
    writer.flush()
    clear_resolved_failures(store, table)
    report.slides = len(slides)


def _committed(report: IngestReport, fails: FailureLog, rows: int) -> None:
    # Cells count as added once committed; failures are stored at the same cadence.
    report.cells_added += rows
    fails.flush()


class _LazyEmbedder:
    """The Embedder of an ingest, created when it is first called."""

    def __init__(self, encoder, config: IngestConfig):
        self.encoder, self.config = encoder, config
        self.embedder: Embedder | None = None

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        if self.embedder is None:
            c = self.config
            self.embedder = Embedder(self.encoder, c.device, c.batch_size, c.precision, c.runtime, c.threads)
        return self.embedder(pixels)
