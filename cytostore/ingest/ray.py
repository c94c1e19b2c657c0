"""Ingest on Ray: the same source -> crops -> encoder -> cell table, scaled out.

A Ray Data pipeline of three stages over the planned image tasks:

1. ``crop`` (CPU tasks): read, detect, crop, resize and thumbnail, exactly as
   the single-process ingest does (``cytostore.embed.process_task``);
2. ``embed`` (actors, one GPU share each, or one CPU core without a GPU): the
   table's encoder behind the same fixed-size padded batches, so every cell gets
   the embedding the single-process ingest gives it;
3. ``write`` (CPU tasks): Lance fragments written straight into the table's
   folder with Lance's distributed write API, not yet visible to readers.

The driver consumes the stream and hands the fragments it receives to the
table's writer (``cytostore.store.writer``), which commits them in batches by
size or time, each an atomic Lance ``Append`` under the table's writer lock. A cell
is in the table once its fragment is committed and never before, so a killed
worker (Ray retries its task) or a killed driver (a re-run skips every
committed cell) loses no cell and duplicates none. Fragments a killed run wrote
but never committed are unreferenced files, not rows.
"""

from __future__ import annotations

import json
import logging
import pickle
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from cytostore.store import schema
from cytostore.embed import MAX_CELLS_PER_TASK, CropSpec, Embedder, plan_tasks, process_task
from cytostore.errors import CytostoreError, InputError, ProvenanceError
from cytostore.keys import UidSet
from cytostore.ingest.stages import (EmbeddingGuard, FailureLog, clear_resolved_failures, drop_unstorable,
                                     failed_cells, to_arrow)

log = logging.getLogger(__name__)

TASKS_PER_EMBED_CALL = 1  # image tasks (<= 256 cells each) per encoder actor call
TASKS_PER_FRAGMENT = 16  # image tasks per written fragment (fewer when commits are smaller)
WAVE_TASKS = 8192  # image tasks planned and run per pipeline (bounds the driver's memory)


def require_ray():
    """The ray module, or a clear error naming the extra to install."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:
        raise CytostoreError("--engine ray needs Ray Data: pip install 'cytostore[scale]' "
                             f"(or pip install 'ray[data]'); import failed: {e}") from e
    return ray


def start_ray(address: str | None):
    """Connects to the Ray cluster at ``address``, or starts a local one.

    An already initialised Ray (a notebook, a test) is used as it is.
    """
    ray = require_ray()
    if ray.is_initialized():
        return ray
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True,
                              "logging_level": "WARNING"}
    try:
        ray.init(address=address or None, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = f"the Ray cluster at {address!r}" if address else "a local Ray instance"
        raise CytostoreError(f"could not start or reach {where}: {e}; check --address "
                             "(ray://HOST:10001 or HOST:6379, or leave it out for a local instance)") from e
    return ray


@dataclass(frozen=True)
class RayPlan:
    """How the pipeline is laid out on the cluster."""

    embed_actors: int  # concurrent encoder actors
    gpus_per_actor: float  # GPU share of each (0 on CPU)
    cpus_per_actor: float  # CPU cores of each
    device: str  # what the actors run the encoder on


def plan_cluster(ray, config) -> RayPlan:
    """Picks the number of encoder actors and their resources from the cluster."""
    res = ray.cluster_resources()
    gpus = float(res.get("GPU", 0))
    cpus = float(res.get("CPU", 1))
    share = config.gpus_per_worker
    if share < 0 or share > 8:
        raise InputError(f"--gpus-per-worker must be between 0 and 8, got {share}")
    if config.device == "cpu" or (gpus == 0 and config.device == "auto"):
        share = 0.0
    elif gpus == 0:
        raise CytostoreError("--device cuda was asked for but the Ray cluster has no GPU; "
                             "use --device auto or cpu, or add GPU nodes")
    elif share == 0:
        share = 1.0
    if share:
        actors = config.ray_actors or max(1, int(gpus / share))
        return RayPlan(actors, share, 1.0, "cuda")
    # CPU only: keep at least one core for the crop and write tasks.
    actors = config.ray_actors or max(1, int(cpus // 2))
    return RayPlan(actors, 0.0, 1.0, "cpu")


class EmbedCells:
    """Ray actor: embeds the crops of whole image tasks with the table's encoder."""

    def __init__(self, encoder_name: str, weights: str | None, device: str, batch_size: int,
                 precision: str, weights_sha256: str | None, runtime: str = "torch", threads: int = 0,
                 input_size: int = 0):
        from cytostore.encoders import create_encoder
        from cytostore.encoders.lazy import with_input_size

        encoder = with_input_size(create_encoder(encoder_name, weights), input_size)
        got = encoder.provenance().get("weights_sha256")
        if weights_sha256 and got != weights_sha256:
            raise ProvenanceError(f"encoder {encoder_name} on this Ray worker has weights sha256 {got}, the driver "
                                  f"has {weights_sha256}; install the same weights on every node")
        # The driver resolved the runtime; an actor on a CPU share runs it on that many threads.
        self.embedder = Embedder(encoder, device, batch_size, precision, runtime, threads)
        self.batch_size = batch_size

    def __call__(self, batch: pa.Table) -> pa.Table:
        outs = [pickle.loads(p) for p in batch.column("payload").to_pylist()]
        chunks = [o["pixels"] for o in outs if o["pixels"] is not None and len(o["pixels"])]
        if chunks:
            px = np.concatenate(chunks) if len(chunks) > 1 else chunks[0]
            emb = np.concatenate([self.embedder(px[i:i + self.batch_size])
                                  for i in range(0, len(px), self.batch_size)])
        else:
            emb = np.zeros((0, self.embedder.encoder.dim), np.float32)
        start = 0
        for o in outs:
            n = len(o["cells"])
            o["embedding"] = emb[start:start + n]
            o["pixels"] = None
            start += n
        return _payload_table(outs, batch)


