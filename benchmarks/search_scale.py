"""Similar-cell search at 1M-10M cells: our FAISS index vs scikit-learn and LanceDB.

Data: the real embeddings of a store (EfficientNet-Lite0, 1280-d, float16), plus
generated ones drawn to match their distribution: PCA to 128 dimensions, a
32-component full-covariance Gaussian mixture fitted in that space, the PCA
residual added back as independent Gaussian noise with the real per-dimension
residual variance, then clipped at 0 (the real features are post-ReLU6, about
half zeros) and rounded to float16. The queries are 1000 real cells held out of
the database; the database holds every other real cell plus generated ones.

Vectors live in a float16 .npy file on disk (like the table's column), read with plain
file reads so that peak RSS counts only what the code holds; every method
sees the same L2-normalised float32 copies (LanceDB gets them written as a float32
vector column). Our index is the library's ivf-pq
kind (`cytostore.index.fill_index`: PCA+random rotation to 256-d, IVF, PQ64, nprobe
tuned at build, exact re-ranking of 100 candidates read from the float16 file)
searched through the library's own `cytostore.search.knn`.

    nice -n 10 .venv/bin/python benchmarks/search_scale.py --store runs/chula12-store --n 1000000

Prints plain lines, then one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

DIM_PCA, GMM_K, CHUNK = 128, 32, 65_536


def peak_rss_gb() -> float:
    """Peak resident memory since the last reset_peak() (VmHWM), in GiB."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def current_rss_gb() -> float:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:")) / 2**20


def reset_peak() -> bool:
    """Starts the peak-memory count afresh (Linux: /proc/self/clear_refs); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- data -----------------------------------------------------------------------------
class Generator:
    """PCA + Gaussian mixture + residual noise, fitted on real embeddings (raw scale)."""

    def __init__(self, real: np.ndarray, seed: int):
        from sklearn.mixture import GaussianMixture

        x = real.astype(np.float32)
        self.mean = x.mean(0)
        _, s, vt = np.linalg.svd(x - self.mean, full_matrices=False)
        self.basis = vt[:DIM_PCA]  # (r, d)
        z = (x - self.mean) @ self.basis.T
        self.explained = float((s[:DIM_PCA] ** 2).sum() / (s ** 2).sum())
        self.res_std = (x - self.mean - z @ self.basis).std(0)
        self.gmm = GaussianMixture(GMM_K, covariance_type="full", reg_covar=1e-3, random_state=seed, max_iter=200).fit(z)
        self.rng = np.random.default_rng(seed)

    def sample(self, n: int) -> np.ndarray:
        comp = self.rng.choice(GMM_K, size=n, p=self.gmm.weights_)
        z = np.empty((n, DIM_PCA), np.float32)
        for c in np.unique(comp):
            m = comp == c
            chol = np.linalg.cholesky(self.gmm.covariances_[c]).astype(np.float32)
            z[m] = self.gmm.means_[c] + self.rng.standard_normal((int(m.sum()), DIM_PCA), dtype=np.float32) @ chol.T
        x = self.mean + z @ self.basis + self.rng.standard_normal((n, len(self.mean)), dtype=np.float32) * self.res_std
        return np.maximum(x, 0).astype(np.float16)


def load_generator(workdir: Path, n_real: int, real_db: np.ndarray, queries: int, seed: int,
                   refit: bool = False) -> tuple["Generator", bool]:
    """The generator fitted on ``real_db``, reused from ``workdir`` when fitted before; (generator, reused).

    The fit takes minutes: it is cached for the same real cells, held-out split and seed.
    """
    cache = workdir / f"generator-{n_real}-{queries}-{seed}.pkl"
    if cache.is_file() and not refit:
        with open(cache, "rb") as fh:
            return pickle.load(fh), True
    gen = Generator(real_db, seed)
    with open(cache, "wb") as fh:
        pickle.dump(gen, fh)
    return gen, False


def normalised(x: np.ndarray) -> np.ndarray:
    from cytostore.index import prepare

    return prepare(x, "cosine")


def realism(real_q: np.ndarray, real_db: np.ndarray, gen: np.ndarray) -> dict:
    """Nearest-neighbour cosine of held-out real cells among real vs generated cells (same count)."""
    q, r, g = normalised(real_q[:500]), normalised(real_db), normalised(gen[: len(real_db)])
    return {"zero_fraction_real": round(float((real_db == 0).mean()), 3),
            "zero_fraction_generated": round(float((gen == 0).mean()), 3),
            "median_top1_cos_real_to_real": round(float(np.median((q @ r.T).max(1))), 4),
            "median_top1_cos_real_to_generated": round(float(np.median((q @ g.T).max(1))), 4),
            "median_top1_cos_generated_to_generated": round(float(np.median(
                np.sort(g[:500] @ g.T, axis=1)[:, -2])), 4)}


class VectorFile:
    """A float16 .npy matrix on disk, read with plain file reads.

    No memory map: the process's peak RSS then counts only what the code holds
    (chunks, the index, the training sample), not the file's cached pages.
    """

    def __init__(self, path: Path):
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(fh)
            self.offset = fh.tell()
        self.path, self.shape, self.dtype = path, shape, np.dtype(dtype)
        self.fd = os.open(path, os.O_RDONLY)
        self.row_bytes = self.shape[1] * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.row_bytes

    def read(self, start: int, stop: int) -> np.ndarray:
        buf = os.pread(self.fd, (stop - start) * self.row_bytes, self.offset + start * self.row_bytes)
        return np.frombuffer(buf, self.dtype).reshape(stop - start, self.shape[1])

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Rows ``ids`` (any order), one read each."""
        out = np.empty((len(ids), self.shape[1]), self.dtype)
        for j, i in enumerate(np.asarray(ids, np.int64)):
            out[j] = np.frombuffer(os.pread(self.fd, self.row_bytes, self.offset + int(i) * self.row_bytes), self.dtype)
        return out


