"""Ingest figures on real Chula RBC-12 cells: throughput against the bare forward,
bytes on disk per cell (live fragments and the whole table folder) against one float32
HDF5 file per slide, and peak memory
against the number of slides.

    python benchmarks/ingest_throughput.py runtimes --cells 512 --cosine-cells 1000 --sizes 224 128
    python benchmarks/ingest_throughput.py noop --cells 271
    python benchmarks/ingest_throughput.py throughput --cells 2048 --batch-size 64 --runtime onnx
    python benchmarks/ingest_throughput.py throughput --engine ray --device cuda --precision bf16
    python benchmarks/ingest_throughput.py crop --cells 2048
    python benchmarks/ingest_throughput.py bytes --store runs/chula12-store
    python benchmarks/ingest_throughput.py memory --slides 10 40 160

Each part prints plain lines, then one JSON line. Every figure carries the 1-minute load
average measured beside it (the benchmark machine is shared).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from datasets import DEFAULT_DATA, chula12_rows, write_csv  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def _subset(n_cells: int, data: Path) -> list[dict]:
    rows = chula12_rows(data)
    out, seen = [], set()
    for r in rows:  # whole fields, in order, until n_cells
        if len(out) >= n_cells and r["slide_id"] not in seen:
            break
        seen.add(r["slide_id"])
        out.append(r)
    return out


def load() -> float:
    """The 1-minute load average (the machine is shared: read figures beside it)."""
    return round(os.getloadavg()[0], 2)


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process and its finished children (less load-bound than wall time)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def bare_forward(n_cells: int, batch_size: int, device: str, precision: str = "auto", runtime: str = "torch",
                 input_size: int = 0, threads: int = 0, pixels: np.ndarray | None = None) -> float:
    """cells/s of the encoder alone on ready uint8 crops, as the ingest feeds it (warm, export cached)."""
    from cytostore.embed import Embedder
    from cytostore.encoders import create_encoder
    from cytostore.encoders.lazy import with_input_size

    enc = with_input_size(create_encoder(), input_size)
    emb = Embedder(enc, device=device, batch_size=batch_size, precision=precision, runtime=runtime, threads=threads)
    if pixels is None:
        rng = np.random.default_rng(0)
        pixels = rng.integers(0, 255, (batch_size, enc.input_size, enc.input_size, 3), dtype=np.uint8)
    px = pixels[:batch_size]
    emb(px)  # warm-up
    n_batches = max(1, n_cells // batch_size)
    t0 = time.perf_counter()
    for _ in range(n_batches):
        emb(px)
    return n_batches * batch_size / (time.perf_counter() - t0)


def throughput(args) -> dict:
    from cytostore import IngestConfig, ingest, open_source

    rows = _subset(args.cells, args.data)
    tmp = Path(tempfile.mkdtemp())
    manifest = write_csv(rows, tmp / "m.csv")
    cfg = IngestConfig(batch_size=args.batch_size, workers=args.workers, device=args.device,
                       precision=args.precision, engine=args.engine, runtime=args.runtime, threads=args.threads,
                       input_size=args.input_size)
    t0, c0 = time.perf_counter(), _cpu_seconds()
    report = ingest(open_source(manifest), tmp / "store", cfg)
    wall, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
    e2e = report.cells_added / wall
    bare = bare_forward(report.cells_added, args.batch_size, args.device, args.precision, cfg.runtime,
                        args.input_size, args.threads)
    shutil.rmtree(tmp)
    out = {"cells": report.cells_added, "slides": report.slides, "batch_size": args.batch_size,
           "workers": args.workers, "device": args.device, "device_name": _device_name(args.device),
           "precision": args.precision, "engine": args.engine, "notes": report.notes,
           "end_to_end_cells_s": round(e2e, 2),
           "end_to_end_seconds": round(wall, 2), "bare_forward_cells_s": round(bare, 2),
           "ratio": round(e2e / bare, 3), "runtime": args.runtime, "load_1min": load(),
           "cpu_seconds": round(cpu, 1), "cpu_ms_per_cell": round(1000 * cpu / max(1, report.cells_added), 1)}
    print(f"ingest end to end: {out['cells']} cells in {wall:.1f} s = {e2e:.1f} cells/s (model load included)")
    print(f"bare forward, same encoder and batch size: {bare:.1f} cells/s")
    print(f"ratio end-to-end / bare forward: {out['ratio']:.3f}")
    print(f"CPU time of the ingest (this process and its workers): {cpu:.1f} s = "
          f"{out['cpu_ms_per_cell']} ms per cell (load {load()})")
    return out


def _device_name(device: str) -> str:
    import platform

    import torch

    if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()):
        return torch.cuda.get_device_name(0)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def crop_rate(args) -> dict:
    """cells/s of reading, cropping, resizing and thumbnailing on one core (no encoder)."""
    from cytostore import open_source
    from cytostore.embed import CropSpec, plan_tasks, process_task
    from cytostore.encoders import create_encoder
    from cytostore.imaging import CropPolicy
    from cytostore.keys import UidSet

    rows = _subset(args.cells, args.data)
    tmp = Path(tempfile.mkdtemp())
    manifest = write_csv(rows, tmp / "m.csv")
    enc = create_encoder()
    spec = CropSpec(CropPolicy(), enc.input_size, enc.interpolation)
    tasks = [item for kind, item in plan_tasks(open_source(manifest), UidSet()) if kind == "task"]
    t0 = time.perf_counter()
    cells = sum(len(process_task(t, spec, UidSet())["cells"]) for t in tasks)
    wall = time.perf_counter() - t0
    shutil.rmtree(tmp)
    out = {"cells": cells, "images": len(tasks), "seconds": round(wall, 2), "crop_cells_s_one_core": round(cells / wall, 1)}
    print(f"read + crop + resize + thumbnail, one core: {cells} cells from {len(tasks)} fields in {wall:.1f} s "
          f"= {cells / wall:.0f} cells/s")
    return out


def bytes_per_cell(args) -> dict:
    import h5py

    from cytostore import CellStore

    from cytostore.store.maintenance import table_stats

    store = CellStore.open(args.store)
    table = store.resolve()
    stats = table_stats(store.table_uri(table))
    live = stats["live_bytes"]  # the data files the current version reads
    folder = stats["folder_bytes"]  # everything under the table folder: old versions, _versions, _transactions
    cells = store.cells(columns=["slide_id", "x", "y", "embedding"])
    n, dim = cells.num_rows, cells.schema.field("embedding").type.list_size
    thumbs = store.cells(columns=["thumbnail"]).column("thumbnail")
    thumb_bytes = sum(len(b) for b in thumbs.to_pylist())
    tmp = Path(tempfile.mkdtemp())
    from cytostore.store import embedding_matrix

    emb = embedding_matrix(cells.column("embedding")).astype(np.float32)
    slides = np.asarray(cells.column("slide_id").to_pylist())
    xy = np.stack([cells.column("x").to_numpy(), cells.column("y").to_numpy()], 1).astype(np.int64)
    for s in np.unique(slides):
        m = slides == s
        with h5py.File(tmp / f"{s}.h5", "w") as fh:  # the TRIDENT / CLAM layout
            fh.create_dataset("features", data=emb[m])
            fh.create_dataset("coords", data=xy[m])
    h5 = sum(p.stat().st_size for p in tmp.iterdir())
    shutil.rmtree(tmp)
    out = {"cells": n, "dim": dim, "store_bytes_per_cell": round(live / n, 1),
           "folder_bytes_per_cell": round(folder / n, 1), "folder_over_live": round(folder / live, 3),
           "versions": stats["versions"], "fragments": stats["fragments"],
           "versions_folder_bytes": stats["versions_bytes"],
           "thumbnail_bytes_per_cell": round(thumb_bytes / n, 1),
           "store_bytes_per_cell_without_thumbnails": round((live - thumb_bytes) / n, 1),
           "hdf5_float32_bytes_per_cell": round(h5 / n, 1), "hdf5_files": int(len(np.unique(slides)))}
    print(f"{n} cells, dim {dim}: table folder {out['folder_bytes_per_cell']} B/cell on disk "
          f"({stats['versions']} versions, {stats['fragments']} fragments; `cytostore store optimize` "
          f"removes old versions), live fragments {out['store_bytes_per_cell']} B/cell")
    print(f"{n} cells, dim {dim}: store {out['store_bytes_per_cell']} B/cell "
          f"({out['thumbnail_bytes_per_cell']} of it the JPEG thumbnail; "
          f"{out['store_bytes_per_cell_without_thumbnails']} without), "
          f"one float32 HDF5 per slide: {out['hdf5_float32_bytes_per_cell']} B/cell in {out['hdf5_files']} files")
    return out


def memory(args) -> dict:
    results = []
    for n_slides in args.slides:
        rows = chula12_rows(args.data)
        keep = sorted({r["slide_id"] for r in rows}, key=lambda s: int(s.split("-")[1]))[:n_slides]
        rows = [r for r in rows if r["slide_id"] in set(keep)]
        tmp = Path(tempfile.mkdtemp())
        manifest = write_csv(rows, tmp / "m.csv")
        code = ("import resource,sys; from cytostore import ingest, open_source, IngestConfig; "
                f"r = ingest(open_source({str(manifest)!r}), {str(tmp / 'store')!r}, IngestConfig(batch_size=64)); "
                "print(r.cells_added, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
        cells, rss_kb = (int(v) for v in out.stdout.split()[-2:])
        shutil.rmtree(tmp)
        results.append({"slides": n_slides, "cells": cells, "peak_rss_mb": round(rss_kb / 1024, 1)})
        print(f"{n_slides:5d} slides, {cells:6d} cells: peak RSS {rss_kb / 1024:.0f} MB")
    return {"memory": results}


def _real_crops(rows: list[dict], input_size: int) -> np.ndarray:
    """Model-ready crops of real cells, as the ingest makes them."""
    from cytostore import open_source
    from cytostore.embed import CropSpec, plan_tasks, process_task
    from cytostore.encoders import create_encoder
    from cytostore.imaging import CropPolicy
    from cytostore.keys import UidSet

    tmp = Path(tempfile.mkdtemp())
    enc = create_encoder()
    spec = CropSpec(CropPolicy(), input_size or enc.input_size, enc.interpolation)
    tasks = [item for kind, item in plan_tasks(open_source(write_csv(rows, tmp / "m.csv")), UidSet()) if kind == "task"]
    px = [out["pixels"] for out in (process_task(t, spec, UidSet()) for t in tasks) if out["pixels"] is not None]
    shutil.rmtree(tmp)
    return np.concatenate(px)[:len(rows)]


def _embed_all(pixels: np.ndarray, runtime: str, batch_size: int, input_size: int, threads: int) -> np.ndarray:
    from cytostore.embed import Embedder
    from cytostore.encoders import create_encoder
    from cytostore.encoders.lazy import with_input_size

    emb = Embedder(with_input_size(create_encoder(), input_size), "cpu", batch_size, "auto", runtime, threads)
    return np.concatenate([emb(pixels[i:i + batch_size]) for i in range(0, len(pixels), batch_size)])


def runtimes(args) -> dict:
    """One run, same cells: end-to-end ingest with each runtime against the fastest bare forward,
    and the cosine between runtimes on real cells, at each input size."""
    from cytostore import IngestConfig, ingest, open_source
    from cytostore.encoders.runtime import available, cosine_rows, threads_for

    names = [r for r in args.runtimes if r == "torch" or available(r)]
    rows = _subset(args.cells, args.data)
    out = {"cells": len(rows), "batch_size": args.batch_size, "threads": threads_for(args.threads),
           "workers": args.workers, "device_name": _device_name("cpu"), "sizes": {}}
    print(f"{len(rows)} real Chula cells, batch {args.batch_size}, {out['threads']} threads, "
          f"workers {args.workers}; {out['device_name']}")
    for size in args.sizes:
        fig: dict = {"bare_cells_s": {}, "end_to_end_cells_s": {}, "cosine": {}}
        crops = _real_crops(rows, size)
        for r in names:  # warm: exports and tolerance checks are cached before anything is timed
            _embed_all(crops[:args.batch_size], r, args.batch_size, size, args.threads)
        for r in names:
            bare = bare_forward(args.bare_cells, args.batch_size, "cpu", "auto", r, size, args.threads, crops)
            fig["bare_cells_s"][r] = {"cells_s": round(bare, 2), "load_1min": load()}
            print(f"{size} px  bare forward   {r:9s} {bare:7.1f} cells/s  (load {load()})")
        fastest = max(names, key=lambda r: fig["bare_cells_s"][r]["cells_s"])
        for r in names:
            tmp = Path(tempfile.mkdtemp())
            cfg = IngestConfig(batch_size=args.batch_size, workers=args.workers, device="cpu", runtime=r,
                               threads=args.threads, input_size=size)
            t0 = time.perf_counter()
            rep = ingest(open_source(write_csv(rows, tmp / "m.csv")), tmp / "store", cfg)
            wall = time.perf_counter() - t0
            shutil.rmtree(tmp)
            e2e = rep.cells_added / wall
            ratio = e2e / fig["bare_cells_s"][fastest]["cells_s"]
            fig["end_to_end_cells_s"][r] = {"cells_s": round(e2e, 2), "seconds": round(wall, 1),
                                            "vs_fastest_bare": round(ratio, 3), "load_1min": load()}
            print(f"{size} px  end to end     {r:9s} {e2e:7.1f} cells/s  = {ratio:.2f}x the bare forward of "
                  f"{fastest}  ({rep.cells_added} cells in {wall:.1f} s, load {load()})")
        cos_rows = _subset(args.cosine_cells, args.data)[:args.cosine_cells]
        cos_crops = _real_crops(cos_rows, size)
        embs = {r: _embed_all(cos_crops, r, args.batch_size, size, args.threads) for r in names}
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                c = cosine_rows(embs[a], embs[b])
                fig["cosine"][f"{a}_vs_{b}"] = {"n": len(c), "min": float(c.min()), "median": float(np.median(c))}
                print(f"{size} px  cosine {a} vs {b} on {len(c)} real cells: min {c.min():.7f}, "
                      f"median {np.median(c):.7f}")
        fig["fastest_bare"] = fastest
        out["sizes"][str(size)] = fig
    return out


def noop(args) -> dict:
    """Seconds of a re-run with nothing left to embed (every cell stored), in a fresh process."""
    rows = _subset(args.cells, args.data)
    tmp = Path(tempfile.mkdtemp())
    manifest = write_csv(rows, tmp / "m.csv")
    cmd = [sys.executable, "-m", "cli.main", "ingest", str(manifest), "--store", str(tmp / "store"), "--quiet"]
    subprocess.run(cmd, check=True, cwd=REPO, capture_output=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=REPO, capture_output=True)
    wall = time.perf_counter() - t0
    shutil.rmtree(tmp)
    print(f"no-op re-run of {len(rows)} stored cells (new process, CLI): {wall:.1f} s (load {load()})")
    return {"cells": len(rows), "noop_rerun_seconds": round(wall, 2), "load_1min": load()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=["runtimes", "noop", "throughput", "crop", "bytes", "memory"])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--cells", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="auto", help="auto (bf16/fp16 on GPU), fp32, bf16, fp16")
    ap.add_argument("--engine", default="local", choices=["local", "ray"])
    ap.add_argument("--runtime", default="auto", help="auto, torch, onnx or openvino")
    ap.add_argument("--runtimes", nargs="+", default=["torch", "onnx", "openvino"])
    ap.add_argument("--threads", type=int, default=0, help="0 = the cores available")
    ap.add_argument("--input-size", type=int, default=0, help="0 = the encoder's own")
    ap.add_argument("--sizes", type=int, nargs="+", default=[224, 128])
    ap.add_argument("--cosine-cells", type=int, default=1000)
    ap.add_argument("--bare-cells", type=int, default=256, help="cells timed in the bare forward (whole batches)")
    ap.add_argument("--store", type=Path, default=REPO / "runs" / "chula12-store")
    ap.add_argument("--slides", type=int, nargs="+", default=[10, 40, 160])
    args = ap.parse_args()
    parts = {"runtimes": runtimes, "noop": noop, "throughput": throughput, "crop": crop_rate, "bytes": bytes_per_cell,
             "memory": memory}
    out = parts[args.part](args)
    out["peak_rss_mb_this_process"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