def _payload_table(outs: list[dict[str, Any]], batch: pa.Table) -> pa.Table:
    return pa.table({"task_index": batch.column("task_index"),
                     "payload": pa.array([pickle.dumps(o, protocol=5) for o in outs], pa.large_binary())})


def _crop_batch(batch: pa.Table, spec: CropSpec, stored_ref) -> pa.Table:
    import ray

    stored = ray.get(stored_ref) if stored_ref is not None else UidSet()
    outs = [process_task(pickle.loads(t), spec, stored) for t in batch.column("task").to_pylist()]
    return _payload_table(outs, batch)


def _write_batch(batch: pa.Table, uri: str, target: pa.Schema, run_id: str) -> pa.Table:
    from lance.fragment import write_fragments

    outs = [pickle.loads(p) for p in batch.column("payload").to_pylist()]
    for o in outs:  # NaN/inf or float16 overflow: a failure (stage "embed"), never a stored row
        o["embedding"] = drop_unstorable(o, o["embedding"], target.field("embedding").type.value_type)
    rows = [c for o in outs for c in o["cells"]]
    frags: list[str] = []
    if rows:
        emb = np.concatenate([o["embedding"] for o in outs if len(o["cells"])])
        table = to_arrow(rows, emb, target, run_id)
        frags = [f.to_json() for f in write_fragments(table, uri, schema=target, max_rows_per_file=1 << 20)]
    summary = {"failures": [f for o in outs for f in o["failures"]],
               "skipped": sum(o["skipped"] for o in outs),
               "failed_cells": sum(failed_cells(o) for o in outs),
               "slides": sorted({o["slide_id"] for o in outs if o.get("slide_id")}),
               "images": sum(o.get("images", 0) for o in outs)}
    return pa.table({"task_indices": [batch.column("task_index").to_numpy().astype(np.int64).tobytes()],
                     "fragments": [json.dumps(frags)], "rows": [len(rows)],
                     "summary": pa.array([pickle.dumps(summary)], pa.large_binary())})


def run_ray(store, table: str, source, encoder, prov: dict, config, report, progress, writer) -> None:
    """The Ray engine of ``cytostore.ingest.ingest`` (same arguments, same report, same writer)."""
    ray = start_ray(config.ray_address)
    ray.data.DataContext.get_current().enable_progress_bars = progress is None
    plan = plan_cluster(ray, config)
    report.notes.append(f"ray: {plan.embed_actors} encoder actor(s) on {plan.device}"
                        + (f", {plan.gpus_per_actor:g} GPU each" if plan.gpus_per_actor else ""))
    stored = store.stored_keys(table)
    rows_before = store.count(table) if store.has_table(table) else 0
    extra_schema = getattr(source, "extra_schema", None) or pa.schema([])
    target = writer.prepare(schema.arrow_schema("cells", dim=encoder.dim, embedding_dtype=config.embedding_dtype,
                                                extra=extra_schema, metadata=prov))
    run = _RayRun(ray, store, writer, target, plan, config, report, progress,
                  CropSpec(config.crop, encoder.input_size, encoder.interpolation, config.detector, **config.crop_hooks()),
                  ray.put(stored) if len(stored) else None, prov["encoder"].get("weights_sha256"))
    # Planning (listing, membership tests) runs on the driver, streamed in waves
    # so that the driver never holds the task list of a whole archive.
    wave: list[bytes] = []
    for kind, item in plan_tasks(source, stored):
        if kind == "task":
            wave.append(pickle.dumps(item, protocol=5))
            if len(wave) >= WAVE_TASKS:
                run.wave(wave)
                wave = []
        elif kind == "failure":
            run.fails.add([item], 1)
        else:
            n, slide, images = item
            report.cells_skipped += n
            run.slides.add(slide)
            run.images += images
    if wave:
        run.wave(wave)
    writer.flush()
    clear_resolved_failures(store, table)
    report.slides = len(run.slides)
    rows_after = store.count(table) if store.has_table(table) else 0
    if rows_after != rows_before + report.cells_added:  # pragma: no cover - another writer ignored the lock
        raise CytostoreError(f"table {table!r} went from {rows_before} to {rows_after} cells while this run "
                             f"committed {report.cells_added}; another process wrote to it without the writer lock")


