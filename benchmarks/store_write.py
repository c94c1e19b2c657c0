"""The store's write path at scale: generated 1280-d float16 embeddings with REAL JPEG
thumbnails (cropped from the bundled Chula RBC-12 sample as ingest crops them) through
the real writer (``cytostore.store.writer.CellWriter``) and the real cells layout; no encoder.

    python benchmarks/store_write.py                      # 1,000,000 rows, the local engine's path
    python benchmarks/store_write.py --path fragments     # the Ray engine's path: fragments, then commits
    nice -n 10 python benchmarks/store_write.py --rows 10000000 --out /work/runs/write10m

Prints: commit time over the run (median of the first 10% of commits vs the last 10%),
commits made, whole-folder vs live bytes per cell at the end of the run and after
``optimize`` (grace 0: no reader runs), ``_versions`` size, and peak RSS at 10%, 50%
and 100% of the run. Then one JSON line. The output folder is deleted unless --keep.

``--path rows`` (default) hands rows to the writer, which writes and commits them (the
local engine); a commit's time is then mostly the time to write its ~240 MB of data.
``--path fragments`` writes each commit's data first as Lance fragments (as Ray workers
do, timed apart) and hands them to the writer: a commit is then the metadata alone.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from cytostore.imaging import CropPolicy, crop_cell, open_image, thumbnail_bytes  # noqa: E402
from cytostore.store import CellStore, schema  # noqa: E402
from cytostore.store.maintenance import optimize, table_stats  # noqa: E402
from cytostore.store.writer import CellWriter, CommitPolicy  # noqa: E402

SAMPLE = REPO / "examples" / "chula-rbc12-sample"
TABLE = "generated"
DIM = 1280


def real_thumbnails(pool: int, seed: int = 0) -> pa.Array:
    """``pool`` distinct JPEG thumbnails of real cells and cell-sized patches of the bundled
    sample's fields, cropped and encoded the way ingest does (``cytostore.imaging``).

    Distinct, so that no encoding stores a repeated thumbnail once: the sample's 988 cells
    are followed by crops at random positions (and flips) of the same fields.
    """
    side = CropPolicy().crop_size
    rng = np.random.default_rng(seed)
    with open(SAMPLE / "manifest.csv") as fh:
        rows = list(csv.DictReader(fh))
    images = {r["image"]: open_image(SAMPLE / r["image"]) for r in rows}
    out = [thumbnail_bytes(crop_cell(images[r["image"]], float(r["x"]), float(r["y"]), side)) for r in rows]
    names = sorted(images)
    while len(out) < pool:
        img = images[names[rng.integers(len(names))]]
        w, h = img.size
        crop = crop_cell(img, rng.uniform(0, w), rng.uniform(0, h), side)
        out.append(thumbnail_bytes(np.ascontiguousarray(crop[:, ::-1] if rng.random() < 0.5 else crop)))
    return pa.array(out[:pool], pa.binary())


def dirty_mb() -> float:
    """Page-cache data not yet on disk (Dirty + Writeback): commits slow down once the kernel throttles."""
    kb = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(("Dirty:", "Writeback:")):
            kb += int(line.split()[1])
    return kb / 1024


def rss_mb() -> tuple[float, float]:
    """(current, peak) resident memory of this process in MB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024, peak
    return float("nan"), peak


