"""UMAP coordinates of a cell table: fit on a sample, project the rest, store, reuse.

The coordinates of every cell of ``cells.<table>`` are kept in ``umap.<table>.lance``
beside it, with the cell-table version and the parameters they were made with.
A later map (another colouring, a mosaic) reuses them while both still match and
recomputes them otherwise, e.g. after an append.
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa

from cytostore.store import schema
from cytostore.errors import InputError, StoreError
from cytostore.store import CellStore, embedding_matrix
from cytostore.store.derived import write_version

MIN_CELLS = 5  # below this UMAP has no neighbourhood graph to speak of


@dataclass(frozen=True)
class UmapParams:
    """How the 2-D coordinates are computed. Any change triggers a recompute."""

    n_neighbors: int = 15  # UMAP neighbourhood size
    min_dist: float = 0.1  # UMAP minimum distance between embedded points
    metric: str = "cosine"  # geometry of the embeddings (see prepare())
    pca_dims: int = 50  # reduce to this many principal components first (0 = off)
    fit_sample: int = 50_000  # UMAP is fitted on at most this many cells; the rest are projected
    seed: int = 0  # drives the fit sample, PCA and UMAP (deterministic, single-threaded UMAP)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


TRANSFORM_BATCH = 50_000  # cells projected per umap_model.transform call


def as_store(store: CellStore | str | Path) -> CellStore:
    """A CellStore from a store or a path (a missing store raises StoreError)."""
    return store if isinstance(store, CellStore) else CellStore.open(store)


def umap_uri(store: CellStore, table: str) -> str:
    """Where the coordinates of cell table ``table`` live."""
    return store.uri("umap", table)


def sample_policy(params: UmapParams) -> str:
    """The fit-sample policy in words (stored with the coordinates and printed)."""
    pca = f"L2-normalised, PCA to {params.pca_dims} dims, " if params.pca_dims else "L2-normalised, "
    return (f"{pca}UMAP fitted on a uniform random sample of at most {params.fit_sample} cells "
            f"(seed {params.seed}); every other cell projected with umap_model.transform in batches "
            f"of {TRANSFORM_BATCH}")


def load_umap(store: CellStore | str | Path, encoder: str | None = None) -> pa.Table | None:
    """The stored coordinates of a table (with their metadata), or None when there are none."""
    import lance

    s = as_store(store)
    uri = umap_uri(s, s.resolve(encoder))
    if "://" not in uri and not Path(uri).is_dir():
        return None
    return lance.dataset(uri).to_table()


def _is_current(meta: dict[str, Any], version: int, params: UmapParams) -> bool:
    return (meta.get("schema_version") == schema.version("umap")
            and meta.get("table_version") == version and meta.get("params") == params.to_dict())


def compute_umap(store: CellStore | str | Path, encoder: str | None = None, sample: int = 50_000,
                 seed: int = 0, params: UmapParams | None = None, force: bool = False,
                 progress: Callable[[str], None] | None = None) -> pa.Table:
    """2-D UMAP coordinates of every cell of a table, computed once and stored.

    Args:
        store: a CellStore or a store path.
        encoder: which encoder table; default the only (or default) one.
        sample: fit UMAP on at most this many cells; the others are projected.
        seed: seed of the sample, PCA and UMAP.
        params: all parameters at once (overrides ``sample`` and ``seed``).
        force: recompute even when the stored coordinates are current.
        progress: called with a short message at each stage.

    Returns:
        Arrow table (uid, umap_x, umap_y) in cell-table order. Its schema metadata
        (``cytostore.store.schema.read_metadata``) holds the table version, parameters,
        sample policy, timings and ``reused`` (True when nothing was recomputed).
    """
    import lance

    s = as_store(store)
    params = params or UmapParams(fit_sample=sample, seed=seed)
    if params.fit_sample < MIN_CELLS:
        raise InputError(f"the UMAP fit sample must hold at least {MIN_CELLS} cells, got {params.fit_sample}")
    table = s.resolve(encoder)
    ds = s.dataset(table)  # pinned: everything below reads this one version
    uri = umap_uri(s, table)
    if not force and Path(uri).is_dir():
        stored = lance.dataset(uri)
        meta = schema.read_metadata(stored.schema)
        if _is_current(meta, ds.version, params):
            return _result(stored.to_table(), {**meta, "reused": True})
    say = progress or (lambda _msg: None)
    coords, meta = _fit_and_project(ds, params, say)
    meta.update({"schema": "umap", "schema_version": schema.version("umap"), "table": table,
                 "table_version": int(ds.version)})
    out = pa.Table.from_pydict(coords, schema=schema.arrow_schema("umap", metadata=meta))
    write_version(s.root, "umap", table, out.schema, lambda current: out)
    return _result(out, {**meta, "reused": False})


def _result(table: pa.Table, meta: dict[str, Any]) -> pa.Table:
    import json

    t = table.select(["uid", "umap_x", "umap_y"])
    return t.replace_schema_metadata({schema.METADATA_KEY: json.dumps(meta, sort_keys=True).encode()})


def prepare(x: np.ndarray, params: UmapParams) -> np.ndarray:
    """float32 copy of embeddings, L2-normalised for the cosine geometry."""
    x = np.asarray(x, dtype=np.float32)
    if params.metric == "cosine":
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return x


def _fit_and_project(ds, params: UmapParams, say: Callable[[str], None]) -> tuple[dict, dict]:
    try:
        import umap
    except ImportError as e:
        raise InputError("maps need umap-learn and matplotlib: pip install 'cytostore[viz]'") from e
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    uids = ds.to_table(columns=["uid"]).column("uid").to_numpy()
    n = len(uids)
    if n < MIN_CELLS:
        raise StoreError(f"table holds {n} cells; a map needs at least {MIN_CELLS}")
    rng = np.random.default_rng(params.seed)
    n_fit = min(n, params.fit_sample)
    fit_rows = np.sort(rng.choice(n, size=n_fit, replace=False)) if n_fit < n else np.arange(n)
    fit_x = prepare(embedding_matrix(ds.take(fit_rows, columns=["embedding"]).column("embedding")), params)
    timings["read_s"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    pca = None
    if params.pca_dims and params.pca_dims < min(fit_x.shape):
        from sklearn.decomposition import PCA

        say(f"PCA {fit_x.shape[1]} -> {params.pca_dims} dims on {n_fit} cells")
        pca = PCA(n_components=params.pca_dims, svd_solver="randomized", random_state=params.seed).fit(fit_x)
        fit_x = pca.transform(fit_x).astype(np.float32)
    # On L2-normalised vectors Euclidean distance is sqrt(2 - 2 cos): the same neighbours as cosine.
    # PCA keeps Euclidean distances (a projection), so after it UMAP runs Euclidean.
    metric = "euclidean" if (params.metric == "cosine" and pca is not None) else params.metric
    say(f"UMAP fit on {n_fit} of {n} cells ({metric} on {fit_x.shape[1]} dims)")
    import warnings

    with warnings.catch_warnings():  # "n_jobs overridden to 1 by setting random_state": intended
        warnings.simplefilter("ignore", UserWarning)
        model = umap.UMAP(n_components=2, n_neighbors=min(params.n_neighbors, n_fit - 1),
                          min_dist=params.min_dist, metric=metric, random_state=params.seed,
                          init="spectral" if n_fit > 2 * params.n_neighbors else "random")
        fit_xy = model.fit_transform(fit_x).astype(np.float32)
    timings["fit_s"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    xy = np.empty((n, 2), dtype=np.float32)
    fitted = np.zeros(n, dtype=bool)
    xy[fit_rows] = fit_xy
    fitted[fit_rows] = True
    if n_fit < n:
        rest = np.flatnonzero(~fitted)
        for start in range(0, len(rest), TRANSFORM_BATCH):
            rows = rest[start:start + TRANSFORM_BATCH]
            say(f"projecting cells {start + 1}-{start + len(rows)} of {len(rest)}")
            x = prepare(embedding_matrix(ds.take(rows, columns=["embedding"]).column("embedding")), params)
            if pca is not None:
                x = pca.transform(x).astype(np.float32)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                xy[rows] = model.transform(x)
    timings["project_s"] = time.perf_counter() - t2
    meta = {
        "params": params.to_dict(),
        "seed": params.seed,
        "sample_policy": sample_policy(params),
        "umap_metric": metric,
        "cells": int(n),
        "fitted_cells": int(n_fit),
        "projected_cells": int(n - n_fit),
        "seconds": {k: round(v, 2) for k, v in timings.items()},
        "created": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "versions": {"umap_learn": _version("umap-learn"), "scikit_learn": _version("scikit-learn")},
    }
    return {"uid": uids, "umap_x": xy[:, 0], "umap_y": xy[:, 1], "fitted": fitted}, meta


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None
