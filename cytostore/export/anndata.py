"""Cells out to scanpy: one AnnData (.h5ad) file of a cell table.

``obs`` is the cell table without its embedding and thumbnail columns (index
``slide_id:cell_id``; ``slide_id``, ``label`` and ``slide_label`` categorical),
``obsm["X_<table>"]`` the embeddings as float32 and ``obsm["X_umap"]`` the stored map
coordinates when they were computed from this very table version. ``X`` is empty
(no genes): scanpy reads the embeddings with ``use_rep="X_<table>"``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from cytostore.errors import InputError, StoreError
from cytostore.export._common import HEAVY, as_store, need, written_whole
from cytostore.store import CellStore, embedding_matrix, schema
from cytostore.store.filters import check_where

CATEGORICAL = ("slide_id", "label", "slide_label")


def _obs(cells: pa.Table):
    import pandas as pd

    df = cells.to_pandas()
    df.index = pd.Index([f"{s}:{c}" for s, c in zip(df["slide_id"], df["cell_id"])], name="cell")
    for col in df.columns:
        if col in CATEGORICAL or (df[col].dtype == object and df[col].isna().any()):
            # Categoricals carry missing values through h5ad; plain object columns cannot.
            df[col] = df[col].astype("category")
    return df


def stored_umap(store: CellStore, table: str, version: int, uids: np.ndarray) -> tuple[np.ndarray | None, str]:
    """UMAP coordinates of ``uids`` when stored for this table version, with why not otherwise."""
    import lance

    if not store.has("umap", table):
        return None, f"no map stored for table {table!r}: run `cytostore map --store {store.root}` first"
    ds = lance.dataset(store.uri("umap", table))
    made_from = schema.read_metadata(ds.schema).get("table_version")
    if made_from != version:
        return None, (f"the stored map was made from version {made_from} of table {table!r}, which is now at "
                      f"version {version}: run `cytostore map` again to refresh it")
    t = ds.to_table(columns=["uid", "umap_x", "umap_y"])
    order = np.argsort(t.column("uid").to_numpy(), kind="stable")
    su = t.column("uid").to_numpy()[order]
    xy = np.stack([t.column("umap_x").to_numpy(), t.column("umap_y").to_numpy()], axis=1)[order]
    pos = np.clip(np.searchsorted(su, uids), 0, max(len(su) - 1, 0))
    if not len(su) or not np.array_equal(su[pos], uids):
        return None, f"the stored map of table {table!r} lacks some cells: run `cytostore map --force`"
    return xy[pos].astype(np.float32), "stored map of this table version"


def export_anndata(store: CellStore | str | Path, out: str | Path, encoder: str | None = None,
                   where: str | None = None) -> dict[str, Any]:
    """Writes the cells of one table (optionally filtered) as an .h5ad file.

    Args:
        store: the store (or its path).
        out: the .h5ad file to write (replaced whole when it exists).
        encoder: which cell table; default the only (or default) one.
        where: SQL filter on the cell table, e.g. ``"label != 'uncategorised'"``.

    Returns:
        A summary: file, table and version, cells, dimension, obs columns, obsm keys, and
        why ``X_umap`` is absent when it is.

    Raises:
        InputError: the anndata package is missing, or nothing matches ``where``.
        StoreError: no such store or table, or a filter the table cannot apply.
    """
    ad = need("anndata", "export anndata")
    s = as_store(store)
    where = check_where(where) or None
    table = s.resolve(encoder)
    ds = s.dataset(table)  # one version: obs, embeddings and the map check all read it
    columns = [n for n in ds.schema.names if n not in HEAVY]
    try:
        cells = ds.to_table(columns=[*columns, "embedding"], filter=where)
    except (ValueError, OSError, RuntimeError) as e:
        raise StoreError(f"cannot apply filter {where!r} to table {table!r}: {e}") from e
    if cells.num_rows == 0:
        raise InputError(f"no cell of table {table!r} matches {where!r}; nothing to export")
    x = np.asarray(embedding_matrix(cells.column("embedding")), dtype=np.float32)
    obs = _obs(cells.drop_columns(["embedding"]))
    if obs.index.has_duplicates:
        dup = obs.index[obs.index.duplicated()][:3].tolist()
        raise StoreError(f"table {table!r} holds duplicate (slide_id, cell_id) keys, e.g. {dup}; AnnData needs "
                         "unique cell names: export the other cells with --where, or delete and re-ingest those")
    obsm = {f"X_{table}": x}
    umap, why = stored_umap(s, table, int(ds.version), cells.column("uid").to_numpy())
    if umap is not None:
        obsm["X_umap"] = umap
    prov = schema.read_metadata(ds.schema)
    adata = ad.AnnData(obs=obs, obsm=obsm)
    adata.uns["cytostore"] = {"store": s.root, "table": table, "table_version": int(ds.version),
                              "where": where or "", "provenance_json": json.dumps(prov, sort_keys=True, default=str)}
    out = Path(out)
    with written_whole(out, mode="path") as tmp:
        adata.write_h5ad(tmp)
    return {"out": str(out), "table": table, "table_version": int(ds.version), "cells": int(cells.num_rows),
            "dim": int(x.shape[1]), "obs_columns": list(obs.columns), "obsm": sorted(obsm),
            "umap": why}
