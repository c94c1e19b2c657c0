"""Single-query latency of the library's own search path on a real store.

`search_scale.py` re-ranks candidates from a float16 file; this one measures what a
user gets: an index of the given kind built on a copy of the store, then
`cytostore.search.knn` (FAISS, then exact re-ranking with the candidates'
embeddings read from Lance by `take`) and `cytostore.search.search` by cell id
(the Python API call: it opens the store and its index, looks the query cell up,
searches and returns the result rows as an Arrow table).

    .venv/bin/python benchmarks/search_latency.py --store runs/chula12-store --kind ivf-pq

The store itself is not touched (the copy lives in a temporary folder).
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
    args = ap.parse_args()

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


if __name__ == "__main__":
    main()
