"""Unsupervised clusters of the stored embeddings, written back as a prediction set.

k-means (FAISS, seeded) on L2-normalised embeddings, i.e. on cosine geometry
(spherical k-means: the centroids are re-normalised at each iteration). The result is
written with ``cytostore.fewshot.tables.write_predictions`` as ``predictions.<name>``:
``prediction`` is the cluster (``c0`` the largest, ``c1`` the next, ...), ``score`` the cosine
to its centroid, ``runner_up``/``margin`` the second-closest cluster and the gap, and
``prototypes_version`` is -1 (no prototype set made it). Anything that reads prediction
sets reads clusters unchanged: ``map --color-by prediction:NAME``, ``export geojson
--predictions NAME``, the DuckDB view ``predictions_NAME``.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa

from cytostore.errors import InputError, StoreError
from cytostore.store import CellStore, embedding_matrix
from cytostore.store.filters import check_where

METHODS = ("kmeans",)
NOT_FROM_PROTOTYPES = -1  # prototypes_version of a clustering's rows
MAX_TRAIN_PER_CLUSTER = 256  # k-means trains on at most k x this many cells (uniform sample); all are assigned
BATCH_ROWS = 16_384


def _normalised(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return np.ascontiguousarray(x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12))


def _sample(ds, where: str | None, n: int, m: int, seed: int) -> np.ndarray:
    """``m`` of the ``n`` matching cells' normalised embeddings, drawn uniformly (seeded)."""
    take = np.sort(np.random.default_rng(seed).choice(n, size=m, replace=False)) if m < n else np.arange(n)
    parts, seen = [], 0
    for b in ds.to_batches(columns=["embedding"], filter=where, batch_size=BATCH_ROWS):
        lo, hi = np.searchsorted(take, [seen, seen + b.num_rows])
        if hi > lo:
            parts.append(_normalised(embedding_matrix(b.column(0))[take[lo:hi] - seen]))
        seen += b.num_rows
    return np.concatenate(parts)


def _train(x: np.ndarray, k: int, seed: int, niter: int):
    import faiss

    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, spherical=True, verbose=False,
                      # The sample is already drawn: no FAISS re-sampling, no "too few points" warning.
                      min_points_per_centroid=1, max_points_per_centroid=len(x) // k + 1)
    km.train(x)
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(km.centroids)
    return index


