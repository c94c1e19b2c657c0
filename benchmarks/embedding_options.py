"""The ingest options of docs/embeddings.md compared with `cytostore evaluate` on one store.

Copies a store holding the baseline table (default runs/chula80-store, table
efficientnet_lite0) to --work, ingests the manifest once per configuration (each
its own table), writes the derived tables (harmonise centre / harmony, morphometrics
beside or instead of the embedding), runs `cytostore evaluate --json` over all of
them and prints one Markdown row per table with the ingest's cells/s and the load
average during it. Every command is printed before it runs; steps whose table
exists are skipped, so an interrupted run resumes.

``--mil-store`` (a store of chula-rbc-diseases fields with slide_label, e.g. from
``cytostore ingest .../chula-rbc-diseases --format fields --labels-from-folders``)
adds the risk check of batch correction: slide-level MIL (benchmarks/mil_eval.py,
mean pooling and ABMIL) and a slide-level linear probe on mean embeddings, before
and after harmonising by slide.

Usage: python benchmarks/embedding_options.py [--source runs/chula80-store] [--manifest runs/chula80.csv]
           [--work /tmp/embedding-options] [--only multilayer,reinhard_morph,...] [--mil-store S]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "cli.main"]
BASE = "efficientnet_lite0"
# (table, ingest options); the morph_* columns come from the reinhard_morph run.
INGESTS = {
    "multilayer": (f"{BASE}_multilayer", ["--features", "multilayer"]),
    "reinhard_morph": (f"{BASE}_reinhard", ["--stain", "reinhard", "--morphometrics"]),
    "multilayer_tta4": (f"{BASE}_multilayer_tta4", ["--features", "multilayer", "--tta", "4"]),
}
MORPH_FROM = f"{BASE}_reinhard"
DERIVED = {
    f"{BASE}_centre": ["--table", BASE, "--method", "centre"],
    f"{BASE}_harmony": ["--table", BASE, "--method", "harmony"],
    f"{BASE}_morph": ["--table", BASE, "--method", "none", "--morphometrics", "append",
                      "--morphometrics-from", MORPH_FROM],
    "morphometrics_only": ["--table", MORPH_FROM, "--method", "none", "--morphometrics", "only"],
    f"{BASE}_multilayer_tta4_morph": ["--table", f"{BASE}_multilayer_tta4", "--method", "none",
                                      "--morphometrics", "append", "--morphometrics-from", MORPH_FROM],
}


def run(cmd: list[str], log: Path | None = None) -> str:
    """Runs a command from the repository root (printed first); returns its standard output."""
    print("$ " + " ".join(str(c) for c in cmd), file=sys.stderr, flush=True)
    res = subprocess.run([str(c) for c in cmd], cwd=REPO, capture_output=True, text=True)
    if log is not None:
        log.write_text(res.stdout + "\n--- stderr ---\n" + res.stderr)
    if res.returncode not in (0, 1):
        raise SystemExit(f"failed ({res.returncode}): {' '.join(map(str, cmd))}\n{res.stderr[-2000:]}")
    return res.stdout


def has_table(store: Path, table: str) -> bool:
    return (store / f"cells.{table}.lance" / "_versions").is_dir()


def ingest_all(args, store: Path, logs: Path) -> dict[str, dict]:
    speeds = {}
    for name, (table, opts) in INGESTS.items():
        if args.only and name not in args.only:
            continue
        done = logs / f"{name}.json"
        if not has_table(store, table):
            load0 = os.getloadavg()
            t0 = time.time()
            out = run(["nice", "-n", "10", *CLI, "ingest", args.manifest, "--store", store, "--workers", "1",
                       "--json", "-q", *opts], logs / f"{name}.log")
            rep = json.loads(out.strip().splitlines()[-1])
            rep["load_before"], rep["load_after"], rep["wall"] = load0, os.getloadavg(), time.time() - t0
            done.write_text(json.dumps(rep))
        if done.is_file():
            speeds[table] = json.loads(done.read_text())
    return speeds


def derive_all(args, store: Path) -> None:
    for out, opts in DERIVED.items():
        if has_table(store, out) or not all(has_table(store, opts[i + 1]) for i, o in enumerate(opts)
                                             if o in ("--table", "--morphometrics-from")):
            continue
        run([*CLI, "harmonise", "--store", store, "--out", out, "--json", *opts])


def mil_risk(args, logs: Path) -> dict:
    """MIL (mean pooling, ABMIL) and a slide-level linear probe on mean embeddings, before/after harmonising."""
    store = Path(args.mil_store)
    tables = [BASE]
    for method in ("centre", "harmony"):
        out = f"{BASE}_{method}"
        if not has_table(store, out):
            run([*CLI, "harmonise", "--store", store, "--table", BASE, "--method", method, "--out", out, "--json"])
        tables.append(out)
    result = {}
    for t in tables:
        probe = slide_probe(store, t)
        out = run([sys.executable, "benchmarks/mil_eval.py", "--store", store, "--encoder", t, "--models",
                   *args.mil_models, "--seeds", "0", "--epochs", str(args.mil_epochs), "--out", logs / f"mil-{t}"],
                  logs / f"mil-{t}.log")
        result[t] = {"slide_probe": probe, "mil": json.loads(out.strip().splitlines()[-1])}
        print(json.dumps({t: result[t]}), file=sys.stderr)
    return result


def slide_probe(store_path: Path, table: str, folds: int = 5) -> dict:
    """Balanced accuracy of a logistic regression on each slide's mean embedding (stratified folds)."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    sys.path.insert(0, str(REPO))
    from cytostore.store import CellStore

    t = CellStore.open(store_path).dataset(table).to_table(columns=["slide_id", "slide_label", "embedding"])
    emb = np.asarray(t.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False),
                     dtype=np.float64).reshape(t.num_rows, -1)
    slides = np.asarray(t.column("slide_id").to_pylist())
    labels = dict(zip(slides.tolist(), t.column("slide_label").to_pylist()))
    ids = sorted(set(slides.tolist()))
    x = np.stack([emb[slides == s].mean(0) for s in ids])
    y = np.asarray([labels[s] for s in ids])
    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
    pred = cross_val_predict(model, x, y, cv=StratifiedKFold(folds, shuffle=True, random_state=0))
    return {"balanced_accuracy": round(float(balanced_accuracy_score(y, pred)), 3), "slides": len(ids),
            "spread_of_slide_means": round(float(x.std(0).mean()), 5)}


