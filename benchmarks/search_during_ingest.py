"""Search latency on a quiet table vs while another process appends to it, with index loads counted.

Data: generated vectors, not real embeddings (clustered Gaussians, float16, as in
`index_update.py`), written through the store writer into a table with stable row
ids; an index of ``--kind`` built with `cytostore.index.build_index`. Queries are
generated vectors searched through the library's own path,
`cytostore.search.run_search(store, vector=...)`: it opens the table's latest
version, binds the (cached) index to it, searches FAISS plus the rows appended
since the build exactly, and reads the result rows from Lance.

The ingest is a separate process holding a `cytostore.store.writer.CellWriter`
that commits every ``--every`` seconds (its time policy) while rows arrive in
small batches, as an ingest does.

    nice -n 10 .venv/bin/python benchmarks/search_during_ingest.py --n 200000

Prints plain lines, then one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import shutil
import time
from pathlib import Path

import numpy as np
from index_update import TABLE, Vectors, rows, write  # this folder is on sys.path when run as a script


def ingest(root: str, start: int, dim: int, every: float, duration: float, batch: int, seed: int) -> None:
    """Appends ``batch`` rows twice a second for ``duration`` s; the writer commits every ``every`` s."""
    from cytostore import CellStore
    from cytostore.store.writer import CellWriter, CommitPolicy

    gen = Vectors(dim, seed)
    store = CellStore.open(root)
    t_end = time.monotonic() + duration
    uid = start
    with CellWriter(store, TABLE, CommitPolicy(commit_rows=10**9, commit_seconds=every, compact_every=10**6),
                    wait=True) as w:
        while time.monotonic() < t_end:
            w.append(rows(np.arange(uid, uid + batch), gen.sample(batch)))
            uid += batch
            time.sleep(0.5)


def stats_ms(ms: list[float]) -> dict:
    a = np.array(ms)
    return {"queries": len(a), "p50_ms": round(float(np.percentile(a, 50)), 2),
            "p99_ms": round(float(np.percentile(a, 99)), 2), "max_ms": round(float(a.max()), 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--kind", default="flat", choices=["flat", "ivf-pq", "hnsw"])
    ap.add_argument("--queries", type=int, default=300, help="queries on the quiet table")
    ap.add_argument("--every", type=float, default=5.0, help="seconds between the ingest's commits")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds the ingest runs")
    ap.add_argument("--batch", type=int, default=200, help="rows the ingest hands the writer every 0.5 s")
    ap.add_argument("-k", type=int, default=10)
    ap.add_argument("--workdir", default="/tmp/cytostore-search-during-ingest")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from cytostore import CellStore
    from cytostore.index import build_index, clear_cache, stats
    from cytostore.search import run_search

    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    store = CellStore.create(work / "store")
    gen = Vectors(args.dim, args.seed)
    write_s = write(store, 0, gen.sample(args.n))
    side = build_index(store, kind=args.kind)
    print(f"{args.n} generated {args.dim}-d rows written in {write_s:.0f} s; {side['kind']} index built in "
          f"{side['build_seconds']} s", flush=True)
    queries = gen.sample(args.queries).astype(np.float32)
    clear_cache()
    s0 = stats()

    def one(v) -> tuple[float, int]:
        t0 = time.perf_counter()
        res = run_search(store, vector=v, k=args.k)
        return 1000 * (time.perf_counter() - t0), res.index["table_version"]

    one(queries[0])  # the first search loads the index
    quiet = [one(v)[0] for v in queries]
    s1 = stats()
    proc = mp.get_context("spawn").Process(target=ingest, args=(store.root, 10**9, args.dim, args.every,
                                                                 args.duration, args.batch, args.seed + 7))
    proc.start()
    busy, versions, first_after_commit = [], [], []
    i = 0
    while proc.is_alive():
        ms, version = one(queries[i % len(queries)])
        if versions and version != versions[-1]:
            first_after_commit.append(ms)
        busy.append(ms)
        versions.append(version)
        i += 1
    proc.join()
    s2 = stats()
    last = run_search(store, vector=queries[0], k=args.k).index
    out = {"benchmark": "search_during_ingest", "n": args.n, "dim": args.dim, "kind": side["kind"], "k": args.k,
           "data": "generated clusters", "code_path": "cytostore.search.run_search(vector=...)",
           "ingest": {"commit_every_s": args.every, "duration_s": args.duration, "rows_per_s": args.batch * 2,
                      "commits_seen": len(set(versions)) - 1, "rows_searched_exactly_at_end": last["searched_exactly"]},
           "quiet": {**stats_ms(quiet), "index_loads": s1["index_loads"] - s0["index_loads"]},
           "during_ingest": {**stats_ms(busy), "index_loads": s2["index_loads"] - s1["index_loads"],
                             "delta_scans": s2["delta_scans"] - s1["delta_scans"],
                             "full_uid_scans": s2["uid_scans"] - s1["uid_scans"]},
           "first_query_after_a_commit": stats_ms(first_after_commit) if first_after_commit else None}
    print(f"\n{'phase':<28} {'queries':>7} {'p50_ms':>7} {'p99_ms':>7} {'max_ms':>7} {'index loads':>11}")
    for name, key in (("quiet table", "quiet"), ("while ingest commits", "during_ingest")):
        r = out[key]
        print(f"{name:<28} {r['queries']:>7} {r['p50_ms']:>7} {r['p99_ms']:>7} {r['max_ms']:>7} {r['index_loads']:>11}")
    if first_after_commit:
        r = out["first_query_after_a_commit"]
        print(f"{'first query after a commit':<28} {r['queries']:>7} {r['p50_ms']:>7} {r['p99_ms']:>7} {r['max_ms']:>7}")
    print(f"ingest: {out['ingest']['commits_seen']} commits seen, {out['during_ingest']['delta_scans']} delta scans, "
          f"{out['during_ingest']['full_uid_scans']} full uid scans, {last['searched_exactly']} rows searched exactly at the end")
    print(json.dumps(out))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