class TimedWriter(CellWriter):
    """The real writer, with each commit and each upkeep pass timed."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.commit_s: list[tuple[int, float]] = []  # (rows, seconds) of each commit
        self.upkeep_s: list[float] = []
        self.manifest_bytes: list[int] = []  # size of the manifest each commit wrote

    def _commit_pending(self) -> int:
        t0 = time.perf_counter()
        upkeep_before = sum(self.upkeep_s)
        n = super()._commit_pending()
        if n:  # the commit alone: an upkeep pass run from it is timed on its own
            self.commit_s.append((n, time.perf_counter() - t0 - (sum(self.upkeep_s) - upkeep_before)))
            manifests = list(Path(self.uri, "_versions").glob("*.manifest"))
            self.manifest_bytes.append(max(manifests, key=lambda p: p.stat().st_mtime).stat().st_size)
        return n

    def maintain(self, force: bool = False):
        t0 = time.perf_counter()
        out = super().maintain(force)
        self.upkeep_s.append(time.perf_counter() - t0)
        return out


def batch(start: int, n: int, target: pa.Schema, thumbs: pa.Array, rng: np.random.Generator) -> pa.Table:
    ids = np.arange(start, start + n)
    slide = [f"gen-{i // 10_000}" for i in ids]
    cell = [f"c{i}" for i in ids]
    emb = rng.standard_normal((n, DIM), dtype=np.float32).astype(np.float16)
    cols = {
        "uid": pa.array(ids, pa.int64()), "slide_id": pa.array(slide), "cell_id": pa.array(cell),
        "x": pa.array(rng.uniform(0, 4000, n)), "y": pa.array(rng.uniform(0, 4000, n)),
        "crop_size": pa.array(np.full(n, 64, np.int32)), "label": pa.array(["generated"] * n),
        "image": pa.array([f"/data/{s}.svs" for s in slide]), "source_ref": pa.array(["benchmarks/store_write.py"] * n),
        "thumbnail": thumbs.take(pa.array(ids % len(thumbs))), "run_id": pa.array(["store_write"] * n),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), DIM),
    }
    if "key_hash" in target.names:
        from cytostore.keys import key_hashes

        cols["key_hash"] = pa.array(key_hashes(slide, cell), pa.int64())
    return pa.Table.from_pydict({f.name: cols.get(f.name, pa.nulls(n, f.type)) for f in target}, schema=target)


def _add_fragment(writer: CellWriter, staged: list[pa.Table], target: pa.Schema) -> float:
    """Writes ``staged`` as uncommitted fragments (a Ray write task), hands them to the writer; returns the write time."""
    from lance.fragment import write_fragments

    t0 = time.perf_counter()
    data = pa.concat_tables(staged)
    frags = write_fragments(data, writer.uri, schema=target, max_rows_per_file=1 << 20)
    took = time.perf_counter() - t0
    if writer.schema is None:
        writer.prepare(target)
    writer.add_fragments(frags, data.num_rows)
    return took


def run(args) -> dict:
    out_dir = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="store_write_", dir=REPO.parent))
    if out_dir.exists() and any(out_dir.iterdir()):
        raise SystemExit(f"{out_dir} is not empty; pick another --out")
    thumbs = real_thumbnails(min(args.thumbnails, args.rows))
    print(f"{len(thumbs)} distinct real thumbnails, {np.mean([len(b) for b in thumbs.to_pylist()]):.0f} B mean", flush=True)
    target = schema.arrow_schema("cells", dim=DIM, metadata={"encoder": {"name": TABLE, "dim": DIM},
                                                             "embedding_dtype": "float16"})
    store = CellStore.create(out_dir)
    writer = TimedWriter(store, TABLE, CommitPolicy(commit_rows=args.commit_rows))
    rng = np.random.default_rng(0)
    marks = {int(args.rows * f): f"{int(f * 100)}%" for f in (0.1, 0.5, 1.0)}
    rss: dict[str, dict] = {}
    t0 = time.perf_counter()
    done = 0
    staged: list[pa.Table] = []  # --path fragments: rows of the next fragment
    fragment_s: list[float] = []
    try:
        while done < args.rows:
            n = min(args.batch, args.rows - done)
            rows = batch(done, n, target, thumbs, rng)
            done += n
            if args.path == "rows":
                writer.append(rows)
            else:
                staged.append(rows)
                if sum(t.num_rows for t in staged) >= args.commit_rows or done == args.rows:
                    fragment_s.append(_add_fragment(writer, staged, target))
                    staged = []
            for at, name in marks.items():
                if done - n < at <= done:
                    cur, peak = rss_mb()
                    rss[name] = {"rows": done, "rss_mb": round(cur), "peak_rss_mb": round(peak),
                                 "dirty_page_cache_mb": round(dirty_mb())}
                    print(f"  {name}: {done} rows, rss {cur:.0f} MB, peak {peak:.0f} MB, "
                          f"{writer.commits} commits, {time.perf_counter() - t0:.0f} s", flush=True)
        writer.flush()
        write_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        writer.close()
        close_s = time.perf_counter() - t1
        uri = store.table_uri(TABLE)
        end = table_stats(uri)
        t2 = time.perf_counter()
        opt = optimize(store, TABLE, grace=dt.timedelta(0))["tables"][0]["after"]
        optimize_s = time.perf_counter() - t2
        # Full-size commits only (the last one is a remainder); at least 3 at each end, so that
        # the first commit (which also creates the table) does not stand for the start alone.
        full = [t for n, t in writer.commit_s if n == args.commit_rows] or [t for _, t in writer.commit_s]
        tenth = min(max(3, len(full) // 10), max(1, len(full) // 2))
        first, last = full[:tenth], full[-tenth:]
        out = {
            "rows": args.rows, "path": args.path, "commit_rows": args.commit_rows, "commits": writer.commits,
            "fragment_write_ms_median": round(1000 * statistics.median(fragment_s), 1) if fragment_s else None,
            "upkeep_passes": len(writer.upkeep_s), "upkeep_seconds_total": round(sum(writer.upkeep_s), 1),
            "commits_compared": len(first),
            "commit_ms_median_first_10pct": round(1000 * statistics.median(first), 1),
            "commit_ms_median_last_10pct": round(1000 * statistics.median(last), 1),
            "manifest_bytes_first_commit": writer.manifest_bytes[0], "manifest_bytes_last_commit": writer.manifest_bytes[-1],
            "write_seconds": round(write_s, 1), "rows_per_second": round(args.rows / write_s),
            "close_seconds": round(close_s, 1), "optimize_seconds": round(optimize_s, 1),
            "end_of_run": {k: end[k] for k in ("fragments", "versions", "versions_bytes")}
            | {"folder_bytes_per_cell": round(end["folder_bytes"] / args.rows, 1),
               "live_bytes_per_cell": round(end["live_bytes"] / args.rows, 1)},
            "after_optimize": {k: opt[k] for k in ("fragments", "versions", "versions_bytes")}
            | {"folder_bytes_per_cell": round(opt["folder_bytes"] / args.rows, 1),
               "live_bytes_per_cell": round(opt["live_bytes"] / args.rows, 1),
               "folder_over_live": round(opt["folder_bytes"] / opt["live_bytes"], 3)},
            "thumbnail_bytes_per_cell": round(float(np.mean([len(b) for b in thumbs.to_pylist()])), 1),
            "rss": rss, "out": str(out_dir),
        }
    finally:
        if not args.keep:
            shutil.rmtree(out_dir, ignore_errors=True)
    e, o = out["end_of_run"], out["after_optimize"]
    print(f"--path {args.path}: {out['rows']} rows in {out['commits']} commits of {args.commit_rows}: "
          f"{out['rows_per_second']} rows/s; commit median {out['commit_ms_median_first_10pct']} ms "
          f"(first 10%) vs {out['commit_ms_median_last_10pct']} ms (last 10%); "
          f"{out['upkeep_passes']} compaction/cleanup passes, {out['upkeep_seconds_total']} s; manifest "
          f"{out['manifest_bytes_first_commit']} B at the first commit, {out['manifest_bytes_last_commit']} B at the last")
    print(f"end of run: {e['folder_bytes_per_cell']} B/cell folder, {e['live_bytes_per_cell']} live, "
          f"{e['fragments']} fragments, {e['versions']} versions, _versions {e['versions_bytes'] / 1e6:.2f} MB")
    print(f"after optimize: {o['folder_bytes_per_cell']} B/cell folder, {o['live_bytes_per_cell']} live "
          f"({o['folder_over_live']}x), {o['fragments']} fragments, _versions {o['versions_bytes'] / 1e6:.3f} MB")
    print("peak RSS: " + ", ".join(f"{k} {v['peak_rss_mb']} MB (now {v['rss_mb']}; dirty page cache "
                                   f"{v['dirty_page_cache_mb']} MB)" for k, v in rss.items()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--path", choices=["rows", "fragments"], default="rows",
                    help="rows: the writer writes the data (local engine); fragments: data written first (Ray engine)")
    ap.add_argument("--batch", type=int, default=1024, help="rows per append call (an ingest's embedded batches)")
    ap.add_argument("--commit-rows", type=int, default=CommitPolicy().commit_rows)
    ap.add_argument("--thumbnails", type=int, default=100_000,
                    help="distinct thumbnails cycled through (a period far above any page or commit)")
    ap.add_argument("--out", help="store folder to write (must be empty); default a temporary one beside the repo")
    ap.add_argument("--keep", action="store_true", help="keep the store folder")
    print(json.dumps(run(ap.parse_args()), default=str))


if __name__ == "__main__":
    main()
