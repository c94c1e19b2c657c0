"""Generated stores of labelled bags, for tests and memory benchmarks (not real data).

A slide of class k (k >= 1) holds a fraction of "key" cells shifted along a few
class-specific dimensions; every other cell is Gaussian noise. Class 0 has no
key cell, so a slide's class is carried by a minority of its cells, the case
attention pooling is meant for.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Mapping

import numpy as np
import pyarrow as pa

from cytostore.store import schema
from cytostore.keys import cell_uid, key_hashes
from cytostore.errors import StoreError
from cytostore.store import CellStore
from cytostore.store.writer import CellWriter


def synthetic_provenance(dim: int, encoder: str = "synthetic", weights_sha256: str = "0" * 64) -> dict:
    """A provenance record shaped like an ingest's, for a generated table."""
    return {
        "schema": "cells",
        "schema_version": schema.version("cells"),
        "encoder": {"name": encoder, "arch": "generated", "dim": dim, "input_size": 0, "mean": [0.0, 0.0, 0.0],
                    "std": [1.0, 1.0, 1.0], "interpolation": "none", "weights_sha256": weights_sha256,
                    "weights_source": "cytostore.mil.synthetic"},
        "preprocessing": {"crop_size": 64, "box_margin": 0.15},
        "embedding_dtype": "float16",
        "versions": {},
    }


def _thumbnail(seed: int) -> bytes:
    from PIL import Image

    rgb = tuple(int(v) for v in np.random.default_rng(seed).integers(0, 255, 3))
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), rgb).save(buf, format="JPEG", quality=60)
    return buf.getvalue()


def write_synthetic_store(path: str | Path, slides: Mapping[str, tuple[str, int]], classes: list[str],
                          dim: int = 32, key_fraction: float = 0.1, shift: float = 2.0, seed: int = 0,
                          table: str = "synthetic", encoder: str = "synthetic",
                          weights_sha256: str = "0" * 64, chunk: int = 50_000) -> CellStore:
    """Writes one generated cell table; returns the store.

    Args:
        path: store folder (created when absent).
        slides: slide id -> (class name, number of cells).
        classes: class names; the first has no key cells.
        dim: embedding dimension.
        key_fraction: share of key cells in slides of classes after the first.
        shift: how far key cells move along their class's dimensions.
        seed: seed of the generator.
        table: cell-table name; encoder, weights_sha256: recorded provenance.
        chunk: rows per append, bounding memory for huge bags.
    """
    store = CellStore.create(path)
    if store.has_table(table):
        raise StoreError(f"{store.root} already has a table {table!r}; generate into a new store or table")
    target = schema.arrow_schema("cells", dim=dim, metadata=synthetic_provenance(dim, encoder, weights_sha256))
    rng = np.random.default_rng(seed)
    writer = CellWriter(store, table)
    thumbs = [_thumbnail(seed + k) for k in range(2)]
    width = max(1, dim // max(len(classes), 1))
    for sid, (label, n) in slides.items():
        k = classes.index(label)
        for start in range(0, n, chunk):
            m = min(chunk, n - start)
            emb = rng.standard_normal((m, dim)).astype(np.float32)
            key = rng.random(m) < (key_fraction if k > 0 else 0.0)
            emb[np.ix_(key, np.arange(k * width, (k + 1) * width) % dim)] += shift
            ids = [f"c{start + i}" for i in range(m)]
            xs = rng.uniform(0, 1000, m)
            ys = rng.uniform(0, 1000, m)
            cols = {
                "uid": pa.array([cell_uid(sid, c) for c in ids], pa.int64()),
                "key_hash": pa.array(key_hashes([sid] * m, ids), pa.int64()),
                "slide_id": pa.array([sid] * m), "cell_id": pa.array(ids), "x": pa.array(xs), "y": pa.array(ys),
                "x0": pa.nulls(m, pa.float64()), "y0": pa.nulls(m, pa.float64()),
                "x1": pa.nulls(m, pa.float64()), "y1": pa.nulls(m, pa.float64()),
                "crop_size": pa.array(np.full(m, 64, np.int32)),
                "label": pa.array(np.where(key, "key", "other").tolist()), "slide_label": pa.array([label] * m),
                "image": pa.array([f"generated/{sid}.png"] * m), "source_ref": pa.array(["generated"] * m),
                "thumbnail": pa.array([thumbs[int(v)] for v in key], pa.binary()),
                "run_id": pa.array(["synthetic"] * m),
                "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.astype(np.float16).reshape(-1)), dim),
            }
            # Columns this generator does not make (features added to the layout since) are null.
            cols.update({f.name: pa.nulls(m, f.type) for f in target if f.name not in cols})
            writer.append(pa.Table.from_pydict(cols, schema=target))
    writer.close()
    return store
