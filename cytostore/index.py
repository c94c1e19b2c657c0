"""A FAISS index bound to one version of a cell table: build, load, verify.

The files live beside the table, in ``<store>/indexes/<table>/``: ``index.faiss``
(its ids are the table's stable ``uid`` column, never Lance row addresses),
``uids.npy`` (the indexed uids, in table order) and ``sidecar.json`` (what was
indexed, from which table version and encoder, and how). A table that moved on
after the build stays searchable: `load_index` finds the rows added since (searched
exactly) and the uids deleted since (filtered out of results).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from cytostore.errors import InputError, ProvenanceError, StoreError
from cytostore.keys import UidSet
from cytostore.store import CellStore, embedding_matrix

KINDS = ("auto", "flat", "ivf-pq", "hnsw")
SIDECAR, INDEX_FILE, UIDS_FILE = "sidecar.json", "index.faiss", "uids.npy"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class IndexParams:
    """How an index is built and searched; tuned values end up in the sidecar."""

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
def resolve_kind(kind: str, n: int, params: IndexParams = IndexParams()) -> str:
    """``auto`` -> ``flat`` below ``params.exact_max`` cells, else ``ivf-pq``."""
    if kind not in KINDS:
        raise InputError(f"unknown index kind {kind!r}; use one of {', '.join(KINDS)}")
    if kind == "auto":
        return "flat" if n < params.exact_max else "ivf-pq"
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


# -- the store side ---------------------------------------------------------------
def as_store(store: CellStore | str | Path) -> CellStore:
    """A CellStore, opened from a path when needed."""
    return store if isinstance(store, CellStore) else CellStore.open(store)


def index_dir(store: CellStore, table: str) -> Path:
    """``<store>/indexes/<table>/``; refuses object-store URIs."""
    if "://" in store.root:
        raise StoreError(f"indexes live beside a local store folder; {store.root} is an object-store URI "
                         "(copy the store locally to index it)")
    return Path(store.uri("index", table))


def _dim(ds) -> int:
    field = ds.schema.field("embedding")
    return int(field.type.list_size)


def rebuild_command(store: CellStore, table: str) -> str:
    """The command that (re)builds the index of ``table``."""
    enc = "" if len(store.tables()) == 1 else f" --encoder {table}"
    return f"cytostore index build --store {store.root}{enc}"


def build_index(store: CellStore | str | Path, encoder: str | None = None, kind: str = "auto", device: str = "cpu",
                params: IndexParams | None = None, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Builds the index of a cell table and writes it with its sidecar.

    Args:
        store: a CellStore or its path.
        encoder: which encoder table; default the only (or default) one.
        kind: auto (exact below ``params.exact_max`` cells, else IVF-PQ), flat, ivf-pq or hnsw.
        device: cpu, cuda or auto (cuda needs a GPU build of faiss; else cpu with a note).
        params: layout and tuning (its ``kind`` is overridden by ``kind``).
        progress: called with (rows added, total rows).

    Returns:
        The sidecar written (a dict).
    """
    from cytostore.store.lock import WriterLock

    t0 = time.perf_counter()
    store = as_store(store)
    params = replace(params or IndexParams(), kind=kind)
    if params.metric not in {"cosine", "ip"}:
        raise InputError(f"unknown metric {params.metric!r}; use cosine or ip")
    if device not in {"auto", "cpu"} and not device.startswith("cuda"):
        raise InputError(f"unknown device {device!r}; use auto, cpu or cuda")
    table = store.resolve(encoder)
    ds = store.dataset(table)  # one version, read throughout
    n, dim = ds.count_rows(), _dim(ds)
    if n == 0:
        raise StoreError(f"table {table!r} has no cells to index; run `cytostore ingest` first")
    chosen = resolve_kind(kind, n, params)
    device = ("cuda" if gpu_available() else "cpu") if device == "auto" else device
    train = _sample(ds, n, params) if chosen != "flat" else None

    def batches() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for b in ds.to_batches(columns=["uid", "embedding"], batch_size=params.batch_size):
            yield (b.column("uid").to_numpy().astype(np.int64),
                   prepare(embedding_matrix(b.column("embedding")), params.metric))

    folder = index_dir(store, table)
    folder.mkdir(parents=True, exist_ok=True)
    lock = WriterLock(store.root, f"index.{table}").acquire(wait=False)
    try:
        index, info, uids = fill_index(chosen, dim, n, batches, train, params, device,
                                       (lambda done: progress(done, n)) if progress else None)
        if len(np.unique(uids)) != len(uids):
            raise StoreError(f"table {table!r} holds duplicate uids; it cannot be indexed by uid")
        enc = schema_provenance(ds).get("encoder", {})
        sidecar = {
            "format": "cytostore-index", "format_version": FORMAT_VERSION, "table": table,
            "table_version": int(ds.version), "rows": int(n), "dim": dim, "uid_digest": uid_digest(uids),
            "encoder": {"name": enc.get("name"), "weights_sha256": enc.get("weights_sha256")},
            "metric": params.metric, "kind": chosen, "requested_kind": kind,
            "params": {k: v for k, v in info.items() if k not in {"notes", "kind", "metric", "device", "tuning"}},
            "tuning": info.get("tuning"), "device": info["device"],
            "faiss_version": faiss_module().__version__, "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "build_seconds": round(time.perf_counter() - t0, 2), "notes": info["notes"],
            "build_params": asdict(params), "files": {"index": INDEX_FILE, "uids": UIDS_FILE},
        }
        _write(folder, index, uids, sidecar)
        sidecar["index_bytes"] = (folder / INDEX_FILE).stat().st_size
    finally:
        lock.release()
    return sidecar


