"""Pure FAISS: make, fill, tune, extend, shrink and search an index of prepared vectors.

Nothing here knows about stores or tables: ids are whatever the caller gives
(the table's ``uid`` in the library), vectors are prepared float32 rows.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable

import numpy as np

from cytostore.errors import InputError, StoreError

KINDS = ("auto", "flat", "ivf-pq", "hnsw")


@dataclass(frozen=True)
class IndexParams:
    """How an index is built, searched and updated; tuned values end up in the sidecar."""

    kind: str = "auto"  # auto, flat, ivf-pq or hnsw
    metric: str = "cosine"  # cosine (inner product of L2-normalised copies) or ip (raw inner product)
    exact_max: int = 200_000  # auto picks exact search below this many cells
    nlist: int = 0  # IVF lists; 0 = about 4 sqrt(N), a power of two
    pq_m: int = 64  # PQ sub-quantizers = bytes per vector
    transform: str = "pca"  # before IVF-PQ: pca (PCA + random rotation), opq (slow to train) or none
    reduce_dim: int = 256  # output dimension of that transform (capped by the input dimension)
    nprobe: int = 0  # IVF lists probed per query; 0 = tuned at build to reach target_recall
    rerank: int = 100  # IVF-PQ candidates re-ranked exactly from the stored vectors (at least k)
    hnsw_m: int = 32  # HNSW graph degree
    ef_construction: int = 80  # HNSW build breadth
    ef_search: int = 0  # HNSW search breadth; 0 = tuned at build
    target_recall: float = 0.97  # recall@10 the tuning aims for, on held queries
    tune_queries: int = 200  # stored vectors used as tuning queries
    train_size: int = 131_072  # vectors sampled to train the compressed kinds
    batch_size: int = 16_384  # rows streamed from the table per batch
    seed: int = 0  # sampling seed
    max_update_fraction: float = 0.2  # `index update` asks for a rebuild past this share of rows changed since the build
    max_imbalance_growth: float = 1.5  # ... or when IVF list sizes grow this much more skewed than at the build


# -- vectors -----------------------------------------------------------------------
def prepare(vectors: np.ndarray, metric: str = "cosine") -> np.ndarray:
    """A float32 C-contiguous copy, L2-normalised for cosine (zero rows stay zero)."""
    x = np.array(vectors, dtype=np.float32, order="C", copy=True)
    if metric == "cosine":
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        np.divide(x, norms, out=x, where=norms > 0)
    return x


def uid_digest(uids: np.ndarray) -> str:
    """sha256 of the sorted uid set (int64 little-endian)."""
    arr = np.unique(np.asarray(uids, dtype="<i8"))
    return "sha256:" + hashlib.sha256(arr.tobytes()).hexdigest()


def faiss_module():
    """The faiss module, imported on first use."""
    try:
        import faiss
    except ImportError as e:  # pragma: no cover - faiss-cpu is a core dependency
        raise StoreError("faiss is not installed: pip install faiss-cpu (or faiss-gpu)") from e
    return faiss


# -- making and filling an index ----------------------------------------------------
# PQ codebooks have at least 16 centroids (4 bits); FAISS k-means wants 39 training points per centroid.
IVFPQ_MIN_ROWS = 39 * 2 ** 4


def resolve_kind(kind: str, n: int, params: IndexParams = IndexParams()) -> str:
    """``auto`` -> ``flat`` below ``params.exact_max`` cells (or too few to train IVF-PQ), else ``ivf-pq``.

    Raises:
        InputError: ``ivf-pq`` asked for with fewer than ``IVFPQ_MIN_ROWS`` training vectors.
    """
    if kind not in KINDS:
        raise InputError(f"unknown index kind {kind!r}; use one of {', '.join(KINDS)}")
    n_train = min(n, params.train_size)
    if kind == "auto":
        return "flat" if n < params.exact_max or n_train < IVFPQ_MIN_ROWS else "ivf-pq"
    if kind == "ivf-pq" and n_train < IVFPQ_MIN_ROWS:
        what = f"the table has {n} cells" if n < IVFPQ_MIN_ROWS else f"the training sample is {params.train_size}"
        raise InputError(f"--kind ivf-pq needs at least {IVFPQ_MIN_ROWS} cells to train its codebooks (16 centroids "
                         f"per PQ sub-quantizer, 39 points each) and {what}; use --kind flat (exact search, fast at "
                         "this size) or --kind auto, which picks it")
    return kind


def _ivfpq_layout(dim: int, n: int, n_train: int, p: IndexParams) -> dict[str, Any]:
    if p.transform not in {"pca", "opq", "none"}:
        raise InputError(f"unknown transform {p.transform!r}; use pca, opq or none")
    out_dim = dim if p.transform == "none" else min(p.reduce_dim, dim)
    m = max(1, min(p.pq_m, out_dim))
    while out_dim % m:  # PQ needs the rotated dimension to split evenly
        m -= 1
    # k-means wants >= 39 points per centroid: fewer lists / PQ bits on small tables.
    nlist = p.nlist or int(2 ** round(np.log2(max(4 * np.sqrt(n), 16))))
    nlist = int(max(1, min(nlist, n_train // 39, 65_536)))
    nbits = int(min(8, max(4, np.floor(np.log2(max(n_train / 39, 16))))))
    prefix = {"pca": f"PCAR{out_dim},", "opq": f"OPQ{m}_{out_dim},", "none": ""}[p.transform]
    factory = f"{prefix}IVF{nlist},PQ{m}x{nbits}"
    return {"factory": factory, "transform": p.transform, "reduce_dim": out_dim, "pq_m": m, "pq_nbits": nbits,
            "nlist": nlist}


def new_index(kind: str, dim: int, n: int, n_train: int, params: IndexParams = IndexParams()):
    """An empty FAISS index of ``kind`` (not ``auto``) and the parameters it records."""
    faiss = faiss_module()
    if kind == "flat":
        return faiss.IndexIDMap2(faiss.IndexFlatIP(dim)), {"factory": "IDMap2,FlatIP"}
    if kind == "hnsw":
        inner = faiss.IndexHNSWFlat(dim, params.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        inner.hnsw.efConstruction = params.ef_construction
        return faiss.IndexIDMap2(inner), {"factory": f"IDMap2,HNSW{params.hnsw_m},Flat",
                                          "hnsw_m": params.hnsw_m, "ef_construction": params.ef_construction}
    if kind == "ivf-pq":
        if params.metric == "ip" and params.transform == "pca":
            params = replace(params, transform="none")  # centring before PCA changes inner-product ranks
        info = _ivfpq_layout(dim, n, n_train, params)
        # On unit vectors L2 ranks exactly as cosine, and unlike inner product it is
        # unchanged by the PCA's centring (the mean of post-ReLU features is large).
        metric = faiss.METRIC_L2 if params.metric == "cosine" else faiss.METRIC_INNER_PRODUCT
        info["faiss_metric"] = "l2" if params.metric == "cosine" else "ip"
        return faiss.index_factory(dim, info["factory"], metric), info
    raise InputError(f"unknown index kind {kind!r}; use one of {', '.join(KINDS[1:])}")


def to_gpu(index):
    """(GPU copy of a CPU index, its resources), or raises when faiss cannot move it.

    PQ64 codes need float16 lookup tables to fit the GPU's shared memory.
    """
    faiss = faiss_module()
    res = faiss.StandardGpuResources()
    opts = faiss.GpuClonerOptions()
    opts.useFloat16 = True
    return faiss.index_cpu_to_gpu(res, 0, index, opts), res


def _gpu_copy(index, kind: str, doing: str) -> tuple[Any, Any, str | None]:
    """(GPU copy of ``index``, its resources, None), or (None, None, why it stays on the CPU)."""
    if kind == "hnsw":
        return None, None, f"faiss has no GPU HNSW; {doing} on the CPU"
    if not gpu_available():
        return None, None, ("--device cuda: this faiss build has no GPU support or sees no GPU "
                            f"(pip install faiss-gpu-cu12); {doing} on the CPU")
    try:
        gpu, res = to_gpu(index)
    except Exception as e:  # e.g. a layout this faiss cannot move to the GPU
        return None, None, f"--device cuda: faiss could not move the index to the GPU ({e}); {doing} on the CPU"
    return gpu, res, None


def gpu_available() -> bool:
    """Whether this faiss build has GPU support and sees a GPU."""
    faiss = faiss_module()
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


class RunningTopK:
    """Running exact top-k of a few queries over streamed batches (tuning ground truth)."""

    def __init__(self, queries: np.ndarray, k: int):
        self.q, self.k = queries, k
        self.scores = np.full((len(queries), 0), -np.inf, dtype=np.float32)
        self.ids = np.zeros((len(queries), 0), dtype=np.int64)

    def update(self, uids: np.ndarray, x: np.ndarray) -> None:
        s = np.concatenate([self.scores, self.q @ x.T], axis=1)
        i = np.concatenate([self.ids, np.broadcast_to(uids, (len(self.q), len(uids)))], axis=1)
        top = np.argpartition(-s, self.k - 1, axis=1)[:, : self.k] if s.shape[1] > self.k else np.argsort(-s, 1)
        s, i = np.take_along_axis(s, top, 1), np.take_along_axis(i, top, 1)
        order = np.argsort(-s, axis=1, kind="stable")
        self.scores, self.ids = np.take_along_axis(s, order, 1), np.take_along_axis(i, order, 1)


def fill_index(kind: str, dim: int, n: int, batches: Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]],
               train: tuple[np.ndarray, np.ndarray] | None, params: IndexParams = IndexParams(),
               device: str = "cpu", progress: Callable[[int], None] | None = None):
    """Builds an index of ``kind`` from streamed ``(uids, prepared float32 vectors)`` batches.

    Args:
        kind: flat, ivf-pq or hnsw.
        dim: vector dimension; n: total rows the batches hold.
        batches: returns a fresh iterator over the rows, in table order.
        train: (uids, vectors) sampled from the rows: trains ivf-pq; its first
            ``params.tune_queries`` rows are the held queries that tune nprobe/efSearch.
        params: layout and tuning; device: cpu or cuda (falls back to cpu with a note).
        progress: called with the rows added so far.

    Returns:
        (CPU index, info dict with the layout, tuned search parameters and notes,
        uids in the order added).
    """
    faiss = faiss_module()
    n_train = len(train[1]) if train is not None else 0
    index, info = new_index(kind, dim, n, n_train, params)
    info.update({"kind": kind, "metric": params.metric, "notes": []})
    work, res = index, None
    if device.startswith("cuda"):
        gpu, res, note = _gpu_copy(index, kind, "built")
        work = gpu if gpu is not None else index
        if note:
            info["notes"].append(note)
    info["device"] = "cuda" if res is not None else "cpu"
    tune = kind != "flat" and train is not None and len(train[1]) > 1
    truth = RunningTopK(train[1][: params.tune_queries], 11) if tune else None
    if kind == "ivf-pq":
        t0 = time.perf_counter()
        work.train(train[1])
        info["train_vectors"], info["train_seconds"] = n_train, round(time.perf_counter() - t0, 2)
    added: list[np.ndarray] = []
    done = 0
    for uids, x in batches():
        work.add_with_ids(x, uids)
        if truth is not None:
            truth.update(uids, x)
        added.append(uids)
        done += len(uids)
        if progress is not None:
            progress(done)
    if res is not None:
        index = faiss.index_gpu_to_cpu(work)
    uids = np.concatenate(added) if added else np.zeros(0, np.int64)
    if kind == "ivf-pq":
        info["rerank"] = params.rerank
        info["nprobe"] = params.nprobe or _tune(index, info, train, truth, params, "nprobe")
    elif kind == "hnsw":
        info["ef_search"] = params.ef_search or _tune(index, info, train, truth, params, "ef_search")
    return index, info, uids


def _tune(index, info: dict, train, truth: RunningTopK, params: IndexParams, what: str) -> int:
    """The smallest nprobe / efSearch whose recall@10 on the held queries reaches the target.

    For ivf-pq the recall counts true neighbours among the re-ranked candidates:
    exact re-ranking then puts them first.
    """
    q_uids = train[0][: len(truth.q)]
    gt = [row[row != u][:10] for row, u in zip(truth.ids, q_uids)]
    limit = info.get("nlist", 1) if what == "nprobe" else 4096
    values = [v for v in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096) if v <= limit] or [1]
    if what == "ef_search":
        values = [v for v in values if v >= 16]
    n_cand = params.rerank if what == "nprobe" else 10
    best, recall = values[-1], 0.0
    for v in values:
        _, ids = raw_search(index, {**info, what: v}, truth.q, n_cand + 1)
        recall = float(np.mean([np.isin(g, row[row != u][:n_cand]).mean() for g, row, u in zip(gt, ids, q_uids)]))
        if recall >= params.target_recall:
            best = v
            break
    info.setdefault("tuning", {})[what] = {"value": best, "recall_at_10": round(recall, 4),
                                           "queries": len(q_uids), "target": params.target_recall}
    if recall < params.target_recall:
        info["notes"].append(f"{what}={best} reached recall@10 {recall:.3f} < target {params.target_recall}")
    return best


def raw_search(index, info: dict, queries: np.ndarray, n: int, sel=None, widen: int = 1, gpu=None):
    """FAISS search with the recorded runtime parameters and an optional IDSelector.

    ``widen`` multiplies nprobe / efSearch (used when a selective filter leaves
    too few candidates). Returns (scores, uids), best first, with -1 for missing
    results; ivf-pq on cosine gives squared L2 distances instead of scores.
    ``gpu``, a GPU copy of ``index``, answers the searches without a selector
    (faiss GPU indexes take no IDSelector).
    """
    faiss = faiss_module()
    kind = info["kind"]
    if gpu is not None and sel is None:
        try:
            if kind == "ivf-pq":
                faiss.GpuParameterSpace().set_index_parameter(gpu, "nprobe",
                                                              int(min(info["nprobe"] * widen, info["nlist"])))
            return gpu.search(np.ascontiguousarray(queries, dtype=np.float32), int(max(1, min(n, index.ntotal))))
        except RuntimeError:  # pragma: no cover - a GPU layout faiss cannot tune or search: the CPU answers
            pass
    n = int(max(1, min(n, index.ntotal)))
    if kind == "ivf-pq":
        p = faiss.SearchParametersIVF(sel=sel, nprobe=int(min(info["nprobe"] * widen, info["nlist"])))
    elif kind == "hnsw":
        p = faiss.SearchParametersHNSW(sel=sel, efSearch=int(max(info["ef_search"] * widen, n)))
    else:
        p = faiss.SearchParameters(sel=sel)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    threads = faiss.omp_get_max_threads()
    if len(queries) > 1 or threads == 1:
        return index.search(queries, n, params=p)
    # One query runs on one thread anyway; idle OpenMP workers only spin, which
    # made single queries 4x slower on a busy 2-core machine.
    faiss.omp_set_num_threads(1)
    try:
        return index.search(queries, n, params=p)
    finally:
        faiss.omp_set_num_threads(threads)


# -- changing a built index in place ----------------------------------------------------
def add_vectors(index, uids: np.ndarray, x: np.ndarray) -> None:
    """Adds prepared vectors under ``uids`` (IVF kinds keep their trained quantizer)."""
    if len(uids):
        index.add_with_ids(np.ascontiguousarray(x, dtype=np.float32), np.ascontiguousarray(uids, dtype=np.int64))


def can_remove(kind: str) -> bool:
    """Whether FAISS can remove vectors from an index of ``kind`` (HNSW graphs cannot)."""
    return kind in {"flat", "ivf-pq"}


def remove_ids(index, kind: str, uids: np.ndarray) -> int:
    """Removes the vectors stored under ``uids``; returns how many were removed."""
    if not len(uids):
        return 0
    if not can_remove(kind):
        raise StoreError(f"faiss cannot remove vectors from a {kind} index; rebuild it")
    sel = faiss_module().IDSelectorBatch(np.ascontiguousarray(uids, dtype=np.int64))
    return int(index.remove_ids(sel))


def ivf_imbalance(index) -> float | None:
    """How skewed the IVF list sizes are (1.0 = all equal), or None for a non-IVF index."""
    faiss = faiss_module()
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        return None
    return float(ivf.invlists.imbalance_factor()) if ivf.ntotal else 1.0
