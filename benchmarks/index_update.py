"""Incremental add of new rows into an IVF-PQ index (`cytostore index update`) vs a full rebuild.

Data: generated vectors, not real embeddings: 1,024 Gaussian clusters (unit-variance
centres, noise 0.6) in ``--dim`` dimensions, float16, written through the store's
own writer (`cytostore.store.writer.CellWriter`, commits of 65,536 rows) into a
cell table with stable row ids. Code paths, all the library's own:
`cytostore.index.build_index` (ivf-pq), the rows appended through the writer,
`cytostore.index.update_index` (add_with_ids of the new rows read by stable row id),
then `build_index` again on the grown table; recall@10 through
`cytostore.search.knn` (FAISS, then exact re-ranking of 100 candidates taken from
Lance) against exact top-10 by numpy over every row.

    nice -n 10 .venv/bin/python benchmarks/index_update.py --n 1000000 --add 100000

Prints plain lines, then one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

TABLE = "generated"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Vectors:
    """Clustered Gaussian vectors, reproducible by seed (the same centres for every draw)."""

    def __init__(self, dim: int, seed: int, clusters: int = 1024):
        self.centres = np.random.default_rng(seed).standard_normal((clusters, dim)).astype(np.float32)
        self.rng = np.random.default_rng(seed + 1)

    def sample(self, n: int) -> np.ndarray:
        c = self.rng.integers(0, len(self.centres), n)
        x = self.centres[c] + 0.6 * self.rng.standard_normal((n, self.centres.shape[1]), dtype=np.float32)
        return x.astype(np.float16)


def rows(uids: np.ndarray, x: np.ndarray) -> pa.Table:
    """Cell rows in the table schema (no images: empty thumbnails, placeholder keys)."""
    from cytostore.store import schema

    n, dim = x.shape
    prov = {"encoder": {"name": "generated", "weights_sha256": "0" * 64}, "embedding_dtype": "float16"}
    target = schema.arrow_schema("cells", dim=dim, metadata=prov)
    cols = {"uid": pa.array(np.asarray(uids, np.int64)), "slide_id": pa.array((uids // 1000).astype(str)),
            "cell_id": pa.array(uids.astype(str)), "x": np.zeros(n), "y": np.zeros(n),
            "crop_size": np.full(n, 64, np.int32), "label": pa.nulls(n, pa.string()),
            "image": pa.array(["none"] * n), "source_ref": pa.array(["generated"] * n),
            "thumbnail": pa.array([b""] * n, pa.binary()), "run_id": pa.array(["bench"] * n),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), dim)}
    return pa.table({f.name: (cols[f.name] if f.name in cols else pa.nulls(n, f.type)) for f in target}).cast(target)


def write(store, start: int, x: np.ndarray, chunk: int = 65_536) -> float:
    """Appends ``x`` under uids start.. through the store writer; returns seconds."""
    from cytostore.store.writer import CellWriter

    t0 = time.perf_counter()
    with CellWriter(store, TABLE) as w:
        for s in range(0, len(x), chunk):
            w.append(rows(np.arange(start + s, start + min(len(x), s + chunk)), x[s:s + chunk]))
    return time.perf_counter() - t0


def exact_top(db: np.ndarray, q: np.ndarray, k: int = 10, chunk: int = 131_072) -> np.ndarray:
    from cytostore.index import RunningTopK, prepare

    top = RunningTopK(q, k)
    for s in range(0, len(db), chunk):
        top.update(np.arange(s, min(len(db), s + chunk)), prepare(db[s:s + chunk]))
    return top.ids


def recall(store, q: np.ndarray, truth: np.ndarray, k: int = 10) -> tuple[float, float]:
    """(recall@10, mean ms per query) through the library's knn on the loaded index."""
    from cytostore.index import load_index
    from cytostore.search import knn

    bound = load_index(store)
    t0 = time.perf_counter()
    found = [knn(bound, v, k)[1] for v in q]
    ms = 1000 * (time.perf_counter() - t0) / len(q)
    return float(np.mean([len(set(f.tolist()) & set(t.tolist())) / k for f, t in zip(found, truth)])), ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="rows indexed at the build")
    ap.add_argument("--add", type=int, default=100_000, help="rows appended, then added in place")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--train-size", type=int, default=131_072)
    ap.add_argument("--workdir", default="/tmp/cytostore-index-update")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from cytostore import CellStore
    from cytostore.index import IndexParams, build_index, prepare, update_index

    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    store = CellStore.create(work / "store")
    gen = Vectors(args.dim, args.seed)
    base, extra, q = gen.sample(args.n), gen.sample(args.add), prepare(gen.sample(args.queries))
    write_s = write(store, 0, base)
    log(f"{args.n} generated {args.dim}-d rows written through the store writer in {write_s:.0f} s")
    params = IndexParams(kind="ivf-pq", train_size=args.train_size, seed=args.seed)
    side = build_index(store, kind="ivf-pq", params=params)
    log(f"build on {args.n}: {side['build_seconds']} s, {side['params']['factory']}, nprobe {side['params']['nprobe']}")
    append_s = write(store, args.n, extra)
    log(f"{args.add} rows appended in {append_s:.1f} s")
    truth = exact_top(np.concatenate([base, extra]), q)
    stale_recall, stale_ms = recall(store, q, truth)
    log(f"stale index (new rows searched exactly): recall@10 {stale_recall:.4f}, {stale_ms:.1f} ms/query")
    t0 = time.perf_counter()
    up = update_index(store)
    update_s = time.perf_counter() - t0
    up_recall, up_ms = recall(store, q, truth)
    log(f"update ({up['action']}, +{up['added']}): {update_s:.1f} s, recall@10 {up_recall:.4f}, {up_ms:.1f} ms/query")
    t0 = time.perf_counter()
    reb = build_index(store, kind="ivf-pq", params=params)
    rebuild_s = time.perf_counter() - t0
    rb_recall, rb_ms = recall(store, q, truth)
    log(f"rebuild on {args.n + args.add}: {rebuild_s:.1f} s, recall@10 {rb_recall:.4f}, {rb_ms:.1f} ms/query")
    out = {"benchmark": "index_update", "n": args.n, "add": args.add, "dim": args.dim, "data": "generated clusters",
           "build_s": side["build_seconds"], "factory": side["params"]["factory"], "nprobe": side["params"]["nprobe"],
           "stale": {"recall_at_10": round(stale_recall, 4), "ms_per_query": round(stale_ms, 2)},
           "update": {"seconds": round(update_s, 1), "action": up["action"], "added": up["added"],
                      "recall_at_10": round(up_recall, 4), "ms_per_query": round(up_ms, 2),
                      "imbalance": up.get("sidecar", {}).get("rebuild_threshold")},
           "rebuild": {"seconds": round(rebuild_s, 1), "nprobe": reb["params"]["nprobe"],
                       "recall_at_10": round(rb_recall, 4), "ms_per_query": round(rb_ms, 2)}}
    print(f"\n{'step':<38} {'seconds':>8} {'recall@10':>10} {'ms/query':>9}")
    print(f"{'build on ' + str(args.n):<38} {side['build_seconds']:>8.1f} {'':>10} {'':>9}")
    print(f"{'stale (new rows exact)':<38} {'':>8} {stale_recall:>10.4f} {stale_ms:>9.2f}")
    print(f"{'index update (+' + str(args.add) + ')':<38} {update_s:>8.1f} {up_recall:>10.4f} {up_ms:>9.2f}")
    print(f"{'full rebuild on ' + str(args.n + args.add):<38} {rebuild_s:>8.1f} {rb_recall:>10.4f} {rb_ms:>9.2f}")
    print(json.dumps(out, default=str))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
