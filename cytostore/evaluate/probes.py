"""The probes of ``cytostore evaluate``: pure numpy/scikit-learn on embeddings, labels, groups.

Every hyper-parameter (the probe's C, k of k-NN, the prototypes' whitening shrinkage) is
chosen inside the training part of a split (inner grouped folds, or the support set of an
episode), never on the cells that are scored.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Sequence

import numpy as np

from cytostore.evaluate.splits import GroupEpisodes, grouped_folds
from cytostore.fewshot.episodes import run_episodes
from cytostore.fewshot.prototypes import FeatureTransform, PrototypeConfig, Whitening, classify

C_GRID = (0.01, 0.1, 1.0)  # inverse L2 strength of the linear probe, on standardised features
K_GRID = (1, 5, 10, 20, 50)  # k of the k-NN probe
SHRINK_GRID = (0.3, 1.0, 0.1, 0.03)  # whitening shrinkage of the prototypes; ties go to the first
INNER_FOLDS = 2  # grouped folds inside a training part, for choosing C and k
PROBE_PCA_DIMS = 256  # the probe sees this many principal components (fitted on its training part)


def unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (float32)."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def scores(y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """Accuracy, balanced accuracy and macro-F1 of pooled out-of-fold predictions."""
    from sklearn.metrics import balanced_accuracy_score, f1_score

    return {"accuracy": round(float((pred == y).mean()), 4),
            "balanced_accuracy": round(float(balanced_accuracy_score(y, pred)), 4),
            "macro_f1": round(float(f1_score(y, pred, average="macro", zero_division=0)), 4)}


# -- classifiers: (train x, train y, test x, parameters) -> {parameter: predicted labels} ----------
def principal_components(x: np.ndarray, dims: int = PROBE_PCA_DIMS) -> np.ndarray:
    """The standardised embeddings projected on their leading ``dims`` principal components.

    Computed once over all the evaluated cells: no label is used, so no label can leak.
    """
    x = np.asarray(x, dtype=np.float64)
    z = (x - x.mean(axis=0)) / (x.std(axis=0) + 1e-6)
    if dims >= z.shape[1] or dims >= len(z):
        return z.astype(np.float32)
    vals, vecs = np.linalg.eigh(z.T @ z / len(z))
    return (z @ vecs[:, ::-1][:, :dims]).astype(np.float32)


def logreg_predict(xtr: np.ndarray, ytr: np.ndarray, xte: np.ndarray, cs: Sequence[float]) -> dict:
    """Multinomial logistic regression (L2) for each C, ascending and warm-started."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    if len(set(ytr.tolist())) == 1:
        return {c: np.full(len(xte), ytr[0], dtype=object) for c in cs}
    out = {}
    clf = LogisticRegression(max_iter=200, warm_start=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for c in sorted(cs):
            clf.set_params(C=c)
            out[c] = clf.fit(xtr, ytr).predict(xte)
    return out


def knn_predict(xtr: np.ndarray, ytr: np.ndarray, xte: np.ndarray, ks: Sequence[int],
                block: int = 2048) -> dict:
    """Cosine k-NN majority vote for each k (inputs unit length); ties go to the larger summed similarity."""
    classes, y_idx = np.unique(ytr, return_inverse=True)
    kmax = int(min(max(ks), len(xtr)))
    out = {k: np.empty(len(xte), dtype=object) for k in ks}
    for s in range(0, len(xte), block):
        sims = xte[s:s + block] @ xtr.T
        top = np.argpartition(-sims, kmax - 1, axis=1)[:, :kmax]
        rows = np.arange(len(top))[:, None]
        top = top[rows, np.argsort(-sims[rows, top], axis=1)]  # nearest first
        for k in ks:
            t = top[:, :min(k, kmax)]
            votes = np.zeros((len(t), len(classes)))
            np.add.at(votes, (np.broadcast_to(rows, t.shape), y_idx[t]), 1.0 + 1e-3 * sims[rows, t])
            out[k][s:s + block] = classes[votes.argmax(axis=1)]
    return out


def _grouped_cv(x: np.ndarray, y: np.ndarray, groups: np.ndarray, folds: int, seed: int, grid: Sequence,
                fit_predict: Callable[..., dict], name: str,
                say: Callable[[str], None]) -> dict[str, Any]:
    """Outer grouped folds; in each training part the parameter is chosen by inner grouped folds."""
    pred = np.empty(len(y), dtype=object)
    chosen = []
    outer = grouped_folds(y, groups, folds, seed)
    for f, (tr, te) in enumerate(outer):
        n_inner = min(INNER_FOLDS, len(set(groups[tr].tolist())))
        best = grid[0]
        if len(grid) > 1 and n_inner >= 2:
            inner_pred = {p: np.empty(len(tr), dtype=object) for p in grid}
            for itr, ite in grouped_folds(y[tr], groups[tr], n_inner, seed + 1):
                for p, v in fit_predict(x[tr][itr], y[tr][itr], x[tr][ite], grid).items():
                    inner_pred[p][ite] = v
            val = [scores(y[tr], inner_pred[p])["balanced_accuracy"] for p in grid]
            best = grid[int(np.argmax(val))]  # ties: the first in the grid
        chosen.append(best)
        pred[te] = fit_predict(x[tr], y[tr], x[te], [best])[best]
        say(f"  {name}: fold {f + 1}/{len(outer)} done (chose {best})")
    return {**scores(y, pred), "folds": len(outer), "chosen": chosen}


def linear_probe(x: np.ndarray, y: np.ndarray, groups: np.ndarray, folds: int, seed: int = 0,
                 c_grid: Sequence[float] = C_GRID, say: Callable[[str], None] = lambda _m: None) -> dict[str, Any]:
    """Multinomial logistic regression on the leading principal components of the standardised
    embeddings, grouped cross-validation.

    Returns accuracy, balanced_accuracy, macro_f1 (pooled over the outer folds), folds, and
    ``C`` chosen in each outer fold by inner grouped folds (balanced accuracy).
    """
    z = principal_components(x)
    out = _grouped_cv(z, y, groups, folds, seed, tuple(c_grid), logreg_predict, "linear probe", say)
    out["C"] = out.pop("chosen")
    out["features"] = f"{z.shape[1]} principal components of the standardised embeddings"
    return out


def knn_probe(x: np.ndarray, y: np.ndarray, groups: np.ndarray, folds: int, seed: int = 0,
              k_grid: Sequence[int] = K_GRID, say: Callable[[str], None] = lambda _m: None) -> dict[str, Any]:
    """Cosine k-NN on unit-length embeddings, the same grouped folds as the probe; k chosen inside."""
    out = _grouped_cv(unit(x), y, groups, folds, seed, tuple(k_grid), knn_predict, "k-NN", say)
    out["k"] = out.pop("chosen")
    return out


def precision_at_k(x: np.ndarray, y: np.ndarray, groups: np.ndarray, k: int = 10,
                   block: int = 1024) -> dict[str, Any]:
    """Same-label precision of each cell's ``k`` cosine neighbours taken from OTHER groups.

    Cells of the query's own (duplicate-merged) group are never neighbours. Returns the
    mean over cells (``precision``), the mean of per-class means (``macro``), and the rate
    a random neighbour would give (``chance``: sum of squared class shares).
    """
    xu = unit(x)
    y = np.asarray(y, dtype=object).astype(str)
    classes, yi = np.unique(y, return_inverse=True)
    _, gi = np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True)
    prec = np.zeros(len(y))
    for s in range(0, len(y), block):
        sims = xu[s:s + block] @ xu.T
        sims[gi[s:s + block, None] == gi[None, :]] = -np.inf
        kk = min(k, len(y) - 1)
        top = np.argpartition(-sims, kk - 1, axis=1)[:, :kk]
        valid = np.isfinite(np.take_along_axis(sims, top, axis=1))
        same = (yi[top] == yi[s:s + block, None]) & valid
        prec[s:s + block] = same.sum(axis=1) / max(kk, 1)
    shares = np.bincount(yi) / len(yi)
    macro = float(np.mean([prec[yi == c].mean() for c in range(len(classes))]))
    return {"precision": round(float(prec.mean()), 4), "macro": round(macro, 4), "k": k,
            "chance": round(float((shares ** 2).sum()), 4)}