def _sample(ds, n: int, params: IndexParams) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(params.seed)
    pos = rng.choice(n, size=min(n, params.train_size), replace=False)
    chunks_u, chunks_x = [], []
    for start in range(0, len(pos), params.batch_size):  # bounded takes; then restore the random order
        part = np.sort(pos[start:start + params.batch_size])
        t = ds.take(part.tolist(), columns=["uid", "embedding"])
        perm = rng.permutation(len(part))
        chunks_u.append(t.column("uid").to_numpy()[perm])
        chunks_x.append(prepare(embedding_matrix(t.column("embedding")), params.metric)[perm])
    return np.concatenate(chunks_u).astype(np.int64), np.ascontiguousarray(np.concatenate(chunks_x))


def _write(folder: Path, index, uids: np.ndarray, sidecar: dict) -> None:
    # Sidecar last: a reader that finds a sidecar finds the files it describes.
    faiss = faiss_module()
    tmp = folder / f".{INDEX_FILE}.{os.getpid()}.tmp"
    faiss.write_index(index, str(tmp))
    os.replace(tmp, folder / INDEX_FILE)
    tmp = folder / f".{UIDS_FILE}.{os.getpid()}.tmp"
    with open(tmp, "wb") as fh:
        np.save(fh, uids.astype("<i8"))
    os.replace(tmp, folder / UIDS_FILE)
    tmp = folder / f".{SIDECAR}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(sidecar, indent=1, default=str))
    os.replace(tmp, folder / SIDECAR)


def read_sidecar(store: CellStore | str | Path, encoder: str | None = None) -> dict[str, Any] | None:
    """The sidecar of a table's index, or None when the table has no index."""
    store = as_store(store)
    path = index_dir(store, store.resolve(encoder)) / SIDECAR
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise StoreError(f"{path} is unreadable ({e}); rebuild with `cytostore index build`") from e


def _provenance_diff(sidecar: dict, prov: dict) -> list[str]:
    enc = prov.get("encoder", {})
    return [f"encoder {k}: index has {sidecar['encoder'].get(k)!r}, table has {enc.get(k)!r}"
            for k in ("name", "weights_sha256") if sidecar["encoder"].get(k) != enc.get(k)]