def cluster(store: CellStore | str | Path, name: str, k: int = 8, method: str = "kmeans",
            encoder: str | None = None, where: str | None = None, seed: int = 0, niter: int = 25,
            progress: Callable[[int, int, str], None] | None = None) -> dict[str, Any]:
    """Clusters the embeddings of a cell table and stores the clusters as ``predictions.<name>``.

    Args:
        store: the store (or its path).
        name: the prediction-set name to write (not the name of a few-shot prototype set).
        k: number of clusters.
        method: ``kmeans`` (the only one for now).
        encoder: which cell table; default the only (or default) one.
        where: SQL filter: cluster only these cells.
        seed: seed of the training sample and of k-means.
        niter: k-means iterations.
        progress: called with (cells done, cells, stage) while cells are assigned.

    Returns:
        A summary: sizes per cluster, the stored labels in each, the adjusted Rand index
        against the stored labels (when cells have them), versions written and read.

    Raises:
        InputError: unknown method, k out of range, no matching cell, or a name already
            used by a prototype set or by clusters of other cells.
    """
    from cytostore.fewshot.tables import as_store, check_name, write_predictions
    from cytostore.store.layout import is_uri
    from cytostore.store.pins import pin

    if method not in METHODS:
        raise InputError(f"clustering method {method!r} is not available; use one of {list(METHODS)}")
    s = as_store(store)
    check_name(name)
    if s.has("prototypes", name):
        raise InputError(f"{name!r} is a few-shot prototype set in {s.root}: its predictions are its own; "
                         "pick another --name for the clusters")
    where = check_where(where) or None
    table = s.resolve(encoder)
    ds = s.dataset(table)  # one version throughout
    try:
        n = ds.count_rows(filter=where) if where else ds.count_rows()
    except (ValueError, OSError) as e:  # Lance reports a bad filter as either
        raise StoreError(f"cannot apply filter {where!r} to table {table!r}: {e}") from e
    if k < 2 or k > n:
        raise InputError(f"--k must be between 2 and the number of cells ({n} in table {table!r}"
                         + (f" matching {where!r}" if where else "") + f"), got {k}")
    t0 = time.perf_counter()
    index = _train(_sample(ds, where, n, min(n, k * MAX_TRAIN_PER_CLUSTER), seed), k, seed, niter)
    keys, best, second, s1, s2, labels = [], [], [], [], [], []
    has_label = "label" in ds.schema.names
    cols = ["uid", "slide_id", "cell_id", *(["label"] if has_label else []), "embedding"]
    done = 0
    for b in ds.to_batches(columns=cols, filter=where, batch_size=BATCH_ROWS):
        if not b.num_rows:
            continue
        sim, idx = index.search(_normalised(embedding_matrix(b.column("embedding"))), 2)
        keys.append(pa.Table.from_batches([b.select(["uid", "slide_id", "cell_id"])]))
        best.append(idx[:, 0]), second.append(idx[:, 1]), s1.append(sim[:, 0]), s2.append(sim[:, 1])
        labels.extend(b.column("label").to_pylist() if has_label else [None] * b.num_rows)
        done += b.num_rows
        if progress:
            progress(done, n, "assigning cells to clusters")
    best_a, second_a = np.concatenate(best), np.concatenate(second)
    raw_sizes = np.bincount(best_a, minlength=k)
    order = np.lexsort((np.arange(k), -raw_sizes))  # largest first, ties by centroid index
    rank = np.empty(k, dtype=np.int64)
    rank[order] = np.arange(k)
    names = np.array([f"c{j}" for j in range(k)], dtype=object)
    cluster_of, runner_up = names[rank[best_a]], names[rank[second_a]]
    keys_t = pa.concat_tables(keys)
    sc1, sc2 = np.concatenate(s1).astype(np.float32), np.concatenate(s2).astype(np.float32)
    now = int(time.time() * 1e6)
    rows = pa.table({
        "uid": keys_t.column("uid"), "slide_id": keys_t.column("slide_id"), "cell_id": keys_t.column("cell_id"),
        "prediction": pa.array(cluster_of.tolist(), pa.string()), "nearest": pa.array(cluster_of.tolist(), pa.string()),
        "runner_up": pa.array(runner_up.tolist(), pa.string()),
        "score": pa.array(sc1), "margin": pa.array(np.maximum(sc1 - sc2, 0).astype(np.float32)),
        "prototypes_version": pa.array(np.full(n, NOT_FROM_PROTOTYPES, np.int64)),
        "cells_version": pa.array(np.full(n, int(ds.version), np.int64)),
        "predicted_at": pa.array(np.full(n, now, np.int64), pa.timestamp("us", tz="UTC")),
    })
    _refuse_mixing(s, name, table, rows.column("uid").to_numpy())
    version = write_predictions(s, name, rows)
    if not is_uri(s.root):  # the cell version the clusters were made from survives version cleanup
        pin(s.table_uri(table), f"predictions.{name}", int(ds.version))
    return _summary(name, table, int(ds.version), version, k, seed, where, cluster_of, labels,
                    time.perf_counter() - t0)


def _refuse_mixing(store: CellStore, name: str, table: str, uids: np.ndarray) -> None:
    """A prediction set keeps cells a new write does not cover: refuse when those are still
    stored cells, so that one set never mixes two clusterings."""
    import lance

    from cytostore.keys import UidSet

    if not store.has("predictions", name):
        return
    old = lance.dataset(store.uri("predictions", name)).to_table(columns=["uid"]).column("uid").to_numpy()
    left = old[~UidSet(uids).contains(old)]
    if len(left) and store.stored_uids(table).contains(left).any():
        raise InputError(f"predictions {name!r} already holds cells this clustering does not cover (an earlier "
                         "run on other cells?); clusters of two runs are not comparable: pick another --name")


def _summary(name: str, table: str, cells_version: int, version: int, k: int, seed: int, where: str | None,
             cluster_of: np.ndarray, labels: list, seconds: float) -> dict[str, Any]:
    sizes = Counter(cluster_of.tolist())
    comp: dict[str, Counter] = {f"c{j}": Counter() for j in range(k)}
    for c, lab in zip(cluster_of.tolist(), labels):
        if lab is not None:
            comp[c][lab] += 1
    known = [i for i, lab in enumerate(labels) if lab is not None]
    ari = None
    if len({labels[i] for i in known}) >= 2:
        from sklearn.metrics import adjusted_rand_score

        ari = round(float(adjusted_rand_score([labels[i] for i in known], cluster_of[known].tolist())), 4)
    return {"name": name, "method": "kmeans", "k": k, "seed": seed, "table": table, "cells_version": cells_version,
            "predictions_version": version, "where": where, "cells": int(len(cluster_of)),
            "sizes": {f"c{j}": int(sizes.get(f"c{j}", 0)) for j in range(k)},
            "labels": {c: dict(v.most_common(3)) for c, v in comp.items()},
            "adjusted_rand_index": ari, "labelled_cells": len(known), "seconds": round(seconds, 2),
            "color_by": f"prediction:{name}"}
