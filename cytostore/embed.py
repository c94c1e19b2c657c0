"""Batched embedding: workers read, detect and crop; the model runs on the GPU
(autocast, channels-last, pinned memory) or deterministically on the CPU."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from cytostore.encoders.registry import Encoder
from cytostore.errors import CytostoreError, InputError
from cytostore.imaging import CropPolicy, Slide, crop_cell, open_image, resize, thumbnail_bytes
from cytostore.keys import (COLLISION, DUPLICATE, NEW, STORED, KeySet, UidSet, cell_key_hash,
                            position_cell_id)
from cytostore.sources.base import CONTINUED, CellRecord, ImageTask, SourceFailure

MAX_CELLS_PER_TASK = 256  # bounds a worker's output; bigger tasks are split
SLIDE_TILE = 2048  # level-0 tile side for detecting cells on whole slides


@dataclass(frozen=True)
class CropSpec:
    """What workers need to turn a task into model-ready pixels."""

    policy: CropPolicy  # crop geometry
    input_size: int  # encoder input side
    interpolation: str  # resize filter
    detector: Any = None  # DetectorParams for tasks without cells
    stain: dict | None = None  # cytostore.stain reference the crops of a task are normalised to
    morphometrics: bool = False  # measure each crop (cytostore.morphometrics) into the morph_* columns


def plan_tasks(source, stored: UidSet) -> Iterator[tuple[str, Any]]:
    """Splits a source into bounded work items; drops cells already stored.

    Yields ``("task", ImageTask)``, ``("failure", SourceFailure)`` or
    ``("skipped", n)`` for tasks whose known cells are all stored.
    """
    for item in source:
        if isinstance(item, SourceFailure):
            yield "failure", item
            continue
        if item.cells is None:
            yield from _plan_detection(item)
            continue
        cells = item.cells
        if cells:
            cells, skipped, key_failures = split_stored(cells, stored, item.source_ref or item.image)
            for f in key_failures:
                yield "failure", f
            if skipped or key_failures:
                first = not (cells or item.source_ref.endswith(CONTINUED))  # the image counts once
                yield "skipped", (skipped, item.slide_id, int(first))
        for start in range(0, len(cells), MAX_CELLS_PER_TASK):
            chunk = cells[start:start + MAX_CELLS_PER_TASK]
            ref = item.source_ref + (CONTINUED if start else "")
            yield "task", ImageTask(item.image, item.slide_id, chunk, item.slide_label, ref)


def split_stored(cells: list[CellRecord], stored: KeySet | UidSet,
                 where: str) -> tuple[list[CellRecord], int, list[SourceFailure]]:
    """Judges cells against the stored keys and those this run claimed already.

    Returns the new cells (now claimed), how many are stored under the same key
    (skipped), and a "key" failure for each repeated key or uid collision: a
    cell whose uid belongs to another key is never skipped silently nor written.
    """
    uids = np.fromiter((c.uid for c in cells), dtype=np.int64, count=len(cells))
    keys = np.fromiter((cell_key_hash(c.slide_id, c.cell_id) for c in cells), dtype=np.int64, count=len(cells))
    verdict = stored.classify(uids, keys)
    fresh = [c for c, v in zip(cells, verdict) if v == NEW]
    failures = [_key_failure(c, int(v), fresh, stored, where) for c, v in zip(cells, verdict) if v >= DUPLICATE]
    return fresh, int((verdict == STORED).sum()), failures


def _key_failure(rec: CellRecord, verdict: int, fresh: list[CellRecord], stored, where: str) -> SourceFailure:
    key = f"(slide_id={rec.slide_id!r}, cell_id={rec.cell_id!r})"
    if verdict == DUPLICATE:
        reason = f"key {key} came twice in this run; the first was kept"
    else:
        if verdict == COLLISION:
            other = stored.stored_key(rec.uid)
        else:
            first = next((c for c in fresh if c.uid == rec.uid), None)
            other = (first.slide_id, first.cell_id) if first is not None else None
        holder = (f"key (slide_id={other[0]!r}, cell_id={other[1]!r})" if other else
                  "another key " + ("in the table" if verdict == COLLISION else "earlier in this run"))
        reason = (f"uid collision: key {key} has uid {rec.uid}, already held by {holder}; this cell was not "
                  "written; rename one of the cell ids")
    # uid stays None: the uid is in the table (the other key's), and a failure with a stored
    # uid counts as resolved; the key is recorded in slide_id and cell_id.
    return SourceFailure(rec.source_ref or where, reason, "key", rec.slide_id, rec.cell_id, None)


def _plan_detection(task: ImageTask) -> Iterator[tuple[str, Any]]:
    from cytostore.imaging import is_slide_file

    if not is_slide_file(task.image):
        yield "task", task
        return
    try:
        slide = Slide(task.image)
        w, h = slide.size
        slide.close()
    except InputError as e:
        yield "failure", SourceFailure(task.image, str(e), stage="read", slide_id=task.slide_id)
        return
    for y0 in range(0, h, SLIDE_TILE):
        for x0 in range(0, w, SLIDE_TILE):
            ref = task.source_ref + ("" if x0 == y0 == 0 else CONTINUED)
            yield "task", ImageTask(task.image, task.slide_id, None, task.slide_label, ref, id_prefix=f"{x0}_{y0}")


def process_task(task: ImageTask, spec: CropSpec, stored: UidSet) -> dict[str, Any]:
    """Reads one image task: detects cells when needed, crops, resizes, thumbnails.

    Returns a dict with ``cells`` (list of row dicts), ``pixels`` (uint8 N x S x S x 3),
    ``failures`` and ``skipped``; never raises for bad input.
    """
    out: dict[str, Any] = {"cells": [], "pixels": None, "failures": [], "skipped": 0, "slide_id": task.slide_id,
                           "images": 0 if task.source_ref.endswith(CONTINUED) else 1}
    try:
        img = open_image(task.image)
    except CytostoreError as e:
        n = len(task.cells) if task.cells is not None else 0
        out["failures"].append(SourceFailure(task.image, f"{e}; fix or replace the file and run again", "read",
                                             slide_id=task.slide_id, cell_id=None))
        out["failed_cells"] = max(n, 1)
        return out
    try:
        cells = task.cells
        if cells is None:
            try:
                cells = _detect(img, task, spec)
            except Exception as e:  # a detector crash on one field must not stop the run
                out["failures"].append(SourceFailure(task.image, f"detector failed: {e}", "detect", slide_id=task.slide_id))
                out["failed_cells"] = 1
                return out
            if cells:
                cells, out["skipped"], key_failures = split_stored(cells, stored, task.image)
                out["failures"].extend(key_failures)
                out["failed_cells"] = out.get("failed_cells", 0) + len(key_failures)
        crops = []
        for rec in cells:
            try:
                if rec.x is None:  # the whole image is the crop
                    w, h = img.size
                    rec.x, rec.y, rec.box = w / 2, h / 2, (0.0, 0.0, float(w), float(h))
                    side = max(w, h)
                else:
                    side = spec.policy.side(rec.box)
                crop = crop_cell(img, rec.x, rec.y, side)
            except CytostoreError as e:
                out["failures"].append(SourceFailure(rec.source_ref or task.image, f"{e}; fix the coordinates",
                                                     "crop", rec.slide_id, rec.cell_id, rec.uid))
                continue
            crops.append(crop)
            out["cells"].append(_row(rec, task, side, thumbnail_bytes(crop)))
        if crops:
            out["pixels"] = _model_pixels(crops, out["cells"], task, spec)
    finally:
        img.close()
    return out


def _model_pixels(crops: list[np.ndarray], rows: list[dict[str, Any]], task: ImageTask, spec: CropSpec) -> np.ndarray:
    """Content hashes and morphometrics of the raw crops into ``rows``; the crops stain-normalised and resized."""
    from cytostore import morphometrics

    image_hash = file_hash(task.image)
    for crop, row in zip(crops, rows):
        row["content_hash"], row["image_hash"] = content_hash(crop), image_hash
        row.update(morphometrics.measure(crop) if spec.morphometrics else morphometrics.empty())
    if spec.stain is not None:
        from cytostore.stain import normalise

        crops = normalise(crops, spec.stain)
    return np.stack([resize(c, spec.input_size, spec.interpolation) for c in crops])


def content_hash(crop: np.ndarray) -> int:
    """blake2b-64 of a crop's shape and pixel bytes, as a signed int64 (the ``content_hash`` column)."""
    import hashlib

    h = hashlib.blake2b(str(crop.shape).encode(), digest_size=8)
    h.update(np.ascontiguousarray(crop).tobytes())
    return int.from_bytes(h.digest(), "little", signed=True)


