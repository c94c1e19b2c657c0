"""Slide-level MIL on a store: ABMIL against mean pooling and the majority class.

Runs ``train_mil`` (grouped, stratified k-fold cross-validation, then the final
model) for each model kind and seed, and prints balanced accuracy, macro
one-vs-rest AUC and accuracy as mean ± std over folds, beside the majority-class
rate. Beside them, a baseline that never looks at a cell: a logistic regression
on each field image's mean and std of R, G, B (6 numbers), on the same folds; it
shows how much of the task the acquisition (staining, exposure) gives away.
``--labels majority-cell-label`` derives a slide label from the cells' own
labels (the most frequent one; classes with at least --min-slides slides), a
proxy task for stores of annotated cells such as chula-rbc12. The last line is
a JSON summary.

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

from cytostore.mil import TrainConfig, make_folds, train_mil  # noqa: E402
from cytostore.mil.cv import load_labels  # noqa: E402
from cytostore.mil.labels import TEST_SPLIT  # noqa: E402
from cytostore.mil.train import slide_metrics  # noqa: E402
from cytostore.store import CellStore  # noqa: E402

METRICS = ("balanced_accuracy", "auc", "accuracy")


def majority_cell_labels(store_path: str, encoder: str | None, min_slides: int, out: Path) -> Path:
    """Writes slide_id,label with each slide's most frequent cell label (classes with >= min_slides slides)."""
    from collections import Counter

    store = CellStore.open(store_path)
    t = store.cells(columns=["slide_id", "label"], encoder=encoder)
    per: dict[str, Counter] = {}
    for sid, lab in zip(t.column("slide_id").to_pylist(), t.column("label").to_pylist()):
        if lab is not None:
            per.setdefault(sid, Counter())[lab] += 1
    label = {s: c.most_common(1)[0][0] for s, c in per.items() if sum(c.values()) >= 5}
    keep = {k for k, n in Counter(label.values()).items() if n >= min_slides}
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as fh:
        fh.write("slide_id,label\n")
        for s, lab in sorted(label.items()):
            if lab in keep:
                fh.write(f"{s},{lab}\n")
    return out


def image_stats_baseline(store_path: str, labels_arg: str, encoder: str | None, folds: int,
                         seeds: list[int]) -> dict | None:
    """Grouped-CV logistic regression on per-field RGB mean/std; None when images are unreadable."""
    from PIL import Image
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    store = CellStore.open(store_path)
    table = store.resolve(encoder)
    labels = load_labels(labels_arg, store, table)
    labels = labels.subset([i for i, s in enumerate(labels.splits) if s != TEST_SPLIT])
    t = store.cells(columns=["slide_id", "image"], encoder=table)
    image = dict(zip(t.column("slide_id").to_pylist(), t.column("image").to_pylist()))
    feats = []
    for sid in labels.slide_ids:
        try:
            with Image.open(image[sid]) as im:
                a = np.asarray(im.convert("RGB").resize((160, 120))).reshape(-1, 3).astype(float)
        except (OSError, KeyError):
            return None
        feats.append(np.concatenate([a.mean(0), a.std(0)]))
    x = np.array(feats)
    classes = labels.classes
    y = np.array([classes.index(v) for v in labels.labels])
    records = []
    for seed in seeds:
        for tr, te in make_folds(labels, folds, seed):
            clf = make_pipeline(StandardScaler(), LogisticRegression(class_weight="balanced", max_iter=5000))
            clf.fit(x[tr], y[tr])
            proba = np.zeros((len(te), len(classes)))
            proba[:, clf.classes_] = clf.predict_proba(x[te])
            records.append(slide_metrics(y[te], proba, len(classes)))
    return {**{m: float(np.mean([r[m] for r in records])) for m in METRICS},
            **{f"{m}_std": float(np.std([r[m] for r in records])) for m in METRICS}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", default="runs/diseases-store")
    ap.add_argument("--labels", default="slide_label",
                    help="labels file, slide_label (the store column) or majority-cell-label (proxy task)")
    ap.add_argument("--min-slides", type=int, default=30, help="majority-cell-label: smallest class kept")
    ap.add_argument("--encoder", default=None, help="feature table; default the store's only/default one")
    ap.add_argument("--models", nargs="+", default=["abmil", "mean"])
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="one CV run per seed (folds change too)")
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--max-cells", type=int, default=512)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default="runs/mil-eval", help="model directories are written under this folder")
    args = ap.parse_args()
    if args.labels == "majority-cell-label":
        args.labels = str(majority_cell_labels(args.store, args.encoder, args.min_slides,
                                               Path(args.out) / "majority-cell-labels.csv"))

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
    base = image_stats_baseline(args.store, args.labels, args.encoder, args.folds, args.seeds)
    if base:
        print(f"  no cells, field RGB mean/std + logistic regression: balanced accuracy "
              f"{base['balanced_accuracy']:.3f} ± {base['balanced_accuracy_std']:.3f}   macro AUC {base['auc']:.3f} ± "
              f"{base['auc_std']:.3f}   accuracy {base['accuracy']:.3f} ± {base['accuracy_std']:.3f}")
    print(json.dumps({"store": args.store, "labels": args.labels, "folds": args.folds, "seeds": args.seeds,
                      "majority_rate": majority, "chance_balanced_accuracy": 1 / n_classes,
                      "image_stats_baseline": base, "models": results}))


if __name__ == "__main__":
    main()
