"""Slide-level MIL on a store: ABMIL against mean pooling and the majority class.

Runs ``train_mil`` (grouped, stratified k-fold cross-validation, then the final
model) for each model kind and seed, and prints balanced accuracy, macro
one-vs-rest AUC and accuracy as mean ± std over folds, beside the majority-class
rate. The last line is a JSON summary.

Usage: python benchmarks/mil_eval.py --store runs/diseases-store [--labels slide_label]
           [--models abmil mean] [--folds 5] [--seeds 0] [--out runs/mil-eval]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cytostore.mil import TrainConfig, train_mil  # noqa: E402

METRICS = ("balanced_accuracy", "auc", "accuracy")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", default="runs/diseases-store")
    ap.add_argument("--labels", default="slide_label", help="labels file, or slide_label (the store column)")
    ap.add_argument("--encoder", default=None, help="feature table; default the store's only/default one")
    ap.add_argument("--models", nargs="+", default=["abmil", "mean"])
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="one CV run per seed (folds change too)")
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--max-cells", type=int, default=512)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default="runs/mil-eval", help="model directories are written under this folder")
    args = ap.parse_args()

    results: dict[str, dict] = {}
    majority = None
    for kind in args.models:
        runs = []
        for seed in args.seeds:
            cfg = TrainConfig(model=kind, epochs=args.epochs, max_cells=args.max_cells, device=args.device, seed=seed)
            t0 = time.perf_counter()
            rep = train_mil(args.store, args.labels, Path(args.out) / f"{kind}-seed{seed}", cfg, folds=args.folds,
                            encoder=args.encoder)
            d = rep.to_dict()
            majority = rep.majority_rate
            runs.append(d)
            print(f"{kind:6s} seed {seed}: " + ", ".join(
                f"{m} {d[m]:.3f} ± {d[m + '_std']:.3f}" for m in METRICS)
                + f" | best epochs {[f['best_epoch'] for f in rep.folds]} | {time.perf_counter() - t0:.0f} s",
                flush=True)
        fold_vals = {m: [f[m] for r in runs for f in r["folds"]] for m in METRICS}
        results[kind] = {
            **{m: float(np.mean(v)) for m, v in fold_vals.items()},
            **{f"{m}_std": float(np.std(v)) for m, v in fold_vals.items()},
            "runs": [{k: r[k] for k in (*METRICS, *(f"{m}_std" for m in METRICS), "final_epochs", "seconds")}
                     for r in runs],
            "classes": runs[0]["counts"],
        }
    print()
    print(f"store {args.store}: {sum(results[args.models[0]]['classes'].values())} slides, classes "
          + ", ".join(f"{c} {n}" for c, n in results[args.models[0]]["classes"].items()))
    print(f"{args.folds}-fold CV (grouped, stratified), seeds {args.seeds}; mean ± std over all folds")
    for kind, r in results.items():
        print(f"  {kind:6s} balanced accuracy {r['balanced_accuracy']:.3f} ± {r['balanced_accuracy_std']:.3f}   "
              f"macro AUC {r['auc']:.3f} ± {r['auc_std']:.3f}   accuracy {r['accuracy']:.3f} ± {r['accuracy_std']:.3f}")
    n_classes = len(results[args.models[0]]["classes"])
    print(f"  majority class: accuracy {majority:.3f}, balanced accuracy {1 / n_classes:.3f}, AUC 0.500")
    print(json.dumps({"store": args.store, "folds": args.folds, "seeds": args.seeds, "majority_rate": majority,
                      "chance_balanced_accuracy": 1 / n_classes, "models": results}))


if __name__ == "__main__":
    main()