def table_rows(report: dict, speeds: dict) -> list[str]:
    head = ("| table | dim | 5w5s cross-slide | probe acc | probe bal | probe F1 | P@10 | slide of origin | "
            "ingest cells/s (load) |")
    rows = [head, "|" + "---|" * 9]
    for name, r in report["tables"].items():
        fs = next((v for k, v in r.items() if k.startswith("fewshot_") and isinstance(v, dict)), {}) or {}
        lp = r.get("linear_probe") or {}
        sp = speeds.get(name)
        speed = (f"{sp['cells_per_second']:.1f} ({sp['load_before'][0]:.1f}-{sp['load_after'][0]:.1f})"
                 if sp else "derived")
        acc = f"{fs.get('accuracy', float('nan')):.3f} ± {fs.get('ci95', float('nan')):.3f}"
        rows.append(f"| {name} | {r.get('dim')} | {acc} | {lp.get('accuracy', float('nan')):.3f} | "
                    f"{lp.get('balanced_accuracy', float('nan')):.3f} | {lp.get('macro_f1', float('nan')):.3f} | "
                    f"{r.get('precision_at_10', float('nan')):.3f} | {r.get('slide_of_origin', float('nan')):.3f} | "
                    f"{speed} |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", default="runs/chula80-store", help="store holding the baseline table (copied)")
    ap.add_argument("--manifest", default="runs/chula80.csv")
    ap.add_argument("--work", default="/tmp/embedding-options", help="the copy and the logs go here")
    ap.add_argument("--only", type=lambda s: s.split(","), default=None, help=f"ingests among {list(INGESTS)}")
    ap.add_argument("--skip-evaluate", action="store_true")
    ap.add_argument("--mil-store", default=None, help="a chula-rbc-diseases store with an efficientnet_lite0 table")
    ap.add_argument("--mil-models", nargs="+", default=["mean", "abmil"])
    ap.add_argument("--mil-epochs", type=int, default=100)
    ap.add_argument("--mil-only", action="store_true", help="only the --mil-store check")
    args = ap.parse_args()
    work = Path(args.work)
    store, logs = work / "store", work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    if args.mil_only:
        print(json.dumps({"mil": mil_risk(args, logs)}, default=str))
        return
    if not store.exists():
        shutil.copytree(REPO / args.source, store)
    speeds = ingest_all(args, store, logs)
    derive_all(args, store)
    summary: dict = {"speeds": speeds}
    if not args.skip_evaluate:
        out = run(["nice", "-n", "10", *CLI, "evaluate", "--store", store, "--label", "label", "--group", "slide_id",
                   "--json", "-q"], logs / "evaluate.log")
        report = json.loads(out.strip().splitlines()[-1])
        (logs / "evaluate.json").write_text(json.dumps(report))
        print("\n".join(table_rows(report, speeds)))
        summary["evaluate"] = {k: {m: v.get(m) for m in ("linear_probe", "precision_at_10", "slide_of_origin")}
                               for k, v in report["tables"].items()}
    if args.mil_store:
        summary["mil"] = mil_risk(args, logs)
    print(json.dumps(summary, default=str))


if __name__ == "__main__":
    main()