def verify_index(store: CellStore | str | Path, encoder: str | None = None) -> dict[str, Any]:
    """Says whether a table's index matches the table, and what is stale if not.

    Returns:
        A dict with ``fresh`` (bool), ``exists``, ``added`` / ``deleted`` (rows of the
        table not in the index / indexed uids no longer in the table), ``provenance_changed``,
        ``problems`` (sentences) and ``fix`` (the command that makes it fresh).
    """
    store = as_store(store)
    table = store.resolve(encoder)
    ds = store.dataset(table)
    folder = index_dir(store, table)
    out: dict[str, Any] = {"table": table, "index_dir": str(folder), "table_version": int(ds.version),
                           "rows_table": int(ds.count_rows()), "exists": False, "fresh": False, "added": 0,
                           "deleted": 0, "provenance_changed": False, "problems": [], "fix": rebuild_command(store, table)}
    sidecar = read_sidecar(store, table)
    if sidecar is None:
        out["problems"].append(f"table {table!r} has no index")
        return out
    out.update(exists=True, kind=sidecar["kind"], index_table_version=sidecar["table_version"],
               rows_indexed=sidecar["rows"], built_at=sidecar["built_at"])
    diffs = _provenance_diff(sidecar, store.provenance(table))
    if diffs:
        out["provenance_changed"] = True
        out["problems"] += ["provenance changed: " + d for d in diffs]
    try:
        indexed = _read_uids(folder, sidecar)
        current = ds.to_table(columns=["uid"]).column("uid").to_numpy()
        out["added"] = int((~UidSet(indexed).contains(current)).sum())
        out["deleted"] = int((~UidSet(current).contains(indexed)).sum())
    except StoreError as e:
        out["problems"].append(str(e))
        return out
    if out["added"]:
        out["problems"].append(f"{out['added']} cells added since the index was built (searched exactly until rebuilt)")
    if out["deleted"]:
        out["problems"].append(f"{out['deleted']} indexed cells deleted since (filtered out of results until rebuilt)")
    if not out["problems"] and sidecar["table_version"] != out["table_version"]:
        out["note"] = (f"table version moved {sidecar['table_version']} -> {out['table_version']} "
                       "without changing its cells")
    out["fresh"] = not out["problems"]
    return out