def file_hash(path: str, max_bytes: int = 1 << 26) -> int | None:
    """blake2b-64 of a local file's bytes (the ``image_hash`` column); None over ``max_bytes`` or not local."""
    import hashlib
    import os

    try:
        if os.path.getsize(path) > max_bytes:
            return None
        with open(path, "rb") as fh:
            return int.from_bytes(hashlib.blake2b(fh.read(), digest_size=8).digest(), "little", signed=True)
    except (OSError, TypeError, ValueError):
        return None


def _detect(img, task: ImageTask, spec: CropSpec) -> list[CellRecord]:
    from cytostore.detect import DetectorParams, detect_cells

    params = spec.detector or DetectorParams()
    if isinstance(img, Slide):
        # Tile with an overlap; keep a detection only in the tile holding its centre.
        x0, y0 = (int(v) for v in task.id_prefix.split("_"))
        pad = 128
        region = img.region(x0 - pad, y0 - pad, SLIDE_TILE + 2 * pad)
        found = [d for d in detect_cells(region, params)
                 if pad <= d.x < SLIDE_TILE + pad and pad <= d.y < SLIDE_TILE + pad]
        off_x, off_y = x0 - pad, y0 - pad
    else:
        found = detect_cells(img.array, params)
        off_x = off_y = 0
    cells = []
    for d in found:
        x, y = d.x + off_x, d.y + off_y
        box = (float(d.x0 + off_x), float(d.y0 + off_y), float(d.x1 + off_x), float(d.y1 + off_y))
        cells.append(CellRecord(slide_id=task.slide_id, cell_id=position_cell_id(x, y), x=x, y=y, box=box,
                                source_ref=f"{task.source_ref}#detector"))
    return cells


