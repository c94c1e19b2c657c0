"""Single-query latency of the library's own search path on a real store.

`search_scale.py` re-ranks candidates from a float16 file; this one measures what a
user gets: an index of the given kind built on a copy of the store, then
`cytostore.search.knn` (FAISS, then exact re-ranking with the candidates'
embeddings read from Lance by `take`) and `cytostore.search.search` by cell id
(the Python API call: it opens the store and its index, looks the query cell up,
searches and returns the result rows as an Arrow table).

    .venv/bin/python benchmarks/search_latency.py --store runs/chula12-store --kind ivf-pq

The store itself is not touched (the copy lives in a temporary folder).

With ``--n N`` it measures one index three ways at scale instead: the store's real
embeddings plus generated ones (``search_scale.py``'s generator and float16 vector
file) are written through the store writer into a Lance cell table, an ivf-pq
index is built on it with `cytostore.index.build_index`, and the held-out real
cells are searched by

1. the library's own path: `cytostore.search.knn` on `load_index(store)`, FAISS then
   exact re-ranking of 100 candidates taken from Lance by stable row id;
2. the benchmark-only file path: the same loaded FAISS index through `knn`, but the
   candidates re-ranked from the float16 file (one `pread` each), as `search_scale.py` does;
3. FAISS flat (`IndexFlatIP` on the L2-normalised float32 vectors): the exact row,
   whose batch answer is the ground truth for recall@10.

    nice -n 10 .venv/bin/python benchmarks/search_latency.py --store runs/chula12-store --n 1000000

Prints plain lines, then one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
from search_scale import latency  # this folder is on sys.path when run as a script


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--store", required=True)
    ap.add_argument("--kind", default="ivf-pq", choices=["flat", "ivf-pq", "hnsw"])
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("-k", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n", type=int, default=0, help="scale mode: database size (real + generated cells)")
    ap.add_argument("--workdir", default="/tmp/cytostore-search-latency")
    ap.add_argument("--train-size", type=int, default=131_072)
    ap.add_argument("--flat-single", type=int, default=30, help="single queries timed through FAISS flat")
    ap.add_argument("--flat-max-gb", type=float, default=8.0,
                    help="largest FAISS flat index held in RAM; beyond it the exact answer is streamed")
    args = ap.parse_args()
    if args.n:
        run_paths(args)
        return

    from cytostore import CellStore
    from cytostore.index import build_index, load_index
    from cytostore.search import knn, search

    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "store"
        shutil.copytree(args.store, copy)
        side = build_index(copy, kind=args.kind)
        print(f"built {side['kind']} index on {side['rows']} cells")
        store = CellStore.open(copy)
        emb, keys = store.embeddings()
        rng = np.random.default_rng(args.seed)
        pick = np.sort(rng.choice(len(keys), min(args.queries, len(keys)), replace=False))
        slides, cells = keys.column("slide_id").to_pylist(), keys.column("cell_id").to_pylist()
        bound = load_index(copy)

        qs = np.asarray(emb[pick], np.float32)
        qs /= np.linalg.norm(qs, axis=1, keepdims=True)
        knn(bound, qs[0], args.k)  # warm up
        _, by_vector = latency(lambda q: knn(bound, q, args.k), qs)
        _, by_cell = latency(lambda i: search(copy, slides[i], cells[i], k=args.k), pick)

    out = {"benchmark": "search_latency", "store": args.store, "kind": side["kind"], "cells": side["rows"],
           "k": args.k, "knn_by_vector": by_vector, "search_by_cell": by_cell}
    print(f"knn by vector (FAISS + re-rank from Lance): p50 {out['knn_by_vector']['p50_ms']} ms, "
          f"p99 {out['knn_by_vector']['p99_ms']} ms")
    print(f"store.search by cell id (open + lookup + knn + result rows): p50 {out['search_by_cell']['p50_ms']} ms, "
          f"p99 {out['search_by_cell']['p99_ms']} ms")
    print(json.dumps(out))


def _lance_table(store, db, table: str) -> float:
    """Writes the vector file into a cell table through the store writer (uid = row number); returns seconds."""
    import time

    from cytostore.store.writer import CellWriter
    from index_update import rows
    from search_scale import CHUNK

    t0 = time.perf_counter()
    with CellWriter(store, table) as w:
        for start in range(0, len(db), CHUNK):
            stop = min(len(db), start + CHUNK)
            w.append(rows(np.arange(start, stop), db.read(start, stop)))
    return time.perf_counter() - t0


def run_paths(args) -> None:
    """Scale mode: one ivf-pq index searched by the library path and the file path, beside FAISS flat."""
    import os
    import time

    import faiss
    from search_scale import FileBound, VectorFile, batches, load_generator, log, make_db, normalised, recall

    from cytostore import CellStore
    from cytostore.index import IndexParams, build_index, load_index
    from cytostore.search import knn

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    real = np.asarray(CellStore.open(args.store).embeddings()[0])
    perm = np.random.default_rng(args.seed).permutation(len(real))
    real_q, real_db = real[perm[: args.queries]], real[perm[args.queries:]]
    gen, _ = load_generator(work, len(real), real_db, args.queries, args.seed)
    path = work / f"db_{args.n}.f16.npy"
    db = VectorFile(path) if path.is_file() else None
    if db is None or db.nbytes != args.n * real.shape[1] * 2:
        db = make_db(path, args.n, real_db, gen)
    log(f"{len(real)} real cells ({len(real_q)} held out as queries) + generated: {len(db)} x {real.shape[1]} float16")
    store_path = work / "store"
    if store_path.exists():
        import shutil

        shutil.rmtree(store_path)
    store = CellStore.create(store_path)
    write_s = _lance_table(store, db, "generated")
    log(f"Lance table written through the store writer in {write_s:.0f} s")
    side = build_index(store, kind="ivf-pq", params=IndexParams(train_size=args.train_size, seed=args.seed))
    log(f"ivf-pq built in {side['build_seconds']} s: {side['params']['factory']}, nprobe {side['params']['nprobe']}")
    q = normalised(real_q)
    flat_bytes = len(db) * db.shape[1] * 4
    if flat_bytes <= args.flat_max_gb * 1e9:
        flat = faiss.IndexFlatIP(db.shape[1])
        for _, x in batches(db):
            flat.add(x)
        t0 = time.perf_counter()
        _, truth = flat.search(q, args.k)
        flat_batch_s = time.perf_counter() - t0
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)  # single queries on one thread, as the library runs them
        _, flat_lat = latency(lambda v: flat.search(v[None], args.k)[1][0], q[: args.flat_single])
        faiss.omp_set_num_threads(threads)
        del flat
    else:
        # A flat index of this size does not fit in RAM: the exact answer is streamed from the
        # vector file instead (same vectors, same result), and there is no flat latency row.
        from search_scale import exact_truth

        t0 = time.perf_counter()
        truth = exact_truth(db, q, args.k)
        flat_batch_s, flat_lat = time.perf_counter() - t0, None
        log(f"exact answer streamed in {flat_batch_s:.0f} s (a flat index would need {flat_bytes / 1e9:.0f} GB)")
    bound = load_index(store)
    knn(bound, q[0], args.k)
    lib_found, lib_lat = latency(lambda v: knn(bound, v, args.k)[1], q)
    fb = FileBound(bound.index, bound.info, db)
    file_found, file_lat = latency(lambda v: knn(fb, v, args.k)[1], q)
    rows = [("cytostore ivf-pq, re-rank from Lance (library path)", "cytostore.search.knn(load_index(store))",
             recall(lib_found, truth), lib_lat),
            ("cytostore ivf-pq, re-rank from float16 file", "benchmark-only FileBound (search_scale.py)",
             recall(file_found, truth), file_lat),
            ("FAISS flat (exact)", "faiss.IndexFlatIP, benchmark-only", 1.0, flat_lat)]
    rows = [r for r in rows if r[3] is not None]
    out = {"benchmark": "search_latency_paths", "n": len(db), "dim": int(db.shape[1]), "real_cells": len(real),
           "queries": len(q), "k": args.k, "cpus": os.cpu_count(), "lance_write_s": round(write_s, 1),
           "index": {"factory": side["params"]["factory"], "nprobe": side["params"]["nprobe"],
                     "build_s": side["build_seconds"], "bytes": side["index_bytes"]},
           "flat": {"bytes": flat_bytes, "batch_qps": round(len(q) / flat_batch_s, 1)},
           "rows": [{"method": m, "code_path": c, "recall_at_10": round(r, 4), **lat} for m, c, r, lat in rows]}
    print(f"\n{'method':<55} {'recall@10':>9} {'p50_ms':>7} {'p99_ms':>7} {'queries':>7}")
    for m, _, r, lat in rows:
        print(f"{m:<55} {r:>9.4f} {lat['p50_ms']:>7} {lat['p99_ms']:>7} {lat['queries']:>7}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