def slide_of_origin(x: np.ndarray, groups: np.ndarray, seed: int = 0) -> dict[str, Any] | None:
    """How well the group is predicted from the embedding: the batch effect (``cytostore qc``'s test).

    Cross-validated logistic regression on 50 PCA dimensions of the unit-length embeddings,
    groups with >= 20 cells (at most 100, drawn at random); balanced accuracy against its
    chance rate 1 / groups. None when fewer than 2 groups qualify.
    """
    from cytostore.qc import QcConfig, pca, slide_task

    config = QcConfig(seed=seed)
    z = pca(unit(x), config)
    res = slide_task(z, np.asarray(groups, dtype=object).astype(str), config, np.random.default_rng(seed))
    if not res or res.get("balanced_accuracy") is None:
        return None
    return {"balanced_accuracy": res["balanced_accuracy"], "chance": res["balanced_chance"],
            "accuracy": res["accuracy"], "groups": res["classes"], "cells": res["cells"],
            "policy": res.get("policy"), "model": res.get("model")}


# -- prototypes on cross-group episodes ------------------------------------------------------------
def _loo_accuracy(f: np.ndarray, ys: np.ndarray) -> float:
    """Leave-one-out nearest-prototype accuracy on a support set (f unit length)."""
    classes, yi = np.unique(ys, return_inverse=True)
    sums = np.stack([f[yi == c].sum(axis=0) for c in range(len(classes))])
    counts = np.bincount(yi).astype(np.float32)
    hits = 0
    for i in range(len(f)):
        protos = sums.copy()
        n = counts.copy()
        protos[yi[i]] -= f[i]
        n[yi[i]] -= 1
        ok = n > 0
        p = unit(protos[ok] / n[ok, None])
        hits += int(np.flatnonzero(ok)[int((p @ f[i]).argmax())] == yi[i])
    return hits / len(f)


