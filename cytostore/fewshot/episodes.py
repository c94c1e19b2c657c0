"""Episodic N-way K-shot evaluation on a labelled store, with baselines on the same episodes."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from cytostore.errors import InputError, StoreError
from cytostore.fewshot.prototypes import PrototypeConfig, classify, make_transform
from cytostore.fewshot.tables import as_store, stats_for
from cytostore.store import CellStore

BASELINES = ("knn", "logistic_regression")
KNN_MAX_K = 5  # k of the k-NN baseline: min(shots, 5)
LOGREG_C = 10.0  # inverse L2 strength of the logistic-regression baseline (features are unit length)


@dataclass(frozen=True)
class EpisodeSpec:
    """What episodes to draw."""

    ways: int  # classes per episode; 0 = every eligible class
    shots: int  # support cells per class
    queries: int = 15  # query cells per class; 0 = every remaining cell of the class
    episodes: int = 200  # how many episodes
    seed: int = 0  # episode e uses numpy's default_rng([seed, e])


@dataclass(frozen=True)
class Episode:
    """One episode: indices into the labelled cells, support and query disjoint."""

    classes: tuple[str, ...]  # the classes drawn, sorted
    support: np.ndarray  # indices of the support cells (shots per class, class by class)
    query: np.ndarray  # indices of the query cells


def eligible_classes(labels: Sequence[str], shots: int, queries: int) -> tuple[list[str], dict[str, int]]:
    """Classes with at least shots + queries cells (shots + 1 when queries is 0), and the
    excluded ones with their cell counts."""
    values, counts = np.unique(np.asarray(labels, dtype=object).astype(str), return_counts=True)
    need = shots + max(queries, 1)
    ok = [str(v) for v, c in zip(values, counts) if c >= need]
    excluded = {str(v): int(c) for v, c in zip(values, counts) if c < need}
    return ok, excluded


def sample_episodes(labels: Sequence[str], spec: EpisodeSpec) -> tuple[list[Episode], list[str], dict[str, int]]:
    """Draws episodes reproducibly: the same seed gives the same episodes.

    Returns:
        (episodes, eligible classes, excluded classes -> cell count).

    Raises:
        InputError: bad counts, or fewer eligible classes than the episode needs.
    """
    if spec.shots < 1 or spec.queries < 0 or spec.episodes < 1 or spec.ways < 0:
        raise InputError(f"need shots >= 1, queries >= 0, episodes >= 1, ways >= 0; got {asdict(spec)}")
    labels = np.asarray(labels, dtype=object).astype(str)
    eligible, excluded = eligible_classes(labels, spec.shots, spec.queries)
    ways = spec.ways or len(eligible)
    if ways < 2 or ways > len(eligible):
        need = spec.shots + max(spec.queries, 1)
        raise InputError(
            f"{ways}-way episodes need {max(ways, 2)} classes with at least {need} labelled cells "
            f"({spec.shots} shots + {max(spec.queries, 1)} queries); only {len(eligible)} have that "
            f"({eligible}); excluded: {excluded}. Lower --ways, --shots or --queries")
    members = {c: np.flatnonzero(labels == c) for c in eligible}
    episodes = []
    for e in range(spec.episodes):
        rng = np.random.default_rng([spec.seed, e])
        classes = sorted(rng.choice(eligible, size=ways, replace=False).tolist())
        sup, qry = [], []
        for c in classes:
            idx = members[c]
            take = len(idx) if spec.queries == 0 else spec.shots + spec.queries
            pick = idx[rng.choice(len(idx), size=take, replace=False)]
            sup.append(pick[:spec.shots])
            qry.append(pick[spec.shots:])
        episodes.append(Episode(tuple(classes), np.concatenate(sup), np.concatenate(qry)))
    return episodes, eligible, excluded


# -- methods: (support features, support labels, query features, shots) -> predicted labels -----
def _prototype_method(config: PrototypeConfig) -> Callable[..., np.ndarray]:
    def run(xs: np.ndarray, ys: np.ndarray, xq: np.ndarray, shots: int) -> np.ndarray:
        scores, classes = classify(xs, ys, xq, config)
        return np.asarray(classes, dtype=object)[scores.argmax(axis=1)]

    return run


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def knn(xs: np.ndarray, ys: np.ndarray, xq: np.ndarray, shots: int) -> np.ndarray:
    """k-NN on cosine similarity, k = min(shots, 5); ties go to the larger summed similarity."""
    k = min(shots, KNN_MAX_K, len(xs))
    sims = _unit(xq) @ _unit(xs).T
    top = np.argsort(-sims, axis=1)[:, :k]
    classes, y_idx = np.unique(ys, return_inverse=True)
    votes = np.zeros((len(xq), len(classes)))
    rows = np.arange(len(xq))[:, None]
    np.add.at(votes, (np.broadcast_to(rows, top.shape), y_idx[top]), 1.0 + 1e-3 * sims[rows, top])
    return classes[votes.argmax(axis=1)]


def logistic_regression(xs: np.ndarray, ys: np.ndarray, xq: np.ndarray, shots: int) -> np.ndarray:
    """Multinomial logistic regression (L2, C=10) fitted on the support set alone.

    With an L2 penalty the weights lie in the span of the support vectors, so fitting in
    an orthonormal basis of that span (n_support dims instead of dim) gives the same
    classifier, much faster.
    """
    from sklearn.linear_model import LogisticRegression

    basis, _ = np.linalg.qr(xs.T)
    clf = LogisticRegression(C=LOGREG_C, max_iter=1000)
    clf.fit(xs @ basis, ys)
    return clf.predict(xq @ basis)


def _summary(accs: list[float], baccs: list[float], correct: dict[str, int], total: dict[str, int]) -> dict[str, Any]:
    a, b = np.asarray(accs), np.asarray(baccs)
    n = len(a)
    return {
        "accuracy": round(float(a.mean()), 4),
        "ci95": round(float(1.96 * a.std() / np.sqrt(n)), 4),
        "balanced_accuracy": round(float(b.mean()), 4),
        "balanced_accuracy_ci95": round(float(1.96 * b.std() / np.sqrt(n)), 4),
        "per_class": {c: round(correct[c] / total[c], 4) for c in sorted(total)},
    }


def run_episodes(features: np.ndarray, labels: Sequence[str], episodes: list[Episode], shots: int,
                 methods: dict[str, Callable[..., np.ndarray]]) -> dict[str, dict[str, Any]]:
    """Scores every method on the same episodes.

    Returns:
        method -> accuracy, ci95 (1.96 * std / sqrt(episodes), std over episodes with ddof 0),
        balanced_accuracy (mean per-class recall, averaged over episodes), per_class (recall
        pooled over all episodes), seconds.
    """
    from threadpoolctl import threadpool_limits

    labels = np.asarray(labels, dtype=object).astype(str)
    with threadpool_limits(limits=1):  # tiny matrices: BLAS threads only contend
        return _run(features, labels, episodes, shots, methods)


def _run(features: np.ndarray, labels: np.ndarray, episodes: list[Episode], shots: int,
         methods: dict[str, Callable[..., np.ndarray]]) -> dict[str, dict[str, Any]]:
    out = {}
    for name, fn in methods.items():
        t0 = time.perf_counter()
        accs, baccs = [], []
        correct: dict[str, int] = {}
        total: dict[str, int] = {}
        for ep in episodes:
            yq = labels[ep.query]
            pred = fn(features[ep.support], labels[ep.support], features[ep.query], shots)
            hit = pred == yq
            accs.append(float(hit.mean()))
            recalls = []
            for c in ep.classes:
                m = yq == c
                recalls.append(float(hit[m].mean()))
                correct[c] = correct.get(c, 0) + int(hit[m].sum())
                total[c] = total.get(c, 0) + int(m.sum())
            baccs.append(float(np.mean(recalls)))
        out[name] = {**_summary(accs, baccs, correct, total), "seconds": round(time.perf_counter() - t0, 2)}
    return out


def labelled_features(store: CellStore | str | Path, label_column: str = "label", encoder: str | None = None,
                      config: PrototypeConfig = PrototypeConfig()) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Transformed features and labels of every labelled cell, plus what was used.

    The centring mean and the whitening come from every cell of the table, labelled or not
    (no label is used).
    """
    s = as_store(store)
    table = s.resolve(encoder)
    names = s.dataset(table).schema.names
    if label_column not in names:
        raise StoreError(f"table {table!r} has no column {label_column!r}; it has {names}")
    emb, keys = s.embeddings(table, where=f"`{label_column}` IS NOT NULL", columns=("uid", label_column))
    labels = np.array([str(v) for v in keys.column(label_column).to_pylist()], dtype=object)
    feats = make_transform(config, stats_for(s, table, config))(emb)
    return feats, labels, {"table": table, "encoder": s.provenance(table).get("encoder", {}).get("name"),
                           "labelled_cells": int(len(labels))}