def make_db(path: Path, n: int, real_db: np.ndarray, gen: Generator) -> VectorFile:
    r = min(len(real_db), n)
    with open(path, "wb") as fh:
        np.lib.format.write_array_header_2_0(fh, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float16)),
                                                  "fortran_order": False, "shape": (n, real_db.shape[1])})
        fh.write(np.ascontiguousarray(real_db[:r], np.float16).tobytes())
        for start in range(r, n, CHUNK):
            fh.write(gen.sample(min(n, start + CHUNK) - start).tobytes())
    return VectorFile(path)


def batches(db: VectorFile):
    for start in range(0, len(db), CHUNK):
        stop = min(len(db), start + CHUNK)
        yield np.arange(start, stop, dtype=np.int64), normalised(db.read(start, stop))


def exact_truth(db: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    from cytostore.index import RunningTopK

    top = RunningTopK(q, k)
    for ids, x in batches(db):
        top.update(ids, x)
    return top.ids


def recall(found: list | np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(np.asarray(f).tolist()) & set(t.tolist())) / len(t) for f, t in zip(found, truth)]))


def latency(fn, queries: np.ndarray) -> tuple[list, dict]:
    out, times = [], []
    for v in queries:
        t0 = time.perf_counter()
        out.append(fn(v))
        times.append(time.perf_counter() - t0)
    ms = 1000 * np.array(times)
    return out, {"p50_ms": round(float(np.percentile(ms, 50)), 2), "p99_ms": round(float(np.percentile(ms, 99)), 2),
                 "mean_ms": round(float(ms.mean()), 2), "queries": len(ms)}