def prototype_episodes(base: np.ndarray, y: np.ndarray, sampled: GroupEpisodes, shots: int,
                       whitenings: dict[float, Whitening]) -> dict[str, Any]:
    """Nearest-prototype accuracy on cross-group episodes, with the shrinkage chosen per episode.

    ``base`` holds the powered, store-centred embeddings. In each episode every shrinkage of
    ``whitenings`` is tried by leave-one-out on the support set alone (the queries are never
    seen); the best (ties: the first) whitens support and queries, then the cosine
    nearest-prototype rule of ``cytostore fewshot`` classifies the queries.
    """
    chosen: list[float] = []
    plain = PrototypeConfig(power=None, centre=False, whiten=None, l2=True)

    def run(xs: np.ndarray, ys: np.ndarray, xq: np.ndarray, k: int) -> np.ndarray:
        best, best_acc = next(iter(whitenings)), -1.0
        if k > 1 and len(whitenings) > 1:
            for s, w in whitenings.items():
                acc = _loo_accuracy(unit(w(xs)), ys)
                if acc > best_acc:
                    best, best_acc = s, acc
        chosen.append(best)
        w = whitenings[best]
        sc, classes = classify(unit(w(xs)), ys, unit(w(xq)), plain)
        return np.asarray(classes, dtype=object)[sc.argmax(axis=1)]

    res = run_episodes(base, y, sampled.episodes, shots, {"prototypes": run})["prototypes"]
    values, counts = np.unique(np.asarray(chosen), return_counts=True)
    res["shrinkage_chosen"] = {str(float(v)): int(c) for v, c in zip(values, counts)}
    return res


def base_transform(config: PrototypeConfig, mean: np.ndarray) -> FeatureTransform:
    """Power and store-mean centring only (whitening and L2 are applied per episode)."""
    return FeatureTransform(config.power, np.asarray(mean, dtype=np.float32), False, None)
