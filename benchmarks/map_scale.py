"""How maps scale: UMAP coordinates, PNG, HTML and mosaic on a store of up to 1M cells.

No real collection here has a million cells, so the big store is GENERATED from
real vectors: every generated cell starts from a real cell of --real-store (its
embedding, label and thumbnail) and moves towards one of that cell's 10 nearest
real neighbours by a random fraction, plus a little Gaussian noise (5% of the
per-dimension spread) - SMOTE-style, so the vectors stay on the real manifold,
with the real dimension, dtype and cluster structure. Generated cells are
grouped into slides of 40 cells.

    .venv/bin/python benchmarks/map_scale.py --real-store runs/chula12-store --cells 1000000

Prints one line per figure, then one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cytostore.store import schema  # noqa: E402
from cytostore.keys import cell_uid  # noqa: E402
from cytostore.store import CellStore, conform, embedding_matrix  # noqa: E402
from cytostore.store.writer import CellWriter  # noqa: E402

TABLE = "generated"
CELLS_PER_SLIDE = 40


def rss_gib() -> float:
    """Peak resident memory of this process so far, GiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def real_cells(store: str, limit: int, seed: int):
    s = CellStore.open(store)
    ds = s.dataset()
    n = ds.count_rows()
    rows = np.sort(np.random.default_rng(seed).choice(n, size=min(n, limit), replace=False))
    t = ds.take(rows, columns=["embedding", "label", "thumbnail"])
    return np.asarray(embedding_matrix(t.column("embedding")), np.float32), t.column("label").to_pylist(), \
        t.column("thumbnail").to_pylist(), ds.schema.field("embedding").type


def generate(real: np.ndarray, neighbours: np.ndarray, spread: np.ndarray, n: int, rng: np.random.Generator):
    """``n`` generated vectors and the real cell each one came from."""
    src = rng.integers(0, len(real), n)
    nb = neighbours[src, rng.integers(0, neighbours.shape[1], n)]
    t = rng.uniform(0, 1, (n, 1)).astype(np.float32)
    v = real[src] + t * (real[nb] - real[src]) + 0.05 * spread * rng.standard_normal((n, real.shape[1]), np.float32)
    return v, src


def build_store(path: Path, real_store: str, cells: int, seed: int, chunk: int = 100_000) -> dict:
    import faiss

    t0 = time.perf_counter()
    real, labels, thumbs, emb_type = real_cells(real_store, 1_000_000, seed)
    unit = real / np.linalg.norm(real, axis=1, keepdims=True)
    index = faiss.IndexFlatIP(unit.shape[1])
    index.add(unit)
    neighbours = index.search(unit, 11)[1][:, 1:]
    spread = real.std(axis=0)
    dim = real.shape[1]
    dtype = "float16" if pa.types.is_float16(emb_type.value_type) else "float32"
    sch = schema.arrow_schema("cells", dim=dim, embedding_dtype=dtype,
                              metadata={"encoder": {"name": TABLE, "generated_from": real_store}})
    store = CellStore.create(path)
    rng = np.random.default_rng(seed)
    labels_a = np.array(labels, dtype=object)
    thumbs_a = np.array(thumbs, dtype=object)
    writer = CellWriter(store, TABLE)
    for start in range(0, cells, chunk):
        n = min(chunk, cells - start)
        v, src = generate(real, neighbours, spread, n, rng)
        ids = np.arange(start, start + n)
        slide = [f"gen-{i // CELLS_PER_SLIDE}" for i in ids]
        cell = [f"g{i}" for i in ids]
        cols = {
            "uid": pa.array([cell_uid(s, c) for s, c in zip(slide, cell)], pa.int64()),
            "slide_id": slide, "cell_id": cell,
            "x": np.zeros(n), "y": np.zeros(n), "crop_size": pa.array(np.full(n, 64, np.int32)),
            "label": labels_a[src].tolist(), "image": ["generated"] * n, "source_ref": ["benchmarks/map_scale.py"] * n,
            "thumbnail": pa.array(thumbs_a[src].tolist(), pa.binary()), "run_id": ["map_scale"] * n,
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(v.astype(dtype).ravel()), dim),
        }
        writer.append(conform(pa.Table.from_pydict(cols), sch))
        print(f"  generated {start + n} cells", file=sys.stderr, flush=True)
    writer.close()
    return {"real_cells": len(real), "dim": dim, "dtype": dtype, "seconds": round(time.perf_counter() - t0, 1)}


