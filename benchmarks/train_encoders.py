"""Encoders adapted from a store (`cytostore encoders train`), measured with `cytostore evaluate`.

On a COPY of a labelled store (default runs/chula80-store: 78 Chula RBC-12 fields, 5,581
cells; manifest runs/chula80.csv), trains the CPU recipes (self-supervised; supervised with
held-out fields), ingests each trained encoder's table, and evaluates them against the
ImageNet table: once with every table (all scored on the fields the supervised encoder never
saw) and once without the supervised table (every field). Prints train time, ingest cells/s
and the load average beside the figures.

    CYTOSTORE_HOME=/work/scratch/train/home nice -n 10 python benchmarks/train_encoders.py \\
        --work /work/scratch/train/bench --train-args '--input-size 64 --views 3 --epochs 6'

A step whose JSON output is already in --work is not run again (the run can be resumed).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CLI = str(REPO / ".venv" / "bin" / "cytostore")


class LoadSampler:
    """Samples the 1-minute load average every ``every`` seconds while a step runs."""

    def __init__(self, every: float = 10.0):
        self.every, self.samples, self._stop = every, [], threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(os.getloadavg()[0])
            self._stop.wait(self.every)

    def __enter__(self) -> "LoadSampler":
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()

    def summary(self) -> dict:
        s = self.samples or [os.getloadavg()[0]]
        return {"mean": round(sum(s) / len(s), 1), "max": round(max(s), 1)}


def step(work: Path, key: str, cmd: list[str]) -> dict:
    """Runs a CLI command once (its --json last line kept in work/KEY.json), with its wall time and load."""
    out = work / f"{key}.json"
    if out.is_file():
        return json.loads(out.read_text())
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    with LoadSampler() as load, open(work / f"{key}.log", "w") as err:
        done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"{key} failed with exit {done.returncode}; see {work / (key + '.log')}")
    rep = json.loads(done.stdout.strip().splitlines()[-1])
    rep["_bench"] = {"wall_s": round(time.perf_counter() - t0, 1), "load": load.summary(), "cmd": cmd}
    out.write_text(json.dumps(rep))
    return rep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", type=Path, default=REPO / "runs" / "chula80-store", help="labelled store (copied)")
    ap.add_argument("--manifest", type=Path, default=REPO / "runs" / "chula80.csv")
    ap.add_argument("--work", type=Path, required=True, help="scratch folder: the store copy and every output")
    ap.add_argument("--prefix", default="chula80", help="encoder names: PREFIX-ssl, PREFIX-sup")
    ap.add_argument("--train-args", default="", help="extra `encoders train` options, e.g. '--epochs 6'")
    ap.add_argument("--ingest-fields", choices=("all", "held-out"), default="all",
                    help="ingest the trained tables for every field, or only the supervised encoder's held-out ones "
                         "(all the held-out evaluation scores; a third of the work)")
    args = ap.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    store = work / "store"
    if not store.is_dir():
        shutil.copytree(args.store, store)
    base = "efficientnet_lite0"
    names = {"ssl": f"{args.prefix}-ssl", "sup": f"{args.prefix}-sup"}
    extra = args.train_args.split()
    train_cmds = {
        "ssl": [CLI, "encoders", "train", "--store", str(store), "--name", names["ssl"], *extra, "--json"],
        "sup": [CLI, "encoders", "train", "--store", str(store), "--name", names["sup"], "--labels", "label", *extra,
                "--json"],
    }
    # The two recipes (then the two ingests) run side by side: on a shared machine the wall time is what binds.
    with ThreadPoolExecutor(2) as pool:
        trains = dict(zip(names, pool.map(lambda k: step(work, f"train_{k}", train_cmds[k]), names)))
    manifest = args.manifest
    if args.ingest_fields == "held-out":  # only the cells the held-out evaluation scores
        held_out = set(trains["sup"]["held_out_groups"])
        manifest = work / "held_out.csv"
        with open(args.manifest) as fh, open(manifest, "w", newline="") as out:
            rows = csv.DictReader(fh)
            w = csv.DictWriter(out, fieldnames=rows.fieldnames)
            w.writeheader()
            w.writerows(r for r in rows if r["slide_id"] in held_out)
    with ThreadPoolExecutor(2) as pool:
        ingests = dict(zip(names, pool.map(
            lambda k: step(work, f"ingest_{k}", [CLI, "ingest", str(manifest), "--store", str(store),
                                                 "--encoder", names[k], "-q", "--json"]), names)))
    reports = [("held-out fields (the supervised encoder never saw them)",
                step(work, "evaluate_heldout", [CLI, "evaluate", "--store", str(store), "--tables",
                                                f"{base},{names['ssl']},{names['sup']}", "-q", "--json"]))]
    if args.ingest_fields == "all":
        reports.append(("every field", step(work, "evaluate_all", [CLI, "evaluate", "--store", str(store), "--tables",
                                                                   f"{base},{names['ssl']}", "-q", "--no-save",
                                                                   "--json"])))
    print()
    for title, rep in reports:
        print(f"### {title}: {rep['n_cells']} cells, {rep['n_groups']} merged groups")
        print("| table | 5w5s cross-slide | probe acc | probe bal | probe F1 | P@10 | slide of origin (chance) "
              "| train s (load) | ingest cells/s (load) |")
        print("|---|---|---|---|---|---|---|---|---|")
        for t, f in rep["tables"].items():
            fs, lp = f["fewshot_5way5shot"], f["linear_probe"]
            k = next((k for k, n in names.items() if n == t), None)
            tr = f"{trains[k]['seconds']:.0f} ({trains[k]['_bench']['load']['mean']})" if k else "—"
            ing = ingests[k] if k else None
            speed = (f"{ing['cells_added'] / ing['seconds']:.1f} ({ing['_bench']['load']['mean']})"
                     if ing and ing.get("seconds") else "—")
            print(f"| {t} | {fs['accuracy']:.3f} ± {fs['ci95']:.3f} | {lp['accuracy']:.3f} | "
                  f"{lp['balanced_accuracy']:.3f} | {lp['macro_f1']:.3f} | {f['precision_at_10']:.3f} | "
                  f"{f['slide_of_origin']:.3f} ({f['slide_of_origin_chance']:.3f}) | {tr} | {speed} |")
        print()
    for k, r in trains.items():
        print(f"{names[k]}: {r['recipe']}, {r['training']['n_cells']} cells, stats {json.dumps(r['stats'])}")


if __name__ == "__main__":
    main()
