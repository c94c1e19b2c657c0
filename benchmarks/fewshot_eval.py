"""Few-shot figures on a labelled store (Chula RBC-12): episodes, ablation, full-data linear probe.

    nice -n 10 .venv/bin/python benchmarks/fewshot_eval.py --store runs/chula12-store \
        --ingest-log runs/chula12-ingest.log

Prints plain lines per figure and one JSON object as the last line.

1. N-way K-shot episodes (5-way and all-way; 1, 5, 10, 20 shots): nearest prototype (the
   library default) against k-NN and logistic regression on the SAME episodes (`evaluate`,
   exactly what `cytostore fewshot eval` runs).
2. Ablation of the prototype recipe on shared episodes: plain class means (euclidean) ->
   + L2 (cosine) -> + centring by the store mean -> + power normalisation -> + shrinkage
   whitening by the store covariance (the default), a grid of shrinkages, and the default
   with 3 prototypes per class or transductive soft k-means; on balanced episodes and on
   all-way episodes whose queries are every remaining labelled cell (the real imbalance).
3. Full-data reference: a linear probe (standardised features, multinomial logistic
   regression) on the cached embeddings, split by field (slide_id groups, GroupShuffleSplit
   80/20), accuracy and macro F1, fit seconds, next to a fully fine-tuned EfficientNet-B1
   (Naruenatthanaset et al. 2021, arXiv:2012.01321: accuracy 0.921, F1 0.868).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from cytostore.fewshot import EpisodeSpec, PrototypeConfig, evaluate, sample_episodes
from cytostore.fewshot import episodes as ep

PUBLISHED = {"model": "EfficientNet-B1, fully fine-tuned", "accuracy": 0.921, "macro_f1": 0.868,
             "source": "Naruenatthanaset et al. 2021, arXiv:2012.01321"}

_BASE = PrototypeConfig(power=None, centre=False, whiten=None, l2=True)
ABLATION = [
    ("plain means (euclidean)", replace(_BASE, l2=False)),
    ("+ L2 (cosine)", _BASE),
    ("+ centre (store mean)", replace(_BASE, centre=True)),
    ("+ power 0.5", replace(_BASE, centre=True, power=0.5)),
    ("+ whitening 0.3 (default)", PrototypeConfig()),
    ("power 0.5, L2, no centring", replace(_BASE, power=0.5)),
    ("whitening shrinkage 1.0", PrototypeConfig(whiten=1.0)),
    ("whitening shrinkage 0.1", PrototypeConfig(whiten=0.1)),
    ("whitening shrinkage 0.03", PrototypeConfig(whiten=0.03)),
    ("default + 3 prototypes/class", PrototypeConfig(per_class=3)),
    ("default + transductive 5 steps", PrototypeConfig(transductive_steps=5)),
]


def episodes_table(store: str, shots_list: list[int], ways_list: list[int], queries: int, episodes: int,
                   seed: int, encoder: str | None) -> list[dict]:
    rows = []
    for ways in ways_list:
        for shots in shots_list:
            r = evaluate(store, EpisodeSpec(ways, shots, queries, episodes, seed), encoder=encoder)
            rows.append(r)
            b = r["baselines"]
            print(f"{r['ways']:>2}-way {shots:>2}-shot  prototypes {r['accuracy']:.4f} ± {r['ci95']:.4f}   "
                  f"knn(k={b['knn']['params']['k']}) {b['knn']['accuracy']:.4f} ± {b['knn']['ci95']:.4f}   "
                  f"logreg {b['logistic_regression']['accuracy']:.4f} ± {b['logistic_regression']['ci95']:.4f}"
                  f"   ({r['seconds']:.0f} s)", flush=True)
    return rows


def ablation(store: str, settings: list[tuple[int, int, int]], episodes: int, seed: int,
             encoder: str | None) -> list[dict]:
    """Every recipe on the same episodes of each setting (ways, shots, queries; queries 0 = all)."""
    cache: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
    out = []
    for name, cfg in ABLATION:
        key = (cfg.power, cfg.centre, cfg.whiten, cfg.whiten_rank, cfg.l2)
        if key not in cache:
            feats, labels, _ = ep.labelled_features(store, "label", encoder, cfg)
            cache[key] = (feats, labels)
        feats, labels = cache[key]
        row = {"recipe": name, "config": cfg.to_dict()}
        for ways, shots, queries in settings:
            eps, _, _ = sample_episodes(labels, EpisodeSpec(ways, shots, queries, episodes, seed))
            res = ep.run_episodes(feats, labels, eps, shots, {"p": ep._prototype_method(cfg)})["p"]
            tag = f"{len(eps[0].classes)}w{shots}s{'q' + str(queries) if queries else 'qall'}"
            row[tag] = {k: res[k] for k in ("accuracy", "ci95", "balanced_accuracy", "balanced_accuracy_ci95")}
        out.append(row)
        print(f"{name:<32} " + "  ".join(
            f"{k} acc {v['accuracy']:.4f}±{v['ci95']:.4f} bal {v['balanced_accuracy']:.4f}"
            for k, v in row.items() if isinstance(v, dict) and "accuracy" in v), flush=True)
    return out


def linear_probe(store: str, encoder: str | None, seed: int) -> dict:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score
    from sklearn.model_selection import GroupShuffleSplit
    from sklearn.preprocessing import StandardScaler

    from cytostore import CellStore

    s = CellStore.open(store)
    emb, keys = s.embeddings(encoder, where="label IS NOT NULL", columns=("slide_id", "label"))
    x = np.asarray(emb, dtype=np.float32)
    y = np.array(keys.column("label").to_pylist(), dtype=object)
    groups = np.array(keys.column("slide_id").to_pylist(), dtype=object)
    tr, te = next(GroupShuffleSplit(n_splits=1, test_size=0.2, random_state=seed).split(x, y, groups))
    out = {"cells": int(len(y)), "train_cells": int(len(tr)), "test_cells": int(len(te)),
           "train_fields": int(len(set(groups[tr]))), "test_fields": int(len(set(groups[te]))),
           "split": "GroupShuffleSplit by slide_id (field), test_size 0.2, random_state " + str(seed)}
    from threadpoolctl import threadpool_limits

    for weighting in (None, "balanced"):
        limit = threadpool_limits(limits=1)  # 2 shared cores: BLAS threads only contend
        t0 = time.perf_counter()
        scaler = StandardScaler().fit(x[tr])
        clf = LogisticRegression(C=1.0, max_iter=3000, class_weight=weighting).fit(scaler.transform(x[tr]), y[tr])
        fit_s = time.perf_counter() - t0
        limit.restore_original_limits()
        pred = clf.predict(scaler.transform(x[te]))
        key = "probe" if weighting is None else "probe_balanced"
        out[key] = {"accuracy": round(float(accuracy_score(y[te], pred)), 4),
                    "macro_f1": round(float(f1_score(y[te], pred, average="macro")), 4),
                    "balanced_accuracy": round(float(np.mean([(pred[y[te] == c] == c).mean()
                                                               for c in np.unique(y[te])])), 4),
                    "fit_seconds": round(fit_s, 1), "class_weight": weighting, "iterations": int(np.max(clf.n_iter_))}
        print(f"linear probe ({'class_weight=balanced' if weighting else 'unweighted'}): accuracy "
              f"{out[key]['accuracy']:.4f}, macro F1 {out[key]['macro_f1']:.4f}, balanced accuracy "
              f"{out[key]['balanced_accuracy']:.4f}, fit {fit_s:.1f} s on {len(tr)} cells", flush=True)
    # The same probe on a random cell-level split (cells of one field on both sides), closer to
    # how cell classifiers are often scored; shows how much of the gap the field split explains.
    from sklearn.model_selection import train_test_split

    tr, te = train_test_split(np.arange(len(y)), test_size=0.2, random_state=seed, stratify=y)
    with threadpool_limits(limits=1):
        t0 = time.perf_counter()
        scaler = StandardScaler().fit(x[tr])
        clf = LogisticRegression(C=1.0, max_iter=3000).fit(scaler.transform(x[tr]), y[tr])
        fit_s = time.perf_counter() - t0
    pred = clf.predict(scaler.transform(x[te]))
    out["probe_random_split"] = {"accuracy": round(float(accuracy_score(y[te], pred)), 4),
                                 "macro_f1": round(float(f1_score(y[te], pred, average="macro")), 4),
                                 "fit_seconds": round(fit_s, 1),
                                 "split": f"train_test_split stratified by label, test_size 0.2, random_state {seed}"}
    print(f"linear probe, random cell split (not by field): accuracy {out['probe_random_split']['accuracy']:.4f}, "
          f"macro F1 {out['probe_random_split']['macro_f1']:.4f}", flush=True)
    print(f"published: {PUBLISHED['model']}: accuracy {PUBLISHED['accuracy']}, F1 {PUBLISHED['macro_f1']} "
          f"({PUBLISHED['source']}; their own split, not by field)")
    return out


def store_demo(store: str, name: str, shots_list: list[int], seed: int) -> list[dict]:
    """`fit` on ``shots`` labelled cells per class, `predict` every cell, score against the labels.

    Writes prototypes.<name>-<shots>shot and predictions.<name>-<shots>shot into the store.
    """
    import csv
    import tempfile

    from cytostore import CellStore
    from cytostore.fewshot import fit, predict, read_predictions

    s = CellStore.open(store)
    cells = s.cells(columns=["uid", "slide_id", "cell_id", "label"], where="label IS NOT NULL")
    labels = np.array(cells.column("label").to_pylist(), dtype=object)
    rng = np.random.default_rng(seed)
    out = []
    for shots in shots_list:
        pick = np.concatenate([rng.choice(np.flatnonzero(labels == c), shots, replace=False)
                               for c in sorted(set(labels))])
        with tempfile.TemporaryDirectory() as tmp:
            sup = Path(tmp) / "support.csv"
            with open(sup, "w", newline="") as fh:
                w = csv.writer(fh)
                w.writerow(["slide_id", "cell_id", "label"])
                for i in pick:
                    w.writerow([cells.column("slide_id")[i].as_py(), cells.column("cell_id")[i].as_py(), labels[i]])
            set_name = f"{name}-{shots}shot"
            t0 = time.perf_counter()
            fit(s, sup, set_name)
            t_fit = time.perf_counter() - t0
            t0 = time.perf_counter()
            predict(s, set_name)
            t_pred = time.perf_counter() - t0
        pred = read_predictions(s, set_name, columns=["uid", "label"])
        by_uid = dict(zip(pred.column("uid").to_pylist(), pred.column("label").to_pylist()))
        held = np.setdiff1d(np.arange(len(labels)), pick)
        uids = cells.column("uid").to_numpy()
        y, p = labels[held], np.array([by_uid[int(u)] for u in uids[held]], dtype=object)
        from sklearn.metrics import f1_score

        row = {"shots": shots, "support": int(len(pick)), "scored_cells": int(len(held)),
               "accuracy": round(float((y == p).mean()), 4),
               "balanced_accuracy": round(float(np.mean([(p[y == c] == c).mean() for c in np.unique(y)])), 4),
               "macro_f1": round(float(f1_score(y, p, average="macro")), 4),
               "fit_seconds": round(t_fit, 1), "predict_seconds": round(t_pred, 1), "name": set_name}
        out.append(row)
        print(f"store demo {shots:>2} cells/class: accuracy {row['accuracy']:.4f}, balanced {row['balanced_accuracy']:.4f}, "
              f"macro F1 {row['macro_f1']:.4f} on {row['scored_cells']} held-out cells; fit {t_fit:.1f} s, "
              f"predict {t_pred:.1f} s", flush=True)
    return out


def ingest_cost(path: str | None) -> dict | None:
    """The embedding cost already paid, from the JSON line `cytostore ingest --json` wrote."""
    if not path or not Path(path).is_file():
        return None
    for line in reversed(Path(path).read_text().splitlines()):
        if line.startswith("{"):
            d = json.loads(line)
            return {k: d.get(k) for k in ("cells_added", "seconds", "cells_per_second")}
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--store", required=True)
    ap.add_argument("--encoder", default=None)
    ap.add_argument("--episodes", type=int, default=200)
    ap.add_argument("--queries", type=int, default=15)
    ap.add_argument("--shots", default="1,5,10,20")
    ap.add_argument("--ablation-episodes", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip", default="", help="comma list of parts to skip: episodes, ablation, probe")
    ap.add_argument("--ingest-log", default=None, help="JSON log of the ingest, for the embedding cost")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    ap.add_argument("--demo-name", default=None,
                    help="also fit/predict NAME-<k>shot prototype sets in the store (writes tables) and score them")
    a = ap.parse_args()
    skip = set(filter(None, a.skip.split(",")))
    shots = [int(v) for v in a.shots.split(",")]
    t0 = time.perf_counter()
    result: dict = {"store": a.store, "seed": a.seed, "episodes": a.episodes, "queries": a.queries,
                    "default_config": PrototypeConfig().to_dict(),
                    "baselines": {"knn": f"cosine k-NN, k = min(shots, {ep.KNN_MAX_K})",
                                  "logistic_regression": f"multinomial, L2, C={ep.LOGREG_C}, on the support set"}}
    if "episodes" not in skip:
        print(f"== episodes: {a.queries} queries/class, {a.episodes} episodes, seed {a.seed}")
        result["episodes_table"] = episodes_table(a.store, shots, [5, 0], a.queries, a.episodes, a.seed, a.encoder)
    if "ablation" not in skip:
        print(f"== ablation: {a.ablation_episodes} episodes per setting (qall = every remaining labelled cell)")
        settings = [(5, 1, a.queries), (5, 5, a.queries), (0, 5, a.queries), (0, 5, 0), (0, 20, 0)]
        result["ablation"] = ablation(a.store, settings, a.ablation_episodes, a.seed, a.encoder)
    if "probe" not in skip:
        print("== full-data linear probe")
        probe = linear_probe(a.store, a.encoder, a.seed)
        probe["published"] = PUBLISHED
        probe["embedding_cost"] = ingest_cost(a.ingest_log)
        result["linear_probe"] = probe
    if a.demo_name:
        print("== store demo: fit on k labelled cells per class, predict every cell")
        result["store_demo"] = store_demo(a.store, a.demo_name, [5, 20], a.seed)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
