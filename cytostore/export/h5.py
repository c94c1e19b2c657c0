"""Cells out to CLAM / TRIDENT / STAMP: one HDF5 file of features per slide.

``OUT/<slide_id>.h5`` holds, in the layout those tools read:

- ``features``: (N, D) float32, one row per cell (the stored embedding, float16 widened);
- ``coords``: (N, 2) int64, the **top-left corner** (x, y) of the square crop each
  embedding was computed from, level-0 pixels, as CLAM stores patch coordinates
  (the crop is ``crop_size`` pixels wide, centred on the cell: x - crop_size/2 rounded);
- ``cell_ids`` (N,) UTF-8 strings, ``uids`` (N,) int64 and ``crop_size`` (N,) int32,
  row-aligned with ``features``, to join back to the store.

File attributes name the encoder, its weights' sha256, the crop size, the slide label
and the table version; ``coords`` carries CLAM's ``patch_size``/``patch_level`` and
TRIDENT's ``patch_size_level0``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from cytostore.export._common import (Progress, as_store, choose_slides, need, safe_file_stem, slide_filter,
                                      written_whole)
from cytostore.store import CellStore, embedding_matrix, schema

FORMAT = "cytostore-h5 (CLAM/TRIDENT layout: features, coords)"


def crop_corners(x: np.ndarray, y: np.ndarray, crop_size: np.ndarray) -> np.ndarray:
    """(N, 2) int64 top-left corners of the crops, rounded as ingest cropped them."""
    # np.rint rounds half to even, like the round() ingest uses.
    return np.stack([np.rint(x - crop_size / 2), np.rint(y - crop_size / 2)], axis=1).astype(np.int64)


def _attr(v: Any) -> Any:
    return "" if v is None else v


def export_h5(store: CellStore | str | Path, out: str | Path, encoder: str | None = None,
              slides: Sequence[str] | None = None, progress: Progress | None = None) -> dict[str, Any]:
    """Writes ``OUT/<slide_id>.h5`` (features, coords) for each slide of a cell table.

    Args:
        store: the store (or its path).
        out: folder to write into (created when absent).
        encoder: which cell table; default the only (or default) one.
        slides: slide ids to export; default every slide.
        progress: called after each slide with (done, total, slide_id).

    Returns:
        A summary: table and version, encoder, per-slide files and cell counts.

    Raises:
        InputError: h5py is missing, or a slide asked for is not in the table.
    """
    h5py = need("h5py", "export h5")
    s = as_store(store)
    table = s.resolve(encoder)
    chosen = choose_slides(s, table, slides)
    ds = s.dataset(table)  # one version for every slide
    prov = schema.read_metadata(ds.schema)
    enc = prov.get("encoder", {})
    pre = prov.get("preprocessing", {})
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for done, slide in enumerate(chosen, 1):
        t = ds.to_table(columns=["uid", "cell_id", "x", "y", "crop_size", "slide_label", "embedding"],
                        filter=slide_filter([slide]))
        feats = np.asarray(embedding_matrix(t.column("embedding")), dtype=np.float32)
        size = t.column("crop_size").to_numpy().astype(np.int32)
        coords = crop_corners(t.column("x").to_numpy(), t.column("y").to_numpy(), size)
        labels = sorted({v for v in t.column("slide_label").to_pylist() if v is not None})
        path = out / f"{safe_file_stem(slide)}.h5"
        with written_whole(path, mode="path") as tmp:
            with h5py.File(tmp, "w") as fh:
                fh.create_dataset("features", data=feats)
                c = fh.create_dataset("coords", data=coords)
                fh.create_dataset("cell_ids", data=np.array(t.column("cell_id").to_pylist(), dtype=object),
                                  dtype=h5py.string_dtype("utf-8"))
                fh.create_dataset("uids", data=t.column("uid").to_numpy().astype(np.int64))
                fh.create_dataset("crop_size", data=size)
                uniform = int(size[0]) if len(size) and (size == size[0]).all() else 0
                c.attrs.update({"patch_size": uniform, "patch_level": 0, "patch_size_level0": uniform,
                                "downsample": np.array([1.0, 1.0]), "name": slide, "corner": "top-left",
                                "units": "level-0 pixels"})
                fh.attrs.update({
                    "format": FORMAT, "slide_id": slide, "slide_label": labels[0] if len(labels) == 1 else "",
                    "encoder": _attr(enc.get("name")), "arch": _attr(enc.get("arch")),
                    "weights_sha256": _attr(enc.get("weights_sha256")), "dim": int(feats.shape[1]),
                    "stored_dtype": _attr(prov.get("embedding_dtype")),
                    "crop_size": int(pre.get("crop_size") or uniform), "box_margin": float(pre.get("box_margin") or 0.0),
                    "store": s.root, "table": table, "table_version": int(ds.version),
                })
        files.append({"slide_id": slide, "file": str(path), "cells": int(t.num_rows)})
        if progress:
            progress(done, len(chosen), slide)
    return {"table": table, "table_version": int(ds.version), "encoder": enc.get("name"),
            "weights_sha256": enc.get("weights_sha256"), "out": str(out), "slides": len(files),
            "cells": sum(f["cells"] for f in files), "files": files}
