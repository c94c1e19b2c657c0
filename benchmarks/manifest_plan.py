"""Planning a large manifest whose cells are all stored already (a resumed ingest).

Code path measured: ``ManifestSource`` (streamed in chunks, one pass for the
slides spanning several images) + ``cytostore.embed.plan_tasks`` against a
``KeySet`` of stored keys: every row is parsed, keyed, checked and skipped.

The stored key set is BUILT IN MEMORY BY THIS BENCHMARK from the same keys (there
is no Lance table of 10^7 rows behind it); its bytes are printed apart, as are the
bytes of the source's own repeated-key set (16 bytes per row read).

Each size runs in a fresh process so that its peak RSS is its own:

    nice -n 10 python benchmarks/manifest_plan.py                  # 10^5 and 10^6 rows
    nice -n 10 python benchmarks/manifest_plan.py --rows 10000000  # and 10^7
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ROWS_PER_IMAGE = 100
IMAGES_PER_SLIDE = 10


def write_manifest(path: Path, rows: int) -> None:
    """``rows`` cells over rows/100 images, 10 images per slide (so ids carry the image stem)."""
    import pyarrow as pa

    step = 1_000_000
    writer = None
    for start in range(0, rows, step):
        i = np.arange(start, min(rows, start + step))
        img = i // ROWS_PER_IMAGE
        k = i % ROWS_PER_IMAGE
        batch = pa.table({
            "image": pa.array(np.char.add(np.char.add("fields/f", img.astype(str)), ".png")),
            "slide_id": pa.array(np.char.add("s", (img // IMAGES_PER_SLIDE).astype(str))),
            "x": 20 + 7 * (k % 10), "y": 20 + 7 * (k // 10), "label": pa.array(np.full(i.size, "normal")),
        })
        if writer is None:
            if path.suffix == ".parquet":
                import pyarrow.parquet as pq

                writer = pq.ParquetWriter(path, batch.schema)
            else:
                from pyarrow import csv

                writer = csv.CSVWriter(path, batch.schema)
        writer.write_table(batch)
    writer.close()


def stored_keys(rows: int):
    """The KeySet of every cell of the manifest, as if all were stored."""
    from cytostore.keys import KeySet, cell_key_hash, cell_uid

    uids = np.empty(rows, dtype=np.int64)
    hashes = np.empty(rows, dtype=np.int64)
    for i in range(rows):
        img, k = divmod(i, ROWS_PER_IMAGE)
        cell = f"f{img}:{20 + 7 * (k % 10)}_{20 + 7 * (k // 10)}"
        slide = f"s{img // IMAGES_PER_SLIDE}"
        uids[i], hashes[i] = cell_uid(slide, cell), cell_key_hash(slide, cell)
    return KeySet(uids, hashes)


def _keyset_bytes(keys) -> int:
    levels = [keys._stored, *keys._run]
    return int(sum(u.nbytes + h.nbytes for u, h in levels))


class PeakRss:
    """Samples this process's RSS every 20 ms while planning runs."""

    def __init__(self):
        import psutil

        self.proc = psutil.Process()
        self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def measure(path: Path, rows: int) -> dict:
    """One planning run (in a child process)."""
    import resource

    from cytostore.embed import plan_tasks
    from cytostore.sources import open_source

    t0 = time.perf_counter()
    stored = stored_keys(rows)
    build_s = time.perf_counter() - t0
    rss_before = PeakRss().proc.memory_info().rss
    counts = {"task": 0, "failure": 0, "skipped": 0}
    source = open_source(path)

    with PeakRss() as peak:
        t0 = time.perf_counter()
        for kind, item in plan_tasks(source, stored):
            counts[kind] += item[0] if kind == "skipped" else 1
        plan_s = time.perf_counter() - t0
    source_keys = 16 * counts["skipped"]  # the source's repeated-key set: 16 bytes per row it claimed
    return {
        "format": path.suffix[1:], "rows": rows, "plan_s": round(plan_s, 2), "rows_per_s": round(rows / plan_s),
        "skipped": counts["skipped"], "tasks": counts["task"], "failures": counts["failure"],
        "stored_keyset_mb": round(_keyset_bytes(stored) / 2**20, 1), "source_keyset_mb": round(source_keys / 2**20, 1),
        "rss_before_plan_mb": round(rss_before / 2**20), "rss_peak_plan_mb": round(peak.peak / 2**20),
        "plan_growth_minus_keysets_mb": round((peak.peak - rss_before - source_keys) / 2**20),
        "ru_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024), "keyset_build_s": round(build_s, 1),
    }


def keyset_only(rows: int) -> dict:
    """Peak RSS of the source's repeated-key set alone: ``rows`` keys claimed in chunks of
    1,024, as ManifestSource claims them (KeySet levels merged like a binary counter)."""
    from cytostore.keys import KeySet

    rng = np.random.default_rng(0)
    keys = KeySet()
    with PeakRss() as peak:
        base = peak.proc.memory_info().rss
        for start in range(0, rows, 1024):
            n = min(1024, rows - start)
            keys.classify(rng.integers(0, 2**63 - 1, n), rng.integers(-2**63, 2**63 - 1, n))
    return {"keyset_only_rows": rows, "keyset_mb": round(_keyset_bytes(keys) / 2**20, 1),
            "keyset_peak_growth_mb": round((peak.peak - base) / 2**20)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--formats", nargs="+", default=["csv", "parquet"])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--keyset-only", action="store_true", help="measure the repeated-key set alone")
    args = ap.parse_args()
    if args.keyset_only:
        for rows in args.rows:
            out = subprocess.run([sys.executable, "-c", f"import sys, json; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
                                  f"import manifest_plan as m; print(json.dumps(m.keyset_only({rows})))"],
                                 check=True, capture_output=True, text=True)
            print(out.stdout.strip().splitlines()[-1], flush=True)
        return
    if args.child:
        print(json.dumps(measure(Path(args.child), args.rows[0])), flush=True)
        return
    print("stored key set: built in memory by this benchmark from the manifest's keys (no Lance table)")
    with tempfile.TemporaryDirectory() as tmp:
        for rows in args.rows:
            for fmt in args.formats:
                path = Path(tmp) / f"m{rows}.{fmt}"
                write_manifest(path, rows)
                out = subprocess.run([sys.executable, __file__, "--rows", str(rows), "--child", str(path)],
                                     check=True, capture_output=True, text=True)
                res = json.loads(out.stdout.strip().splitlines()[-1])
                res["file_mb"] = round(path.stat().st_size / 2**20)
                print(json.dumps(res), flush=True)
                path.unlink()


if __name__ == "__main__":
    main()
