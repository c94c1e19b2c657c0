"""Quality control of an embedding table: batch effects, near-duplicates and outliers.

- Batch effect: how well a linear model tells the slide a cell came from,
  against how well it tells the cell's label, each against its chance rate.
  Cross-validated logistic regression on PCA-reduced, L2-normalised embeddings.
  Only slides with at least ``min_cells_per_slide`` cells take part (and at most
  ``max_slides`` of them, drawn at random), so that hundreds of small slides do
  not turn the question into noise. The slide is also predicted among the cells
  of the most common label only, which removes label composition as an
  explanation.
- Near-duplicates: pairs of different cells with cosine similarity above
  ``duplicate_cosine`` among each cell's ``knn`` nearest neighbours (FAISS,
  exact inner product on the full vectors).
- Outliers: cells far from all others (mean cosine distance to their ``knn``
  nearest neighbours) and cells whose thumbnail is unusually blurred (variance
  of its Laplacian), each flagged by a robust z-score (median and MAD).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from cytostore.errors import InputError, StoreError
from cytostore.store import CellStore, embedding_matrix


@dataclass(frozen=True)
class QcConfig:
    """What the QC measures and how."""

    min_cells_per_slide: int = 20  # slides with fewer cells are left out of slide prediction
    max_slides: int = 100  # at most this many slides (drawn at random) in slide prediction
    max_cells: int = 50_000  # larger tables are checked on a uniform random sample of this size
    pca_dims: int = 50  # components the linear models see
    folds: int = 5  # cross-validation folds (stratified)
    duplicate_cosine: float = 0.99  # cosine above which two different cells are near-duplicates
    knn: int = 10  # neighbours for duplicates and the density outlier score
    outlier_z: float = 5.0  # robust z-score beyond which a cell is an outlier
    listed: int = 20  # how many duplicate pairs and outliers to list by id
    seed: int = 0  # drives the sample, the slide draw and the folds

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_qc(store: CellStore | str | Path, encoder: str | None = None, config: QcConfig = QcConfig(),
           progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """QC of one encoder table (``encoder``) or of every table of the store.

    Returns:
        ``{"store", "config", "tables": [per-table report]}``; each report holds
        ``slide``, ``label`` and ``slide_within_label`` (accuracy, balanced
        accuracy and their chance rates), ``duplicates`` and ``outliers``.
    """
    s = store if isinstance(store, CellStore) else CellStore.open(store)
    tables = [s.resolve(encoder)] if encoder else s.tables()
    if not tables:
        raise StoreError(f"store {s.root} holds no cell tables yet; run `cytostore ingest` first")
    say = progress or (lambda _m: None)
    return {"store": s.root, "config": config.to_dict(),
            "tables": [table_qc(s, t, config, say) for t in tables]}


def table_qc(store: CellStore, table: str, config: QcConfig, say: Callable[[str], None]) -> dict[str, Any]:
    """The QC report of one cell table."""
    t0 = time.perf_counter()
    ds = store.dataset(table)
    n = ds.count_rows()
    if n < 2 * config.folds:
        raise StoreError(f"table {table!r} holds {n} cells; QC needs at least {2 * config.folds}")
    rng = np.random.default_rng(config.seed)
    rows = np.sort(rng.choice(n, size=config.max_cells, replace=False)) if n > config.max_cells else np.arange(n)
    say(f"reading {len(rows)} of {n} cells of {table}")
    cols = ["uid", "slide_id", "cell_id", "label", "embedding", "thumbnail"]
    cells = ds.take(rows, columns=[c for c in cols if c in ds.schema.names])
    x = np.asarray(embedding_matrix(cells.column("embedding")), dtype=np.float32)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    ids = {
        "uid": cells.column("uid").to_numpy(),
        "slide_id": np.array(cells.column("slide_id").to_pylist(), dtype=object),
        "cell_id": np.array(cells.column("cell_id").to_pylist(), dtype=object),
    }
    labels = np.array(cells.column("label").to_pylist() if "label" in cells.column_names else [None] * len(x),
                      dtype=object)

    say("PCA and cross-validated logistic regression (slide, label)")
    z = pca(x, config)
    slide = slide_task(z, ids["slide_id"], config, rng)
    has_label = np.array([v is not None for v in labels])
    label = _predict(z[has_label], labels[has_label], config, "label") if has_label.any() else None
    within = None
    if has_label.any():
        vals, counts = np.unique(labels[has_label].astype(str), return_counts=True)
        top = str(vals[np.argmax(counts)])
        keep = labels == top
        within = slide_task(z[keep], ids["slide_id"][keep], config, rng)
        if within is not None:
            within["label"] = top

    say(f"{config.knn}-NN search (FAISS) for near-duplicates and outliers")
    sims, nbrs = _knn(x, config.knn)
    dups = _duplicates(sims, nbrs, ids, config)
    density = _flag(1.0 - sims.mean(axis=1), ids, config, high=True, what="mean cosine distance to neighbours")
    sharp = None
    if "thumbnail" in cells.column_names:
        sharp = _flag(np.log10(_sharpness(cells.column("thumbnail").to_pylist()) + 1e-6), ids, config, high=False,
                      what="log10 variance of the thumbnail's Laplacian")
    report = {
        "table": table,
        "table_version": int(ds.version),
        "encoder": store.provenance(table).get("encoder", {}).get("name"),
        "cells": int(n),
        "cells_used": int(len(rows)),
        "sampled": bool(len(rows) < n),
        "slide": slide,
        "label": label,
        "slide_within_label": within,
        "verdict": _verdict(slide, label),
        "duplicates": dups,
        "outliers": {"density": density, "sharpness": sharp},
        "seconds": round(time.perf_counter() - t0, 2),
    }
    return report


def pca(x: np.ndarray, config: QcConfig) -> np.ndarray:
    """The leading ``config.pca_dims`` principal components of ``x`` (``x`` itself when it has fewer dims)."""
    from sklearn.decomposition import PCA

    dims = min(config.pca_dims, x.shape[0] - 1, x.shape[1])
    if dims < 1 or dims >= x.shape[1]:
        return x
    return PCA(n_components=dims, svd_solver="randomized", random_state=config.seed).fit_transform(x)


def slide_task(z: np.ndarray, slides: np.ndarray, config: QcConfig, rng) -> dict[str, Any] | None:
    """Balanced accuracy of predicting the slide from ``z`` (cross-validated); None with under 2 eligible slides."""
    names, counts = np.unique(slides.astype(str), return_counts=True)
    eligible = names[counts >= max(config.min_cells_per_slide, config.folds)]
    drawn = eligible
    if len(eligible) > config.max_slides:
        drawn = np.sort(rng.choice(eligible, size=config.max_slides, replace=False))
    keep = np.isin(slides.astype(str), drawn)
    if len(drawn) < 2:
        return {"accuracy": None, "chance": None, "classes": int(len(drawn)), "cells": int(keep.sum()),
                "note": f"fewer than 2 slides with >= {config.min_cells_per_slide} cells; nothing to predict"}
    out = _predict(z[keep], slides[keep], config, "slide_id")
    out["slides_total"] = int(len(names))
    out["slides_eligible"] = int(len(eligible))
    out["policy"] = (f"slides with >= {config.min_cells_per_slide} cells ({len(eligible)} of {len(names)})"
                     + (f", {config.max_slides} of them drawn at random (seed {config.seed})"
                        if len(eligible) > config.max_slides else ""))
    return out


def _predict(z: np.ndarray, y: np.ndarray, config: QcConfig, target: str) -> dict[str, Any] | None:
    """Cross-validated accuracy of a logistic regression predicting ``y`` from ``z``, with chance rates."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    y = y.astype(str)
    names, counts = np.unique(y, return_counts=True)
    keep = np.isin(y, names[counts >= config.folds])  # stratified folds need folds members per class
    z, y = z[keep], y[keep]
    names, counts = np.unique(y, return_counts=True)
    if len(names) < 2:
        return None
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=300, C=1.0))
    folds = StratifiedKFold(n_splits=config.folds, shuffle=True, random_state=config.seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        pred = cross_val_predict(model, z, y, cv=folds)
    acc = float((pred == y).mean())
    chance = float(counts.max() / counts.sum())
    bal = float(balanced_accuracy_score(y, pred))
    return {
        "target": target,
        "accuracy": round(acc, 4),
        "chance": round(chance, 4),
        "balanced_accuracy": round(bal, 4),
        "balanced_chance": round(1.0 / len(names), 4),
        "lift": round(acc / chance, 2),
        "skill": round((acc - chance) / (1.0 - chance), 4),  # 0 = chance, 1 = perfect
        "classes": int(len(names)),
        "cells": int(len(y)),
        "model": f"logistic regression on {z.shape[1]} PCA dims, {config.folds}-fold stratified CV",
    }


def _verdict(slide: dict | None, label: dict | None) -> str:
    if not slide or slide.get("balanced_accuracy") is None:
        return "too few slides with enough cells to measure a slide effect"
    s = slide["balanced_accuracy"] / slide["balanced_chance"]
    text = f"slide predicted at {s:.1f}x its chance rate (balanced accuracy {slide['balanced_accuracy']:.2f})"
    if label:
        lab = label["balanced_accuracy"] / label["balanced_chance"]
        text += f"; label at {lab:.1f}x its chance rate (balanced accuracy {label['balanced_accuracy']:.2f})"
    if slide["balanced_accuracy"] >= 0.5 and s >= 5:
        text += ": the embeddings carry a strong slide (batch) signal"
    return text


def _knn(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Cosine similarities and indices of each row's ``k`` nearest other rows."""
    import faiss

    k = min(k, len(x) - 1)
    if k < 1:
        raise InputError("QC needs at least 2 cells")
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(np.ascontiguousarray(x))
    sims, nbrs = index.search(np.ascontiguousarray(x), k + 1)
    # Drop each row itself (usually first; not necessarily when it has an exact twin).
    self_hit = nbrs == np.arange(len(x))[:, None]
    drop = np.where(self_hit.any(axis=1), self_hit.argmax(axis=1), k)
    keep = np.ones_like(nbrs, dtype=bool)
    keep[np.arange(len(x)), drop] = False
    return sims[keep].reshape(len(x), k), nbrs[keep].reshape(len(x), k)


def _row(ids: dict[str, np.ndarray], i: int) -> dict[str, Any]:
    return {"uid": int(ids["uid"][i]), "slide_id": str(ids["slide_id"][i]), "cell_id": str(ids["cell_id"][i])}


def _duplicates(sims: np.ndarray, nbrs: np.ndarray, ids: dict[str, np.ndarray], config: QcConfig) -> dict[str, Any]:
    i, j = np.nonzero(sims > config.duplicate_cosine)
    a, b = nbrs[i, j], i
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    pairs: dict[tuple[int, int], float] = {}
    for p, q, s in zip(lo.tolist(), hi.tolist(), sims[i, j].tolist()):
        if p != q:
            pairs[(p, q)] = max(s, pairs.get((p, q), -1.0))
    ranked = sorted(pairs.items(), key=lambda kv: -kv[1])
    cells = {c for pq in pairs for c in pq}
    same_slide = sum(1 for p, q in pairs if ids["slide_id"][p] == ids["slide_id"][q])
    return {
        "threshold": config.duplicate_cosine,
        "pairs": len(pairs),
        "pairs_same_slide": same_slide,
        "cells": len(cells),
        "listed": [{"a": _row(ids, p), "b": _row(ids, q), "cosine": round(s, 5)} for (p, q), s in ranked[:config.listed]],
        "method": f"exact inner product on L2-normalised vectors (FAISS IndexFlatIP), {config.knn} neighbours a cell",
    }


def _sharpness(thumbnails: list[bytes]) -> np.ndarray:
    """Variance of the 4-neighbour Laplacian of each greyscale thumbnail (low = blurred)."""
    from cytostore.imaging import decode_thumbnail

    out = np.empty(len(thumbnails), dtype=np.float64)
    for i, jpeg in enumerate(thumbnails):
        g = decode_thumbnail(jpeg).astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        lap = g[:-2, 1:-1] + g[2:, 1:-1] + g[1:-1, :-2] + g[1:-1, 2:] - 4 * g[1:-1, 1:-1]
        out[i] = float(lap.var())
    return out


def _flag(score: np.ndarray, ids: dict[str, np.ndarray], config: QcConfig, high: bool, what: str) -> dict[str, Any]:
    """Cells whose robust z-score of ``score`` is beyond ``config.outlier_z`` (above when ``high``)."""
    med = float(np.median(score))
    mad = float(np.median(np.abs(score - med))) * 1.4826 or 1e-12
    zs = (score - med) / mad
    bad = np.flatnonzero(zs > config.outlier_z) if high else np.flatnonzero(zs < -config.outlier_z)
    bad = bad[np.argsort(-np.abs(zs[bad]))]
    return {
        "score": what,
        "median": round(med, 5),
        "threshold": round(med + config.outlier_z * mad if high else med - config.outlier_z * mad, 5),
        "count": int(len(bad)),
        "listed": [{**_row(ids, i), "score": round(float(score[i]), 5), "z": round(float(zs[i]), 2)}
                   for i in bad[:config.listed]],
    }
