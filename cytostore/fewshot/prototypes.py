"""Nearest-prototype classification: feature normalisation, prototypes, scores.

Pure numpy; nothing here reads
or writes the store, so the same code serves `fit`/`predict` and the episodic
evaluation.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np

from cytostore.errors import InputError

UNKNOWN = "unknown"


@dataclass(frozen=True)
class PrototypeConfig:
    """How features are normalised and prototypes built (defaults: best on Chula RBC-12)."""

    power: float | None = 0.5  # x -> sign(x)|x|^power before centring; None = off
    centre: bool = True  # subtract the store mean (of the powered features)
    whiten: float | None = 0.3  # shrinkage whitening by the store covariance: eigenvalues + whiten * largest; None = off
    whiten_rank: int = 64  # leading eigenvectors kept; the rest are scaled alike (exact enough with shrinkage)
    l2: bool = True  # unit-length vectors and cosine scores; False = plain means, -euclidean
    per_class: int = 1  # prototypes per class (k-means within a class when > 1)
    transductive_steps: int = 0  # soft k-means refinement steps with the query cells
    temperature: float = 10.0  # softmax temperature (on cosines) of the refinement
    seed: int = 0  # k-means seed

    def __post_init__(self) -> None:
        if self.whiten is not None and not self.centre:
            raise InputError("whitening needs centring (centre=True)")
        if self.whiten is not None and (self.whiten <= 0 or self.whiten_rank < 1):
            raise InputError(f"whiten must be > 0 and whiten_rank >= 1, got {self.whiten}, {self.whiten_rank}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form, as stored in the prototype table's metadata."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PrototypeConfig":
        """Inverse of :meth:`to_dict` (unknown keys ignored; absent ones take their default)."""
        names = cls.__dataclass_fields__.keys()
        return cls(**{k: v for k, v in d.items() if k in names})


def power_transform(x: np.ndarray, power: float | None) -> np.ndarray:
    """sign(x) * |x|**power as float32 (a copy); identity when ``power`` is None."""
    out = np.asarray(x, dtype=np.float32)
    if power is None or power == 1:
        return out.copy()
    return (np.sign(out) * np.abs(out) ** np.float32(power)).astype(np.float32)


@dataclass(frozen=True)
class StoreStats:
    """Unsupervised statistics of a cell table's powered embeddings (no label is used)."""

    mean: np.ndarray  # (dim,) mean
    eigvals: np.ndarray | None = None  # (k,) leading covariance eigenvalues, descending
    eigvecs: np.ndarray | None = None  # (k, dim) their unit eigenvectors, one per row
    n: int = 0  # cells the statistics come from


