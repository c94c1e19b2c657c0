"""`cytostore evaluate` on a real Chula RBC-12 store: prints the table and the duplicate report.

    # 1. the 80-field subset: the first 70 labelled fields plus 5 pairs of byte-identical fields
    python benchmarks/evaluate_chula.py --make-manifest runs/chula80.csv
    nice -n 10 cytostore ingest runs/chula80.csv --store runs/chula80-store
    # 2. the evaluation (runs/chula12-store, all 22,106 cells, is used when it exists)
    nice -n 10 python benchmarks/evaluate_chula.py [--store runs/chula80-store] [--episodes 200]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from datasets import DEFAULT_DATA, chula12_rows, write_csv  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
# Byte-identical fields (same JPEG bytes) with labels, under different ids (md5sum of Dataset/*.jpg).
DUPLICATE_PAIRS = [("248", "249"), ("296", "298"), ("297", "299"), ("560", "607"), ("574", "584")]


def make_manifest(out: Path, data: Path, first: int = 70) -> Path:
    """The first ``first`` labelled fields (numeric order) plus the duplicate pairs above."""
    stems = sorted((p.stem for p in (data / "chula-rbc12" / "Label").glob("*.txt")), key=int)
    pairs = [s for pair in DUPLICATE_PAIRS for s in pair]
    fields = [s for s in stems if s not in pairs][:first] + pairs
    rows = chula12_rows(data, fields)
    write_csv(rows, out)
    print(f"{len(rows)} cells from {len({r['slide_id'] for r in rows})} fields -> {out}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", type=Path, default=None, help="default runs/chula12-store, else runs/chula80-store")
    ap.add_argument("--make-manifest", type=Path, default=None, help="write the 80-field manifest and stop")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--episodes", type=int, default=200)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "evaluate_chula")
    args = ap.parse_args()
    if args.make_manifest:
        make_manifest(args.make_manifest, args.data)
        return
    store = args.store
    if store is None:
        full = REPO / "runs" / "chula12-store"
        store = full if full.is_dir() else REPO / "runs" / "chula80-store"
    args.out.mkdir(parents=True, exist_ok=True)
    cmd = [str(REPO / ".venv" / "bin" / "cytostore"), "evaluate", "--store", str(store), "--folds", str(args.folds),
           "--episodes", str(args.episodes), "--json", "--markdown", str(args.out / "table.md"),
           "--png", str(args.out / "table.png")]
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        sys.exit(done.returncode)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    (args.out / "report.json").write_text(json.dumps(report, indent=1))
    print((args.out / "table.md").read_text())
    d = report["duplicates"]
    print(f"duplicates: {d['merged_sets']}; {d['cells_with_identical_thumbnail_elsewhere']} cells with a "
          f"byte-identical thumbnail in another group")
    for name, t in report["tables"].items():
        lp, fs = t["linear_probe"], t["fewshot_5way5shot"]
        print(f"{name}: probe C per fold {lp['C']}, k-NN k per fold {t['knn']['k']}, few-shot shrinkage chosen "
              f"{fs.get('shrinkage_chosen')}, classes in episodes {len(fs.get('classes', []))}")
    print(f"evaluation: {seconds:.0f} s wall for {report['n_cells']} cells and {len(report['tables'])} table(s); "
          f"JSON, Markdown and PNG in {args.out}")


if __name__ == "__main__":
    main()