class _RayRun:
    """Driver-side state of one Ray ingest: pending fragments, counts, commits."""

    def __init__(self, ray, store, writer, target, plan, config, report, progress, spec, stored_ref, weights_sha):
        self.ray, self.store, self.writer, self.target = ray, store, writer, target
        self.plan, self.config, self.report, self.progress = plan, config, report, progress
        self.spec, self.stored_ref, self.weights_sha = spec, stored_ref, weights_sha
        self.uri = writer.uri
        self.slides: set[str] = set()
        self.images = 0
        self.commit_rows = writer.policy.commit_rows
        self.fails = FailureLog(store, writer.table, report)
        self.guard = EmbeddingGuard(self.fails, config.embedding_dtype, config.encoder)
        writer.on_commit(self._committed)

    def wave(self, tasks: list[bytes]) -> None:
        """Runs the pipeline over ``tasks``, committing fragments as they arrive."""
        from lance.fragment import FragmentMetadata

        ray, plan, config = self.ray, self.plan, self.config
        seen = np.zeros(len(tasks), bool)
        ds = ray.data.from_items([{"task_index": i, "task": t} for i, t in enumerate(tasks)],
                                 override_num_blocks=max(1, min(len(tasks), 1024)))
        ds = ds.map_batches(_crop_batch, batch_format="pyarrow", batch_size=1, zero_copy_batch=True,
                            fn_kwargs={"spec": self.spec, "stored_ref": self.stored_ref}, num_cpus=1)
        ds = ds.map_batches(EmbedCells, batch_format="pyarrow", batch_size=TASKS_PER_EMBED_CALL,
                            zero_copy_batch=True,
                            fn_constructor_args=(config.encoder, config.weights, plan.device, config.batch_size,
                                                 config.precision, self.weights_sha, config.runtime,
                                                 0 if plan.gpus_per_actor else max(1, int(plan.cpus_per_actor)),
                                                 config.input_size),
                            compute=ray.data.ActorPoolStrategy(size=plan.embed_actors),
                            num_gpus=plan.gpus_per_actor or None, num_cpus=plan.cpus_per_actor)
        per_fragment = max(1, min(TASKS_PER_FRAGMENT, self.commit_rows // MAX_CELLS_PER_TASK))
        ds = ds.map_batches(_write_batch, batch_format="pyarrow", batch_size=per_fragment,
                            fn_kwargs={"uri": self.uri, "target": self.target, "run_id": self.report.run_id},
                            num_cpus=1)
        for batch in ds.iter_batches(batch_size=1, batch_format="pyarrow", prefetch_batches=0):
            idx = np.frombuffer(batch.column("task_indices")[0].as_py(), np.int64)
            if seen[idx].any():
                # A retried task's second output: its cells are already on their way to the table.
                self.report.notes.append(f"ray: dropped a repeated output of {len(idx)} task(s)")
                continue
            seen[idx] = True
            frags = json.loads(batch.column("fragments")[0].as_py())
            summary = pickle.loads(batch.column("summary")[0].as_py())
            self.fails.add(summary["failures"], summary["failed_cells"])
            self.guard.account_failures(batch.column("rows")[0].as_py(), summary["failures"])
            self.report.cells_skipped += summary["skipped"]
            self.slides.update(summary["slides"])
            self.images += summary["images"]
            # The writer commits by size or time (failures are flushed at each of its commits).
            self.writer.add_fragments([FragmentMetadata.from_json(json.dumps(f)) for f in frags],
                                      batch.column("rows")[0].as_py())
            if self.progress is not None:
                r = self.report
                self.progress(r.cells_added + self.writer.pending_rows + r.cells_skipped + r.cells_failed,
                              self.images, r)

        log.debug("ray wave of %d tasks: %s", len(tasks), ds.stats())

    def _committed(self, rows: int) -> None:
        self.report.cells_added += rows
        self.fails.flush()