def timed(fn, *args, **kwargs):
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, round(time.perf_counter() - t, 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--real-store", default="runs/chula12-store", help="store whose vectors the generated ones follow")
    ap.add_argument("--cells", type=int, default=1_000_000, help="cells in the generated store")
    ap.add_argument("--fit-sample", type=int, default=50_000, help="cells UMAP is fitted on")
    ap.add_argument("--work", default="/tmp/cytostore-map-scale", help="folder for the generated store (deleted first)")
    ap.add_argument("--keep", action="store_true", help="keep the generated store")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from cytostore.maps import UmapParams, compute_umap, load_map_data, mosaic, render_html, render_png

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    path = work / "store"
    gen = build_store(path, args.real_store, args.cells, args.seed)
    print(f"generated {args.cells} cells (dim {gen['dim']}, {gen['dtype']}) from {gen['real_cells']} real cells of "
          f"{args.real_store} in {gen['seconds']} s")
    params = UmapParams(fit_sample=args.fit_sample, seed=args.seed)
    coords, first_s = timed(compute_umap, path, TABLE, params=params)
    meta = schema.read_metadata(coords.schema)
    print(f"UMAP coordinates of {meta['cells']} cells: {first_s} s (read {meta['seconds']['read_s']} s, fit on "
          f"{meta['fitted_cells']} cells {meta['seconds']['fit_s']} s, projection of {meta['projected_cells']} cells "
          f"{meta['seconds']['project_s']} s = {meta['projected_cells'] / max(meta['seconds']['project_s'], 1e-9):.0f} cells/s)")
    _, reuse_s = timed(compute_umap, path, TABLE, params=params)
    print(f"second call (stored coordinates reused): {reuse_s} s")
    data_all, load_all_s = timed(load_map_data, path, "label", None, None, TABLE, args.seed, params)
    _, png_all_s = timed(render_png, data_all, work / "map-all.png")
    print(f"PNG of all {data_all.n} cells: gather {load_all_s} s, draw {png_all_s} s")
    del data_all
    data_h, load_h_s = timed(load_map_data, path, "label", None, 20_000, TABLE, args.seed, params)
    html, html_s = timed(render_html, data_h, work / "map.html", store=path)
    print(f"HTML of 20000 sampled cells: gather {load_h_s} s, thumbnails + write {html_s} s, "
          f"{html['bytes'] / 2**20:.1f} MiB")
    data_m, load_m_s = timed(load_map_data, path, "label", None, None, TABLE, args.seed, params)
    mo, mosaic_s = timed(mosaic, data_m, work / "mosaic.png", store=path, grid=24)
    print(f"mosaic 24x24 over all cells: gather {load_m_s} s, draw {mosaic_s} s, {mo['tiles']} tiles")
    peak = round(rss_gib(), 2)
    print(f"peak resident memory: {peak} GiB")
    result = {
        "benchmark": "map_scale", "cells": args.cells, "generated_from": args.real_store, **gen,
        "fit_sample": args.fit_sample, "umap_first_s": first_s, "umap_seconds": meta["seconds"],
        "projection_cells_per_s": round(meta["projected_cells"] / max(meta["seconds"]["project_s"], 1e-9)),
        "umap_reuse_s": reuse_s, "png_all_gather_s": load_all_s, "png_all_draw_s": png_all_s,
        "html_20k_gather_s": load_h_s, "html_20k_write_s": html_s, "html_20k_mib": round(html["bytes"] / 2**20, 1),
        "mosaic_gather_s": load_m_s, "mosaic_draw_s": mosaic_s, "peak_rss_gib": peak,
    }
    if not args.keep:
        shutil.rmtree(path, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