def evaluate(store: CellStore | str | Path, spec: EpisodeSpec, label_column: str = "label",
             encoder: str | None = None, config: PrototypeConfig = PrototypeConfig(),
             baselines: Sequence[str] = BASELINES) -> dict[str, Any]:
    """N-way K-shot episodes on a labelled store: prototypes and baselines on the same episodes.

    Returns:
        One JSON-ready dict: accuracy, ci95, balanced_accuracy, per_class (prototypes), ways,
        shots, queries, episodes, seed, classes, excluded_classes, baselines (name -> same
        figures), config, and the table used.
    """
    unknown = [b for b in baselines if b not in BASELINES]
    if unknown:
        raise InputError(f"unknown baseline(s) {unknown}; choose from {list(BASELINES)}")
    t0 = time.perf_counter()
    feats, labels, info = labelled_features(store, label_column, encoder, config)
    if len(labels) == 0:
        raise StoreError(f"table {info['table']!r} has no cell with a {label_column!r}; eval needs labelled cells")
    episodes, eligible, excluded = sample_episodes(labels, spec)
    ways = len(episodes[0].classes)
    methods = {"prototypes": _prototype_method(config)}
    methods.update({b: {"knn": knn, "logistic_regression": logistic_regression}[b] for b in baselines})
    res = run_episodes(feats, labels, episodes, spec.shots, methods)
    proto = res.pop("prototypes")
    for b in res:
        res[b]["params"] = {"k": min(spec.shots, KNN_MAX_K)} if b == "knn" else {"C": LOGREG_C, "penalty": "l2"}
    return {
        **{k: proto[k] for k in ("accuracy", "ci95", "balanced_accuracy", "balanced_accuracy_ci95")},
        "ways": ways, "shots": spec.shots, "queries": spec.queries or "all", "episodes": spec.episodes,
        "seed": spec.seed, "per_class": proto["per_class"], "baselines": res,
        "chance": round(1 / ways, 4), "classes": eligible, "excluded_classes": excluded,
        "config": config.to_dict(), **info, "seconds": round(time.perf_counter() - t0, 2),
    }