@dataclass(frozen=True)
class Whitening:
    """Shrinkage whitening in low-rank form: x -> tail * x + (x B^T)(scales - tail) B.

    ``B`` holds the leading eigenvectors of the store covariance, ``scales`` are
    1/sqrt(eigenvalue + shrinkage * largest) and ``tail`` = 1/sqrt(shrinkage * largest)
    is the scale of every other direction (their eigenvalues are small beside the shrinkage).
    """

    basis: np.ndarray  # (k, dim) float32
    scales: np.ndarray  # (k,) float32
    tail: float

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.tail * x + ((x @ self.basis.T) * (self.scales - self.tail)) @ self.basis

    def to_dict(self) -> dict[str, Any]:
        import base64

        return {"tail": self.tail, "scales": [float(v) for v in self.scales], "shape": list(self.basis.shape),
                "basis_float32_b64": base64.b64encode(self.basis.astype("<f4").tobytes()).decode()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Whitening":
        import base64

        basis = np.frombuffer(base64.b64decode(d["basis_float32_b64"]), dtype="<f4").reshape(d["shape"])
        return cls(basis.astype(np.float32), np.asarray(d["scales"], dtype=np.float32), float(d["tail"]))

    @classmethod
    def from_stats(cls, stats: StoreStats, shrinkage: float) -> "Whitening":
        if stats.eigvals is None or stats.eigvecs is None:
            raise ValueError("whitening needs the store's covariance eigenvectors")
        lam = shrinkage * float(max(stats.eigvals[0], 1e-12))
        scales = 1 / np.sqrt(np.maximum(stats.eigvals, 0) + lam)
        return cls(stats.eigvecs.astype(np.float32), scales.astype(np.float32), float(1 / np.sqrt(lam)))


@dataclass(frozen=True)
class FeatureTransform:
    """The fitted normalisation: power, centring by the store mean, whitening, L2."""

    power: float | None
    mean: np.ndarray | None  # (dim,) mean of the powered store features, or None
    l2: bool
    whitening: Whitening | None = None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Transforms (N, dim) raw embeddings to float32 normalised features."""
        out = power_transform(x, self.power)
        if self.mean is not None:
            out -= self.mean
        if self.whitening is not None:
            out = self.whitening(out).astype(np.float32)
        if self.l2:
            out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable parameters (the mean as a list of floats, the basis as base64)."""
        return {"power": self.power, "l2": self.l2,
                "mean": None if self.mean is None else [float(v) for v in self.mean],
                "whitening": None if self.whitening is None else self.whitening.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FeatureTransform":
        """Inverse of :meth:`to_dict`."""
        mean = d.get("mean")
        wh = d.get("whitening")
        return cls(d.get("power"), None if mean is None else np.asarray(mean, dtype=np.float32),
                   bool(d.get("l2", True)), None if wh is None else Whitening.from_dict(wh))


def make_transform(config: PrototypeConfig, stats: StoreStats | None) -> FeatureTransform:
    """The transform a config asks for, given the store statistics of the powered features."""
    if (config.centre or config.whiten is not None) and stats is None:
        raise ValueError("centring and whitening need the store statistics")
    mean = np.asarray(stats.mean, dtype=np.float32) if config.centre else None
    whitening = Whitening.from_stats(stats, config.whiten) if config.whiten is not None else None
    return FeatureTransform(config.power, mean, config.l2, whitening)


@dataclass(frozen=True)
class Prototypes:
    """Prototype vectors with their class labels (several rows may share a label)."""

    labels: np.ndarray  # (P,) str, class of each prototype
    index: np.ndarray  # (P,) int, index within its class
    vectors: np.ndarray  # (P, dim) float32, in the transformed space
    n_support: np.ndarray  # (P,) int, support cells behind each prototype
    l2: bool  # cosine scores when True, negative euclidean distance otherwise

    @property
    def classes(self) -> list[str]:
        """Class labels, sorted, each once."""
        return sorted(set(self.labels.tolist()))


def build_prototypes(features: np.ndarray, labels: Sequence[str], config: PrototypeConfig) -> Prototypes:
    """Class means (or k-means centres within each class) of transformed support features.

    Args:
        features: (N, dim) support features, already transformed.
        labels: N class labels.
        config: ``per_class`` > 1 clusters each class into min(per_class, n) prototypes.
    """
    labels = np.asarray(labels, dtype=object).astype(str)
    if len(labels) != len(features):
        raise ValueError("one label per support vector is needed")
    if len(labels) == 0:
        raise InputError("the support set is empty; name at least one labelled cell per class")
    out_l, out_i, out_v, out_n = [], [], [], []
    for cls in sorted(set(labels.tolist())):
        x = features[labels == cls]
        k = max(1, min(int(config.per_class), len(x)))
        if k == 1:
            centres, counts = x.mean(axis=0, keepdims=True), np.array([len(x)])
        else:
            centres, counts = kmeans(x, k, seed=config.seed, spherical=config.l2)
        for j, (c, n) in enumerate(zip(centres, counts)):
            out_l.append(cls)
            out_i.append(j)
            out_v.append(c)
            out_n.append(int(n))
    vectors = np.stack(out_v).astype(np.float32)
    if config.l2:
        vectors = _unit(vectors)
    return Prototypes(np.array(out_l, dtype=object), np.array(out_i), vectors, np.array(out_n), config.l2)


def kmeans(x: np.ndarray, k: int, seed: int = 0, iters: int = 25,
           spherical: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Small seeded k-means (k-means++ start, Lloyd steps); returns (centres, sizes).

    With ``spherical`` the assignment uses cosine similarity, matching cosine scoring.
    Empty clusters are dropped.
    """
    rng = np.random.default_rng(seed)
    x = np.asarray(x, dtype=np.float32)
    centres = [x[rng.integers(len(x))]]
    for _ in range(1, k):
        d2 = np.min([np.square(x - c).sum(1) for c in centres], axis=0)
        p = d2 / d2.sum() if d2.sum() > 0 else None
        centres.append(x[rng.choice(len(x), p=p)])
    c = np.stack(centres)
    assign = np.zeros(len(x), dtype=int)
    for _ in range(iters):
        if spherical:
            new = (x @ _unit(c).T).argmax(1)
        else:
            new = (np.square(x).sum(1)[:, None] - 2 * x @ c.T + np.square(c).sum(1)[None]).argmin(1)
        c = np.stack([x[new == j].mean(0) if (new == j).any() else c[j] for j in range(k)])
        if (new == assign).all() and _ > 0:
            break
        assign = new
    sizes = np.bincount(assign, minlength=k)
    keep = sizes > 0
    return c[keep].astype(np.float32), sizes[keep]


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def prototype_scores(features: np.ndarray, protos: Prototypes) -> np.ndarray:
    """(N, P) similarity of each cell to each prototype: cosine, or -euclidean distance."""
    if protos.l2:
        return features @ protos.vectors.T
    d2 = (np.square(features).sum(1)[:, None] - 2 * features @ protos.vectors.T
          + np.square(protos.vectors).sum(1)[None, :])
    return -np.sqrt(np.maximum(d2, 0))


def class_scores(features: np.ndarray, protos: Prototypes) -> tuple[np.ndarray, list[str]]:
    """(N, C) score of each cell for each class: its best prototype of that class."""
    classes = protos.classes
    per_proto = prototype_scores(features, protos)
    out = np.empty((len(features), len(classes)), dtype=np.float32)
    for j, cls in enumerate(classes):
        out[:, j] = per_proto[:, protos.labels == cls].max(axis=1)
    return out, classes


@dataclass(frozen=True)
class Decision:
    """Per-cell outcome of the nearest-prototype rule."""

    label: np.ndarray  # (N,) predicted class, or UNKNOWN below the minimum score
    nearest: np.ndarray  # (N,) best class regardless of the minimum score
    runner_up: np.ndarray  # (N,) second-best class (None with one class)
    score: np.ndarray  # (N,) float32 best class score
    margin: np.ndarray  # (N,) float32 best minus second-best score


def decide(scores: np.ndarray, classes: Sequence[str], min_score: float | None = None) -> Decision:
    """Best class, runner-up and margin from (N, C) class scores."""
    classes_arr = np.asarray(classes, dtype=object)
    n, c = scores.shape
    order = np.argsort(-scores, axis=1, kind="stable")
    best = scores[np.arange(n), order[:, 0]] if n else np.zeros(0, np.float32)
    if c > 1:
        second = scores[np.arange(n), order[:, 1]]
        runner = classes_arr[order[:, 1]]
    else:
        second = best
        runner = np.full(n, None, dtype=object)
    nearest = classes_arr[order[:, 0]] if n else np.zeros(0, dtype=object)
    label = nearest.copy()
    if min_score is not None:
        label[best < min_score] = UNKNOWN
    return Decision(label, nearest, runner, best.astype(np.float32), (best - second).astype(np.float32))


def refine(protos: Prototypes, queries: np.ndarray, config: PrototypeConfig) -> Prototypes:
    """Transductive soft k-means: moves prototypes towards the query cells they attract.

    Each step assigns every query softly to the prototypes (softmax of
    ``temperature`` x score) and recomputes each prototype as the weighted mean
    of its support (the initial prototype, weight ``n_support``) and the queries.
    The support weight keeps each prototype anchored to its class.
    """
    if config.transductive_steps <= 0 or len(queries) == 0:
        return protos
    anchor = protos.vectors * protos.n_support[:, None].astype(np.float32)
    weight = protos.n_support.astype(np.float32)
    vectors = protos.vectors
    for _ in range(config.transductive_steps):
        cur = Prototypes(protos.labels, protos.index, vectors, protos.n_support, protos.l2)
        logits = config.temperature * prototype_scores(queries, cur)
        logits -= logits.max(axis=1, keepdims=True)
        w = np.exp(logits)
        w /= w.sum(axis=1, keepdims=True)
        vectors = (anchor + w.T @ queries) / (weight + w.sum(axis=0))[:, None]
        if protos.l2:
            vectors = _unit(vectors)
    return Prototypes(protos.labels, protos.index, vectors.astype(np.float32), protos.n_support, protos.l2)


def classify(support: np.ndarray, support_labels: Sequence[str], queries: np.ndarray,
             config: PrototypeConfig) -> tuple[np.ndarray, list[str]]:
    """Builds prototypes (refined with the queries when configured); returns (N, C) class scores."""
    protos = build_prototypes(support, support_labels, config)
    protos = refine(protos, queries, config)
    return class_scores(queries, protos)