def _read_uids(folder: Path, sidecar: dict) -> np.ndarray:
    try:
        uids = np.load(folder / UIDS_FILE, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise StoreError(f"{folder / UIDS_FILE} is missing or unreadable ({e}); rebuild the index") from e
    if len(uids) != sidecar["rows"] or uid_digest(uids) != sidecar["uid_digest"]:
        raise StoreError(f"{folder} holds files from different builds (an interrupted build?); rebuild the index")
    return uids.astype(np.int64)


# -- loading ------------------------------------------------------------------------
@dataclass
class BoundIndex:
    """An index loaded against the current version of its table.

    ``index`` is None when the table has no index: every row is then ``added``
    (searched exactly).
    """

    store: CellStore
    table: str
    dataset: Any  # the Lance dataset at the version loaded
    index: Any  # faiss index or None
    info: dict[str, Any]  # sidecar (kind, params, ...) or {"kind": "none"}
    uids: np.ndarray  # current uids, in table order (row offset i holds uids[i])
    added: np.ndarray  # current uids absent from the index
    deleted: np.ndarray  # indexed uids no longer in the table
    gpu: Any = None  # GPU copy of ``index`` (load_index(device="cuda")), or None
    _order: np.ndarray | None = None
    _added_vectors: np.ndarray | None = None

    @property
    def metric(self) -> str:
        return self.info.get("metric", "cosine")

    @property
    def dim(self) -> int:
        return _dim(self.dataset)

    def offsets(self, uids: np.ndarray) -> np.ndarray:
        """Row offsets of ``uids`` in the loaded table version; -1 where absent."""
        if self._order is None:
            self._order = np.argsort(self.uids, kind="stable")
        uids = np.asarray(uids, dtype=np.int64)
        sorted_uids = self.uids[self._order]
        pos = np.minimum(np.searchsorted(sorted_uids, uids), max(len(sorted_uids) - 1, 0))
        found = sorted_uids[pos] == uids if len(sorted_uids) else np.zeros(len(uids), bool)
        return np.where(found, self._order[pos] if len(sorted_uids) else -1, -1)

    def rows(self, uids: np.ndarray, columns: list[str]):
        """Arrow rows of present ``uids``, in the given order."""
        off = self.offsets(uids)
        if (off < 0).any():
            raise StoreError(f"uids {np.asarray(uids)[off < 0][:3].tolist()} are not in table {self.table!r}")
        return self.dataset.take(off.tolist(), columns=columns)

    def vectors(self, uids: np.ndarray) -> np.ndarray:
        """Prepared float32 vectors of present ``uids`` (the exact stored values)."""
        if len(uids) == 0:
            return np.zeros((0, self.dim), np.float32)
        t = self.rows(uids, ["embedding"])
        return prepare(embedding_matrix(t.column("embedding")), self.metric)

    def added_vectors(self) -> np.ndarray:
        """Prepared vectors of the rows added since the build (cached)."""
        if self._added_vectors is None:
            self._added_vectors = self.vectors(self.added)
        return self._added_vectors


_CACHE: dict[tuple, BoundIndex] = {}


def load_index(store: CellStore | str | Path, encoder: str | None = None, *, require: bool = False,
               device: str = "cpu") -> BoundIndex:
    """Loads a table's index against the table's current version (cached per version).

    ``device="cuda"`` (or ``auto`` with a GPU build of faiss) also puts a copy of
    the index on the GPU for unfiltered searches; when faiss cannot, the index
    stays on the CPU and ``info["notes"]`` says why.

    Raises ProvenanceError when the index was built from another encoder's
    embeddings, and StoreError when ``require`` and there is no index.
    """
    if device not in {"auto", "cpu"} and not device.startswith("cuda"):
        raise InputError(f"unknown device {device!r}; use auto, cpu or cuda")
    store = as_store(store)
    table = store.resolve(encoder)
    ds = store.dataset(table)
    folder = index_dir(store, table)
    side = folder / SIDECAR
    key = (store.root, table, int(ds.version), side.stat().st_mtime_ns if side.is_file() else None, device)
    if key in _CACHE:
        return _CACHE[key]
    sidecar = read_sidecar(store, table)
    current = ds.to_table(columns=["uid"]).column("uid").to_numpy().astype(np.int64)
    if sidecar is None:
        if require:
            raise StoreError(f"table {table!r} has no index; build one with `{rebuild_command(store, table)}`")
        bound = BoundIndex(store, table, ds, None, {"kind": "none", "metric": "cosine"}, current, current,
                           np.zeros(0, np.int64))
    else:
        diffs = _provenance_diff(sidecar, schema_provenance(ds))
        if diffs:
            raise ProvenanceError(f"the index in {folder} was built from other embeddings than table {table!r} "
                                  f"holds ({'; '.join(diffs)}); rebuild it with `{rebuild_command(store, table)}`")
        if sidecar["dim"] != _dim(ds):
            raise StoreError(f"index dimension {sidecar['dim']} != table dimension {_dim(ds)}; rebuild the index")
        index = faiss_module().read_index(str(folder / INDEX_FILE))
        if index.ntotal != sidecar["rows"]:
            raise StoreError(f"{folder}: index holds {index.ntotal} vectors, its sidecar says {sidecar['rows']} "
                             f"(an interrupted build?); rebuild with `{rebuild_command(store, table)}`")
        if sidecar["table_version"] == int(ds.version):
            added, deleted = np.zeros(0, np.int64), np.zeros(0, np.int64)
        else:
            indexed = _read_uids(folder, sidecar)
            added = current[~UidSet(indexed).contains(current)]
            deleted = indexed[~UidSet(current).contains(indexed)]
        info = {**sidecar["params"], "kind": sidecar["kind"], "metric": sidecar["metric"], "sidecar": sidecar,
                "notes": []}
        bound = BoundIndex(store, table, ds, index, info, current, added, deleted)
        _attach_gpu(bound, device)
    if len(_CACHE) >= 4:
        _CACHE.pop(next(iter(_CACHE)))
    _CACHE[key] = bound
    return bound


def _attach_gpu(bound: BoundIndex, device: str) -> None:
    if device == "cpu" or (device == "auto" and not gpu_available()):
        bound.info["device"] = "cpu"
        return
    bound.gpu, res, note = _gpu_copy(bound.index, bound.info["kind"], "searching")
    if res is not None:
        bound.info["gpu_resources"] = res
    bound.info["device"] = "cuda" if bound.gpu is not None else "cpu"
    if note:
        bound.info["notes"].append(note)


def schema_provenance(ds) -> dict[str, Any]:
    """The provenance stored in a Lance dataset's schema."""
    from cytostore.store import schema

    return schema.read_metadata(ds.schema)
