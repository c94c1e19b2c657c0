"""Stain / colour normalisation of cell crops before the encoder (``ingest --stain``).

Two methods, both fitted once to a *reference* and recorded in the table's
identity as numbers, so a re-run reproduces the same pixels:

- ``reinhard``: per-channel mean and std in CIE LAB (Reinhard et al. 2001); a
  group of crops is shifted and scaled so that its LAB statistics equal the
  reference's;
- ``macenko``: stain vectors and 99th-percentile concentrations in optical
  density (Macenko et al. 2009, via ``torchstain``); a group of crops is
  unmixed with its own stain vectors and remixed with the reference's.

The group whose statistics are matched is the crops of one image task (the
cells of one field, or of one tile of a slide, at most 256 cells), pooled: a
cell's colour relative to the other cells of its field is kept, only the
field's overall colour moves. A folder of single-cell crops has one cell per
image, so there each crop is matched on its own. The reference is a sample of
the store's stored thumbnails (cell-centred crops like those it is compared
with) or a given image; the stored thumbnails themselves are never normalised.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from cytostore.errors import InputError

METHODS = ("none", "reinhard", "macenko")
REFERENCE_CELLS = 512  # thumbnails sampled from the store for a reference
VERSION = 1  # bump when the pixels a method gives change


def _rgb2lab(rgb: np.ndarray) -> np.ndarray:
    from skimage.color import rgb2lab

    return rgb2lab(rgb)


def _lab2rgb(lab: np.ndarray) -> np.ndarray:
    from skimage.color import lab2rgb

    return lab2rgb(lab)


def _pixels(crops: list[np.ndarray]) -> np.ndarray:
    """All pixels of the crops as one (1, P, 3) uint8 'image'."""
    return np.concatenate([np.asarray(c)[..., :3].reshape(-1, 3) for c in crops])[None]


def fit(method: str, crops: list[np.ndarray]) -> dict[str, Any]:
    """The reference statistics of ``method`` fitted to the pooled pixels of ``crops`` (uint8 RGB)."""
    if method not in METHODS[1:]:
        raise InputError(f"unknown --stain {method!r}; use one of {', '.join(METHODS)}")
    if not crops:
        raise InputError("no pixels to fit a stain reference to")
    px = _pixels(crops)
    if method == "reinhard":
        lab = _rgb2lab(px).reshape(-1, 3)
        stats = {"lab_mean": lab.mean(axis=0).tolist(), "lab_std": lab.std(axis=0).tolist()}
    else:
        norm = _macenko()
        norm.fit(px)
        stats = {"he": np.asarray(norm.HERef).tolist(), "max_c": np.asarray(norm.maxCRef).tolist()}
    stats = {k: [round(float(v), 6) if not isinstance(v, list) else [round(float(u), 6) for u in v] for v in vals]
             for k, vals in stats.items()}
    return {"method": method, "version": VERSION, **stats}


def _macenko():
    try:
        from torchstain.numpy.normalizers import NumpyMacenkoNormalizer
    except ImportError as e:
        raise InputError("--stain macenko needs torchstain: pip install 'cytostore[adapt]'") from e
    return NumpyMacenkoNormalizer()


def normalise(crops: list[np.ndarray], reference: dict[str, Any]) -> list[np.ndarray]:
    """The crops (uint8 RGB) with their pooled statistics mapped to ``reference`` (from ``fit``)."""
    if not crops:
        return crops
    px = _pixels(crops)
    if reference["method"] == "reinhard":
        lab = _rgb2lab(px)
        flat = lab.reshape(-1, 3)
        mean, std = flat.mean(axis=0), flat.std(axis=0)
        ref_mean, ref_std = np.asarray(reference["lab_mean"]), np.asarray(reference["lab_std"])
        lab = (lab - mean) / np.maximum(std, 1e-6) * ref_std + ref_mean
        lab[..., 0] = np.clip(lab[..., 0], 0, 100)
        out = np.clip(_lab2rgb(lab) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    elif reference["method"] == "macenko":
        norm = _macenko()
        norm.HERef = np.asarray(reference["he"], dtype=np.float64)
        norm.maxCRef = np.asarray(reference["max_c"], dtype=np.float64)
        try:
            out, _, _ = norm.normalize(px, stains=False)
        except (np.linalg.LinAlgError, ValueError, IndexError):
            return crops  # too few stained pixels to unmix (a blank group): left as it is
    else:
        raise InputError(f"unknown stain method {reference.get('method')!r}")
    flat = out.reshape(-1, 3)
    result, start = [], 0
    for c in crops:
        n = c.shape[0] * c.shape[1]
        result.append(np.ascontiguousarray(flat[start:start + n].reshape(c.shape[0], c.shape[1], 3)))
        start += n
    return result


def lab_stats(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) per LAB channel of a uint8 RGB image."""
    lab = _rgb2lab(np.asarray(img)[..., :3]).reshape(-1, 3)
    return lab.mean(axis=0), lab.std(axis=0)


def reference_from_image(method: str, path: str | Path) -> dict[str, Any]:
    """A reference fitted to one image file."""
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise InputError(f"--stain-reference {path} does not exist; give an image file, or leave it out "
                         "to take the reference from the store's thumbnails")
    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"))
    ref = fit(method, [arr])
    ref["source"] = {"image": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    return ref


def reference_from_store(method: str, store, table: str | None = None, n: int = REFERENCE_CELLS,
                         seed: int = 0) -> dict[str, Any]:
    """A reference fitted to ``n`` thumbnails drawn (seeded) from a cell table of ``store``.

    ``table`` defaults to the first cell table by name. Raises InputError when the
    store has no cell table yet.
    """
    from cytostore.imaging import decode_thumbnail

    tables = store.tables()
    if table is None:
        if not tables:
            raise InputError("--stain takes its reference from the store's thumbnails, and this store has no cell "
                             "table yet: ingest once without --stain, or pass --stain-reference IMAGE")
        table = tables[0]
    ds = store.dataset(table)
    total = ds.count_rows()
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(total, size=min(n, total), replace=False))
    rows = ds.take(idx.tolist(), columns=["thumbnail"]).column("thumbnail").to_pylist()
    ref = fit(method, [decode_thumbnail(b) for b in rows])
    ref["source"] = {"table": table, "table_version": int(ds.version), "cells": len(rows), "seed": seed}
    return ref


def resolve(method: str, reference: Any, store, table: str, stored_identity: dict | None) -> dict[str, Any] | None:
    """The reference an ingest uses, or None for ``none``.

    A table that already holds normalised rows keeps its own reference (unless an
    image is given, which must then match it); otherwise an image path or a
    sample of the store's thumbnails.
    """
    if method == "none":
        return None
    if method not in METHODS:
        raise InputError(f"unknown --stain {method!r}; use one of {', '.join(METHODS)}")
    if isinstance(reference, dict):
        return reference
    if reference is not None:
        return reference_from_image(method, reference)
    kept = (stored_identity or {}).get("stain")
    if isinstance(kept, dict) and kept.get("method") == method:
        return kept
    others = [t for t in store.tables() if t != table]
    return reference_from_store(method, store, others[0] if others else None)


def identity(reference: dict[str, Any]) -> dict[str, Any]:
    """The numbers of a reference that fix the pixels (its ``source`` is description)."""
    return {k: v for k, v in reference.items() if k != "source"}


def short_hash(reference: dict[str, Any]) -> str:
    """12 hex digits naming a reference's numbers."""
    text = json.dumps(identity(reference), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]