# -- our index, bound to the vector file instead of a Lance table -----------------------------
@dataclass
class FileBound:
    """What `cytostore.search.knn` needs: the index and exact vectors by id (here: file rows)."""

    index: object
    info: dict
    db: VectorFile
    added: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    deleted: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    gpu: object = None  # searched on the CPU

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        return normalised(self.db.rows(ids))

    def added_vectors(self) -> np.ndarray:
        return np.zeros((0, self.db.shape[1]), np.float32)


def run_ours(db, q, truth, k, args) -> dict:
    import faiss

    from cytostore.index import IndexParams, fill_index, raw_search
    from cytostore.search import knn

    params = IndexParams(kind="ivf-pq", train_size=args.train_size, rerank=args.rerank, nprobe=args.nprobe,
                         seed=args.seed)
    rng = np.random.default_rng(args.seed)
    reset_peak()  # the build's own peak: training sample, index, streamed chunks
    pos = rng.permutation(np.sort(rng.choice(len(db), min(len(db), params.train_size), replace=False)))
    train = (pos.astype(np.int64), normalised(db.rows(pos)))
    t0 = time.perf_counter()
    index, info, _ = fill_index("ivf-pq", db.shape[1], len(db), lambda: batches(db), train, params)
    build_s = time.perf_counter() - t0
    build_peak = peak_rss_gb()
    del train
    index_bytes = int(faiss.serialize_index(index).nbytes)
    log(f"ours: built {info['factory']} nprobe={info['nprobe']} in {build_s:.0f} s, {index_bytes / 1e6:.0f} MB")
    bound = FileBound(index, info, db)
    knn(bound, q[0], k)  # warm up
    found, lat = latency(lambda v: knn(bound, v, k)[1], q)
    t0 = time.perf_counter()  # batch: one FAISS call for all queries, then exact re-ranking per query
    _, cand = raw_search(index, info, q, max(args.rerank, k))
    batch_found = []
    for v, c in zip(q, cand):
        c = c[c >= 0]
        batch_found.append(c[np.argsort(-(bound.vectors(c) @ v), kind="stable")[:k]])
    batch_s = time.perf_counter() - t0
    _, pq_only = raw_search(index, info, q, k)
    return {"method": "cytostore ivf-pq (faiss) + exact re-rank", "factory": info["factory"], "nlist": info["nlist"],
            "nprobe": info["nprobe"], "rerank": args.rerank, "tuning": info.get("tuning"),
            "build_s": round(build_s, 1), "index_bytes": index_bytes, "recall_at_10": round(recall(found, truth), 4),
            "recall_at_10_batch": round(recall(batch_found, truth), 4),
            "recall_at_10_without_rerank": round(recall(pq_only, truth), 4), **lat,
            "batch_qps": round(len(q) / batch_s, 1), "build_peak_rss_gb": round(build_peak, 2),
            "rss_gb_after_queries": round(current_rss_gb(), 2)}


def run_sklearn(db, q, truth, k, args) -> dict:
    from sklearn.neighbors import NearestNeighbors

    reset_peak()
    t0 = time.perf_counter()
    x = np.empty(db.shape, np.float32)
    for ids, v in batches(db):
        x[ids[0]:ids[-1] + 1] = v
    nn = NearestNeighbors(n_neighbors=k, algorithm="brute", metric="cosine").fit(x)
    build_s = time.perf_counter() - t0
    _, lat = latency(lambda v: nn.kneighbors(v[None], return_distance=False)[0], q[: args.sklearn_single])
    t0 = time.perf_counter()
    found = nn.kneighbors(q, return_distance=False)
    batch_s = time.perf_counter() - t0
    out = {"method": "scikit-learn NearestNeighbors(brute, cosine)", "build_s": round(build_s, 1),
           "memory_bytes": int(x.nbytes), "recall_at_10": round(recall(found, truth), 4), **lat,
           "batch_qps": round(len(q) / batch_s, 1), "peak_rss_gb": round(peak_rss_gb(), 2)}
    del nn, x
    return out