def _row(rec: CellRecord, task: ImageTask, side: int, thumb: bytes) -> dict[str, Any]:
    box = rec.box or (None, None, None, None)
    return {
        "uid": rec.uid, "slide_id": rec.slide_id, "cell_id": rec.cell_id, "x": float(rec.x), "y": float(rec.y),
        "x0": box[0], "y0": box[1], "x1": box[2], "y1": box[3], "crop_size": int(side), "label": rec.label,
        "slide_label": task.slide_label, "image": task.image, "source_ref": rec.source_ref or task.source_ref,
        "thumbnail": thumb, "extra": rec.extra,
    }


class TaskStream:
    """A torch IterableDataset over planned tasks, shared out across workers.

    A source that offers ``shard`` is planned in parts: each worker plans and
    processes only its own part, and its outputs carry the keys of their cells
    so that ``make_loader`` can find a key repeated across parts. Other sources
    are planned whole by every worker, which keeps every n-th work item.
    """

    def __init__(self, source, spec: CropSpec, stored: UidSet):
        self.source = source
        self.spec = spec
        self.stored = stored

    def __iter__(self):
        import torch.utils.data as tud

        from cytostore._workers import keyed_outputs

        info = tud.get_worker_info()
        wid, n = (info.id, info.num_workers) if info else (0, 1)
        part = self.source.shard(wid, n) if n > 1 and hasattr(self.source, "shard") else None
        if part is not None:
            for item in part:
                yield from keyed_outputs(self, item)
            return
        for k, (kind, item) in enumerate(plan_tasks(self.source, self.stored)):
            if k % n == wid:
                yield self.output(kind, item)

    def output(self, kind: str, item: Any) -> dict[str, Any]:
        """The output of one planned work item (see ``plan_tasks``)."""
        if kind == "task":
            return process_task(item, self.spec, self.stored)
        if kind == "failure":
            return {"cells": [], "pixels": None, "failures": [item], "skipped": 0, "failed_cells": 1,
                    "slide_id": item.slide_id, "images": 0}
        return {"cells": [], "pixels": None, "failures": [], "skipped": item[0], "slide_id": item[1],
                "images": item[2]}


def make_loader(source, spec: CropSpec, stored: UidSet, workers: int):
    """Outputs of the source's tasks, from a DataLoader over a TaskStream.

    Spawned workers never inherit open table handles. With workers, a source's
    one-off pass (``prepare``) runs here first, and the keys of sharded outputs
    are checked across workers (a key repeated in two parts is one failure).
    """
    import torch.utils.data as tud

    from cytostore._workers import StreamDataset, merge_parts

    kwargs: dict[str, Any] = {"batch_size": None, "num_workers": workers, "collate_fn": _identity}
    if workers > 0:
        kwargs.update(multiprocessing_context="spawn", prefetch_factor=4)
        if hasattr(source, "prepare"):
            source.prepare()
    loader = tud.DataLoader(StreamDataset(TaskStream(source, spec, stored)), **kwargs)
    return merge_parts(loader) if workers > 0 else loader


