"""What the data-file checksums cost: the store writer's path with and without recording them,
and `cytostore store check`'s read-back speed.

    nice -n 10 python benchmarks/store_checksums.py                 # 50,000 rows, 1280-d float16
    python benchmarks/store_checksums.py --rows 200000 --reps 3

Rows are generated in the real cells layout (1280-d float16 embeddings, 3 KB random
thumbnail bytes standing in for JPEGs) and written through ``CellWriter`` in commits of
``--commit-rows``; each repetition writes a fresh table with checksums recorded (the
default) and one with them switched off, in alternating order. Prints seconds per run,
the median difference, the share of the write spent inside the recording (hashing the
new files and appending the log: the figure that holds on a busy machine), and the time
`store check` takes to read everything back. Then one JSON line. The scratch folder is deleted.
"""

from __future__ import annotations

import argparse
import json
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
from cytostore.store import CellStore, schema  # noqa: E402
from cytostore.store.check import ChecksumLog, verify  # noqa: E402
from cytostore.store.writer import CellWriter, CommitPolicy  # noqa: E402

DIM = 1280


def batch(start: int, n: int, rng: np.random.Generator) -> pa.Table:
    """n generated cells (uids start..start+n-1) in the cells layout."""
    target = schema.arrow_schema("cells", dim=DIM, metadata={"encoder": {"name": "bench"}})
    ids = np.arange(start, start + n)
    emb = rng.standard_normal((n, DIM), dtype=np.float32).astype(np.float16)
    cols = {
        "uid": pa.array(ids, pa.int64()), "slide_id": pa.array([f"s{i // 5000}" for i in ids]),
        "cell_id": pa.array([f"c{i}" for i in ids]), "x": pa.array(ids.astype(float)),
        "y": pa.array(ids.astype(float)), "crop_size": pa.array(np.full(n, 64, np.int32)),
        "image": pa.array(["img.png"] * n), "source_ref": pa.array(["bench"] * n),
        "thumbnail": pa.array([rng.bytes(3000) for _ in range(n)], pa.binary()), "run_id": pa.array(["r"] * n),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), DIM),
    }
    return pa.Table.from_pydict({f.name: cols.get(f.name, pa.nulls(n, f.type)) for f in target}, schema=target)


RECORD_S = [0.0]  # seconds spent inside ChecksumLog.record (hashing and appending the log)
_record = ChecksumLog.record


def _timed_record(self, ds) -> int:
    t0 = time.perf_counter()
    try:
        return _record(self, ds)
    finally:
        RECORD_S[0] += time.perf_counter() - t0


ChecksumLog.record = _timed_record


def write(root: Path, data: list[pa.Table], commit_rows: int, checksums: bool) -> tuple[float, int]:
    """Seconds to write ``data`` through the writer (close included), and bytes written."""
    store = CellStore.create(root)
    t0 = time.perf_counter()
    w = CellWriter(store, "bench", CommitPolicy(commit_rows=commit_rows, commit_seconds=1e9))
    if not checksums:
        w.checksums = None
    for b in data:
        w.append(b)
    w.close()
    secs = time.perf_counter() - t0
    return secs, sum(p.stat().st_size for p in (root / "cells.bench.lance" / "data").iterdir())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=50_000)
    ap.add_argument("--commit-rows", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=1024, help="rows per append call")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--out", help="scratch folder (default a temporary one)")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    data = [batch(s, min(args.batch, args.rows - s), rng) for s in range(0, args.rows, args.batch)]
    base = Path(tempfile.mkdtemp(prefix="cytostore-checksums-", dir=args.out))
    runs: dict[bool, list[float]] = {True: [], False: []}
    shares: list[float] = []
    size = 0
    check_s = None
    try:
        for rep in range(args.reps):
            for on in ((True, False) if rep % 2 == 0 else (False, True)):
                root = base / f"{'on' if on else 'off'}{rep}"
                RECORD_S[0] = 0.0
                secs, size = write(root, data, args.commit_rows, on)
                runs[on].append(secs)
                if on:
                    shares.append(RECORD_S[0] / secs)
                print(f"rep {rep}: checksums {'on ' if on else 'off'} {secs:6.2f} s"
                      + (f" ({RECORD_S[0]:.2f} s recording them)" if on else ""), flush=True)
                if on and check_s is None:
                    t0 = time.perf_counter()
                    report = verify(CellStore.open(root))
                    check_s = time.perf_counter() - t0
                    assert report["damaged"] == 0 and report["verified"] > 0
                shutil.rmtree(root)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    on, off = statistics.median(runs[True]), statistics.median(runs[False])
    mb = size / 1e6
    out = {"rows": args.rows, "commit_rows": args.commit_rows, "data_mb": round(mb, 1),
           "write_s_with": round(on, 3), "write_s_without": round(off, 3),
           "overhead_pct": round(100 * (on - off) / off, 1), "record_share_pct": round(100 * statistics.median(shares), 1),
           "check_s": round(check_s, 3), "check_mb_per_s": round(mb / check_s, 1)}
    print(f"{args.rows} rows, {mb:.0f} MB of data files: write {off:.2f} s without checksums, {on:.2f} s with "
          f"(median of {args.reps}: {out['overhead_pct']:+}%); time inside the checksum recording: "
          f"{out['record_share_pct']}% of the write (median); store check reads it back in "
          f"{check_s:.2f} s ({out['check_mb_per_s']} MB/s)")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
