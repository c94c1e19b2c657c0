"""Does similar-cell search find cells of the same class? Precision@k against chance.

For every labelled cell of a store (or a seeded sample of them) the k nearest
cells are found through the library's own search path (`cytostore.search.knn`
on the table's index; the query cell itself is never a result), once over the
whole table and once with --exclude-same-slide semantics. Precision@k is the
fraction of neighbours that carry the query's label.

Chance, for a query of class c: the expected same-label rate of a random
neighbour, (n_c - 1) / (N - 1) over the whole table, or
(n_c - n_c,slide) / (N - n_slide) when the query's slide is excluded; the
overall chance is its mean over the queries (close to sum_c p_c^2).

    .venv/bin/python benchmarks/search_quality.py --store runs/chula12-store

Prints plain lines, then one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--store", required=True)
    ap.add_argument("--encoder", default=None)
    ap.add_argument("-k", type=int, default=10)
    ap.add_argument("--queries", type=int, default=0, help="query cells (seeded sample); 0 = every labelled cell")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kind", default="auto", help="index kind built when the index is missing or stale")
    args = ap.parse_args()

    from cytostore import CellStore
    from cytostore.index import build_index, load_index, prepare, verify_index
    from cytostore.search import knn

    store = CellStore.open(args.store)
    report = verify_index(store, args.encoder)
    if not report["fresh"]:
        print(f"index missing or stale ({'; '.join(report['problems'])}): building it ({args.kind})")
        build_index(store, args.encoder, kind=args.kind)
    bound = load_index(store, args.encoder, require=True)
    meta = bound.dataset.to_table(columns=["uid", "slide_id", "label", "embedding"])
    from cytostore.store import embedding_matrix

    x = prepare(embedding_matrix(meta.column("embedding")), bound.metric)
    uids = meta.column("uid").to_numpy()
    slides = np.array(meta.column("slide_id").to_pylist(), dtype=object)
    labels = np.array([v if v is not None else "" for v in meta.column("label").to_pylist()], dtype=object)
    n = len(uids)
    labelled = np.flatnonzero(labels != "")
    rng = np.random.default_rng(args.seed)
    queries = labelled if not args.queries or args.queries >= len(labelled) else np.sort(
        rng.choice(labelled, args.queries, replace=False))
    label_of = dict(zip(uids.tolist(), labels.tolist()))
    by_slide: dict[str, list[int]] = defaultdict(list)
    for u, s in zip(uids.tolist(), slides.tolist()):
        by_slide[s].append(u)
    slide_uids = {s: np.array(v, np.int64) for s, v in by_slide.items()}
    n_class = defaultdict(int)
    n_class_slide = defaultdict(int)
    for s, lab in zip(slides.tolist(), labels.tolist()):
        n_class[lab] += 1
        n_class_slide[(s, lab)] += 1

    print(f"store {args.store}: table {bound.table}, {n} cells, {len(labelled)} labelled, "
          f"{len(slide_uids)} slides, index {bound.info['kind']}; {len(queries)} queries, k={args.k}")
    results = {}
    for mode in ("all", "exclude_same_slide"):
        hits = np.zeros(len(queries))
        chance = np.zeros(len(queries))
        t0 = time.perf_counter()
        for j, i in enumerate(queries):
            lab, slide = labels[i], slides[i]
            banned = slide_uids[slide] if mode == "exclude_same_slide" else np.array([uids[i]])
            _, nb, _ = knn(bound, x[i], args.k, banned=banned)
            hits[j] = np.mean([label_of[u] == lab for u in nb.tolist()])
            if mode == "all":
                chance[j] = (n_class[lab] - 1) / (n - 1)
            else:
                chance[j] = (n_class[lab] - n_class_slide[(slide, lab)]) / (n - len(slide_uids[slide]))
        secs = time.perf_counter() - t0
        per_class = {}
        qlabels = labels[queries]
        for lab in sorted(set(qlabels.tolist()), key=lambda c: -n_class[c]):
            m = qlabels == lab
            per_class[lab] = {"queries": int(m.sum()), "precision": round(float(hits[m].mean()), 4),
                              "chance": round(float(chance[m].mean()), 4)}
        results[mode] = {
            "precision_at_k": round(float(hits.mean()), 4), "chance": round(float(chance.mean()), 4),
            "macro_precision": round(float(np.mean([v["precision"] for v in per_class.values()])), 4),
            "macro_chance": round(float(np.mean([v["chance"] for v in per_class.values()])), 4),
            "seconds": round(secs, 1), "ms_per_query": round(1000 * secs / len(queries), 2), "per_class": per_class,
        }
        r = results[mode]
        print(f"\n[{mode}] precision@{args.k} {r['precision_at_k']:.3f} (chance {r['chance']:.3f}); macro over classes "
              f"{r['macro_precision']:.3f} (chance {r['macro_chance']:.3f}); {r['ms_per_query']:.1f} ms/query")
        print(f"  {'class':<16}{'queries':>8}{'P@k':>8}{'chance':>8}")
        for lab, v in per_class.items():
            print(f"  {lab:<16}{v['queries']:>8}{v['precision']:>8.3f}{v['chance']:>8.3f}")
    print(json.dumps({"benchmark": "search_quality", "store": args.store, "table": bound.table, "cells": n,
                      "labelled": int(len(labelled)), "slides": len(slide_uids), "queries": int(len(queries)),
                      "k": args.k, "index_kind": bound.info["kind"], "results": results}))


if __name__ == "__main__":
    main()