def _identity(item: dict[str, Any]) -> dict[str, Any]:
    # Pixels stay numpy until the main process stages them into pinned memory.
    return item


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def resolve_device(device: str = "auto") -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CytostoreError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu or auto")
    if device not in {"cpu"} and not device.startswith("cuda"):
        raise CytostoreError(f"unknown device {device!r}; use auto, cpu or cuda")
    return device


def check_precision(precision: str) -> str:
    """``precision`` when it is one cytostore knows; InputError naming the accepted ones otherwise."""
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    return precision


def resolve_runtime(runtime: str, device: str, precision: str, table_runtime: str | None = None) -> str:
    """The runtime an Embedder on ``device`` uses (``cytostore.encoders.runtime.resolve``)."""
    from cytostore.encoders.runtime import resolve

    return resolve(runtime, resolve_device(device).startswith("cuda"), check_precision(precision), table_runtime)


class Embedder:
    """Runs an encoder on fixed-size batches of uint8 crops.

    Every batch is padded to ``batch_size`` so each cell's embedding is computed
    with the same shapes whatever cells share its batch: a resumed ingest then
    reproduces an uninterrupted one exactly (within one runtime). ``runtime`` is
    ``torch`` (eager PyTorch: channels-last, autocast on GPUs), ``onnx`` (ONNX Runtime
    on the CPU), ``openvino`` (OpenVINO on the CPU, reading the same ONNX graph) or
    ``auto`` (see ``resolve_runtime``); the default stays ``torch`` for callers that embed
    a few crops (search queries, few-shot support), where an export would cost more than
    it saves; the ingest passes the runtime it resolved. ``threads`` = intra-op threads
    (0: the cores available; torch keeps its own setting unless given).
    """

    def __init__(self, encoder: Encoder, device: str = "auto", batch_size: int = 64, precision: str = "auto",
                 runtime: str = "torch", threads: int = 0):
        import torch

        from cytostore.encoders import runtime as rt

        self.encoder = encoder
        self.device = torch.device(resolve_device(device))
        self.batch_size = batch_size
        self.runtime = resolve_runtime(runtime, device, precision)
        self.threads = rt.threads_for(threads)
        cuda = self.device.type == "cuda"
        if check_precision(precision) == "auto":
            precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "fp32"
        self.precision = precision
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self.check: dict | None = None  # the runtime's tolerance against PyTorch (None for torch)
        if self.runtime == "torch":
            if cuda:
                torch.backends.cudnn.benchmark = False
            elif threads:
                torch.set_num_threads(threads)
            # channels-last is faster on GPUs and for the depthwise convolutions of CPUs too.
            self.model = encoder.model.to(self.device).eval().to(memory_format=torch.channels_last)
            self.session = None
        else:
            export = rt.ensure_export(encoder, batch_size)
            self.check = rt.tolerance(self.runtime, export, encoder, threads)
            self.session = rt.make_session(self.runtime, export.path, threads)
            self.model = None
        shape = (1, 3, 1, 1)
        self.mean = torch.tensor(encoder.mean, device=self.device).view(shape)
        self.std = torch.tensor(encoder.std, device=self.device).view(shape)
        size = encoder.input_size
        self.staging = torch.zeros((batch_size, size, size, 3), dtype=torch.uint8)
        if cuda:
            self.staging = self.staging.pin_memory()
        self.staging_np = self.staging.numpy() if not cuda else None  # the same memory

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        """Embeds up to ``batch_size`` crops (uint8, N x S x S x 3); returns float32 (N, dim)."""
        import torch

        n = len(pixels)
        if n == 0:
            return np.zeros((0, self.encoder.dim), dtype=np.float32)
        if n > self.batch_size:
            raise ValueError(f"{n} crops given to a batch of {self.batch_size}")
        if self.session is not None:  # the graph scales and normalises the uint8 crops itself
            self.staging_np[:n] = pixels
            self.staging_np[n:] = 0
            out = self.session(self.staging_np)[:n]
        else:
            self.staging.zero_()
            self.staging[:n] = torch.from_numpy(pixels)
            x = self.staging.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255)
            x = ((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
            with torch.inference_mode():
                if self.autocast_dtype is not None:
                    with torch.autocast(self.device.type, dtype=self.autocast_dtype):
                        y = self.model(x)
                else:
                    y = self.model(x)
            out = y[:n].float().cpu().numpy()
        if out.shape[1] != self.encoder.dim:
            raise CytostoreError(f"encoder {self.encoder.name} gave {out.shape[1]} features, expected {self.encoder.dim}")
        return out