def run_lancedb(db, q, truth, k, args, workdir: Path) -> dict:
    os.environ.setdefault("LANCE_LOG", "error")  # one deprecation warning per query otherwise
    import lancedb
    import pyarrow as pa

    reset_peak()
    path = workdir / "lancedb"
    shutil.rmtree(path, ignore_errors=True)
    conn = lancedb.connect(str(path))
    # float32: LanceDB's k-means on float16 vectors ran > 20 min for 60k vectors on this machine.
    schema = pa.schema([pa.field("id", pa.int64()), pa.field("vector", pa.list_(pa.float32(), db.shape[1]))])

    def reader():
        for start in range(0, len(db), CHUNK):
            chunk = normalised(db.read(start, min(len(db), start + CHUNK)))
            vec = pa.FixedSizeListArray.from_arrays(pa.array(chunk.reshape(-1)), db.shape[1])
            yield pa.record_batch([pa.array(np.arange(start, start + len(chunk), dtype=np.int64)), vec], schema=schema)

    t0 = time.perf_counter()
    tbl = conn.create_table("cells", data=pa.RecordBatchReader.from_batches(schema, reader()), schema=schema)
    write_s = time.perf_counter() - t0
    nparts = int(2 ** round(np.log2(np.sqrt(len(db)))))
    t0 = time.perf_counter()
    tbl.create_index(metric="cosine", index_type="IVF_PQ", num_partitions=nparts, num_sub_vectors=args.lance_sub_vectors)
    index_s = time.perf_counter() - t0
    idx_bytes = sum(f.stat().st_size for f in path.rglob("*") if "_indices" in f.parts and f.is_file())

    def one(v):
        r = (tbl.search(v.astype(np.float32)).distance_type("cosine").nprobes(args.lance_nprobes)
             .refine_factor(args.lance_refine).limit(k).select(["id"]).to_arrow())
        return r.column("id").to_numpy()

    one(q[0])
    found, lat = latency(one, q)
    return {"method": "LanceDB IVF_PQ", "num_partitions": nparts, "num_sub_vectors": args.lance_sub_vectors,
            "nprobes": args.lance_nprobes, "refine_factor": args.lance_refine, "write_s": round(write_s, 1),
            "build_s": round(index_s, 1), "index_bytes": int(idx_bytes), "recall_at_10": round(recall(found, truth), 4),
            **lat, "batch_qps": round(1000 / lat["mean_ms"], 1), "batch_note": "sequential queries (no batch API used)",
            "peak_rss_gb": round(peak_rss_gb(), 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--store", default="runs/chula12-store")
    ap.add_argument("--n", type=int, action="append", help="database sizes (repeatable); default 1000000")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--workdir", default="/tmp/cytostore-search-scale")
    ap.add_argument("--train-size", type=int, default=131_072)
    ap.add_argument("--rerank", type=int, default=100)
    ap.add_argument("--nprobe", type=int, default=0, help="0 = tuned at build")
    ap.add_argument("--skip", action="append", default=[], choices=["sklearn", "lancedb"])
    ap.add_argument("--sklearn-single", type=int, default=30, help="single queries timed through scikit-learn")
    ap.add_argument("--lance-sub-vectors", type=int, default=80)
    ap.add_argument("--lance-nprobes", type=int, default=32)
    ap.add_argument("--lance-refine", type=int, default=10)
    ap.add_argument("--keep", action="store_true", help="keep the vector files and LanceDB files")
    ap.add_argument("--refit", action="store_true", help="fit the generator again instead of reusing its cache")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reuse", action="store_true",
                    help="reuse a database file of the expected size and its exact top-k left by an earlier --keep run")
    args = ap.parse_args()
    sizes, k = args.n or [1_000_000], 10

    from cytostore import CellStore

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    real, _ = CellStore.open(args.store).embeddings()
    real = np.asarray(real)
    rng = np.random.default_rng(args.seed)
    perm = rng.permutation(len(real))
    real_q, real_db = real[perm[: args.queries]], real[perm[args.queries:]]
    log(f"{len(real)} real {real.shape[1]}-d embeddings from {args.store}: {len(real_q)} held-out queries, "
        f"{len(real_db)} in the database")
    t0 = time.perf_counter()
    gen, cached = load_generator(workdir, len(real), real_db, args.queries, args.seed, refit=args.refit)
    fit = {"pca_dims": DIM_PCA, "explained_variance": round(gen.explained, 4), "gmm_components": GMM_K,
           "fit_s": round(time.perf_counter() - t0, 1), "cached": cached, **realism(real_q, real_db, gen.sample(len(real_db)))}
    log(f"generator: {fit}")
    q = normalised(real_q)
    runs = []
    for n in sizes:
        path = workdir / f"db_{n}.f16.npy"
        truth_path = workdir / f"truth_{n}_{args.queries}_{args.seed}.npy"
        expected = n * real.shape[1] * 2
        db = VectorFile(path) if args.reuse and path.is_file() else None
        if db is not None and db.nbytes == expected:
            gen_s = None
            log(f"n={n}: reusing {path} ({db.nbytes / 1e9:.1f} GB float16 file)")
        else:
            if db is not None:
                os.close(db.fd)
            t0 = time.perf_counter()
            db = make_db(path, n, real_db, gen)
            gen_s = round(time.perf_counter() - t0, 1)
            truth_path.unlink(missing_ok=True)
            log(f"n={n}: database written ({db.nbytes / 1e9:.1f} GB float16 file) in {gen_s:.0f} s")
        if args.reuse and truth_path.is_file():
            truth, truth_s = np.load(truth_path), None
            log(f"n={n}: reusing exact top-{k} from {truth_path}")
        else:
            t0 = time.perf_counter()
            truth = exact_truth(db, q, k)
            truth_s = round(time.perf_counter() - t0, 1)
            np.save(truth_path, truth)
            log(f"n={n}: exact top-{k} of {len(q)} queries (numpy, chunked) in {truth_s:.0f} s")
        run = {"n": n, "real_in_db": int(min(n, len(real_db))), "generated": int(max(0, n - len(real_db))),
               "generate_s": gen_s, "exact_batch_s": truth_s,
               "exact_batch_qps": round(len(q) / truth_s, 1) if truth_s else None, "methods": []}
        run["methods"].append(run_ours(db, q, truth, k, args))
        log(f"n={n}: ours {run['methods'][-1]}")
        if "sklearn" not in args.skip:
            run["methods"].append(run_sklearn(db, q, truth, k, args))
            log(f"n={n}: sklearn {run['methods'][-1]}")
        if "lancedb" not in args.skip:
            run["methods"].append(run_lancedb(db, q, truth, k, args, workdir))
            log(f"n={n}: lancedb {run['methods'][-1]}")
        runs.append(run)
        os.close(db.fd)
        del db
        if not args.keep:
            os.remove(path)
            truth_path.unlink(missing_ok=True)
            shutil.rmtree(workdir / "lancedb", ignore_errors=True)
    print("\nn          method                                        build_s  index_MB  recall@10  p50_ms  p99_ms  batch_qps")
    for run in runs:
        for m in run["methods"]:
            size = m.get("index_bytes", m.get("memory_bytes", 0)) / 1e6
            print(f"{run['n']:<10} {m['method']:<45} {m['build_s']:>7} {size:>9.0f} {m['recall_at_10']:>10.4f} "
                  f"{m['p50_ms']:>7} {m['p99_ms']:>7} {m['batch_qps']:>10}")
    print(json.dumps({"benchmark": "search_scale", "store": args.store, "dim": int(real.shape[1]),
                      "queries": len(q), "k": k, "cpus": os.cpu_count(), "generator": fit, "runs": runs}))


if __name__ == "__main__":
    main()
