"""Grouped, stratified k-fold cross-validation of a MIL head, then the final model.

Folds come from scikit-learn's StratifiedGroupKFold over slides grouped by
patient (or by slide when no patient is given): no group is ever split between
a fold's training and test slides. Each training fold is split again, grouped and
stratified, into a part that trains and a validation part for early stopping.
The final model is trained on every labelled slide (split != test) for the median
of the folds' best epochs, with no validation part.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from cytostore.errors import InputError
from cytostore.mil.bags import BagSet, store_slide_labels, store_slides
from cytostore.mil.labels import (FROM_STORE, TEST_SPLIT, SlideLabels, check_against_store,
                                  check_cross_validatable, labels_from_store, read_labels_file)
from cytostore.mil.train import TrainConfig, fit, predict_proba, slide_metrics, torch_threads
from cytostore.store import CellStore

METRIC_NAMES = ("accuracy", "balanced_accuracy", "auc")


def make_folds(labels: SlideLabels, k: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, test) positions of ``k`` grouped, stratified folds."""
    import warnings

    from sklearn.model_selection import StratifiedGroupKFold

    y = np.array([labels.classes.index(lab) for lab in labels.labels])
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    with warnings.catch_warnings():  # "least populated class has fewer members than n_splits" is expected
        warnings.simplefilter("ignore", UserWarning)
        return [(tr, te) for tr, te in splitter.split(np.zeros(len(y)), y, groups=np.array(labels.patients))]


def inner_split(labels: SlideLabels, positions: np.ndarray, val_fraction: float,
                seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Splits training positions into (train, validation), grouped and stratified."""
    if val_fraction <= 0:
        return positions, np.zeros(0, dtype=np.int64)
    sub = labels.subset(list(positions))
    n_groups = len(set(sub.patients))
    k = min(max(2, int(round(1 / val_fraction))), n_groups, max(sub.counts().values()))
    if k < 2:
        return positions, np.zeros(0, dtype=np.int64)
    tr, va = make_folds(sub, k, seed)[0]
    return positions[tr], positions[va]


def load_labels(labels: str | Path, store: CellStore, table: str) -> SlideLabels:
    """Labels from a file, or from the table's slide_label column when ``labels == "slide_label"``."""
    if str(labels) == FROM_STORE and not Path(str(labels)).is_file():
        return labels_from_store(store_slide_labels(store, table), f"table {table!r} of {store.root}")
    return read_labels_file(labels)


@dataclass
class TrainReport:
    """What ``train_mil`` did and measured."""

    out: str  # model directory
    table: str  # feature table
    model: str  # model kind
    classes: list[str]  # class names
    counts: dict[str, int]  # labelled slides per class (cross-validated part)
    folds: list[dict[str, Any]]  # per-fold figures
    summary: dict[str, float]  # mean and std over folds of each metric
    majority_rate: float  # accuracy of always answering the most frequent class
    final_epochs: int  # epochs of the final model
    cached: bool  # whether bags were cached in RAM (else streamed)
    seconds: float  # wall time
    test: dict[str, Any] | None = None  # figures of the final model on split == test slides
    oof: list[dict[str, Any]] = field(default_factory=list)  # out-of-fold prediction per slide

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the summary metrics at top level, then the rest."""
        d = asdict(self)
        summary = d.pop("summary")
        return _finite({**summary, **d})


def _finite(obj: Any) -> Any:
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def cross_validate(bags: BagSet, labels: SlideLabels, y: np.ndarray, classes: Sequence[str], cfg: TrainConfig,
                   folds: int, progress: Callable[[str], None] | None = None) -> tuple[list[dict[str, Any]], np.ndarray]:
    """Runs the folds; returns per-fold records and out-of-fold probabilities.

    ``bags``, ``labels`` and ``y`` are aligned (position i = one slide).
    """
    device = _device(cfg)
    n_classes = len(classes)
    oof = np.full((len(y), n_classes), np.nan)
    records = []
    for f, (tr, te) in enumerate(make_folds(labels, folds, cfg.seed)):
        inner_tr, val = inner_split(labels, tr, cfg.val_fraction, cfg.seed + f)
        res = fit(bags, y, inner_tr, val, n_classes, cfg, seed=cfg.seed + f)
        proba, _ = predict_proba(res.model, bags, te, device)
        oof[te] = proba
        m = slide_metrics(y[te], proba, n_classes)
        records.append({"fold": f, "n_train": int(len(inner_tr)), "n_val": int(len(val)), "n_test": int(len(te)),
                        "best_epoch": res.best_epoch, "epochs_run": res.epochs_run, **m})
        if progress:
            progress(f"fold {f + 1}/{folds}: balanced accuracy {m['balanced_accuracy']:.3f}, AUC {m['auc']:.3f}, "
                     f"accuracy {m['accuracy']:.3f} (best epoch {res.best_epoch})")
    return records, oof


def summarise(records: list[dict[str, Any]]) -> dict[str, float]:
    """Mean and (population) std over folds of each metric."""
    out: dict[str, float] = {}
    for name in METRIC_NAMES:
        vals = np.array([r[name] for r in records], dtype=float)
        vals = vals[np.isfinite(vals)]
        out[name] = float(vals.mean()) if len(vals) else float("nan")
        out[f"{name}_std"] = float(vals.std()) if len(vals) else float("nan")
    return out


def _device(cfg: TrainConfig):
    import torch

    from cytostore.embed import resolve_device

    return torch.device(resolve_device(cfg.device))


def train_mil(store_path: str | Path, labels: str | Path, out: str | Path, cfg: TrainConfig = TrainConfig(),
              folds: int = 5, encoder: str | None = None,
              progress: Callable[[str], None] | None = None) -> TrainReport:
    """Cross-validates a MIL head on labelled slides, then trains and saves the final model.

    Args:
        store_path: the cell store.
        labels: CSV/Parquet file (slide_id, label[, patient_id][, split]) or ``"slide_label"``.
        out: model directory to write.
        cfg: hyper-parameters.
        folds: number of cross-validation folds.
        encoder: feature table (encoder name); default the store's only or default table.
        progress: called with one line per fold.

    Raises:
        InputError: labels name slides absent from the store, a class has a single
            slide, too few slides for the folds, or a labelled slide has no cell.
    """
    with torch_threads(cfg.threads):
        return _train_mil(store_path, labels, out, cfg, folds, encoder, progress)


def _train_mil(store_path: str | Path, labels: str | Path, out: str | Path, cfg: TrainConfig, folds: int,
               encoder: str | None, progress: Callable[[str], None] | None) -> TrainReport:
    from cytostore.mil.artifacts import feature_provenance, save_model

    t0 = time.perf_counter()
    store = CellStore.open(store_path)
    table = store.resolve(encoder)
    all_labels = load_labels(labels, store, table)
    check_against_store(all_labels, set(store_slides(store, table)), f"table {table!r} of {store.root}")
    cv_pos = [i for i, s in enumerate(all_labels.splits) if s != TEST_SPLIT]
    test_pos = [i for i, s in enumerate(all_labels.splits) if s == TEST_SPLIT]
    lab = all_labels.subset(cv_pos)
    check_cross_validatable(lab, folds)
    classes = lab.classes
    test_lab = all_labels.subset(test_pos)
    shared = sorted(set(test_lab.patients) & set(lab.patients))
    if shared:
        raise InputError(f"labels {all_labels.source}: patient(s) {shared[:10]} have slides both in the test split "
                         "and outside it; put all of a patient's slides on one side")
    unknown = sorted(set(test_lab.labels) - set(classes))
    if unknown:
        raise InputError(f"labels {all_labels.source}: class(es) {unknown} appear only in the test split; "
                         "training needs slides of every class")
    bags = BagSet(store, table, lab.slide_ids + test_lab.slide_ids, cache_bytes=cfg.cache_bytes)
    empty = bags.empty()
    if empty:
        raise InputError(f"{len(empty)} labelled slide(s) have no cell in table {table!r}: "
                         f"{', '.join(map(repr, empty[:10]))}; drop them from the labels")
    y = np.array([classes.index(v) for v in lab.labels + test_lab.labels], dtype=np.int64)
    n = len(lab.slide_ids)
    records, oof = cross_validate(bags, lab, y, classes, cfg, folds, progress)
    final_epochs = max(1, int(round(float(np.median([r["best_epoch"] for r in records])))))
    final = fit(bags, y, np.arange(n), np.zeros(0, dtype=np.int64), len(classes), cfg, epochs=final_epochs)
    test = None
    if test_pos:
        proba, _ = predict_proba(final.model, bags, np.arange(n, len(y)), _device(cfg))
        test = slide_metrics(y[n:], proba, len(classes))
    counts = lab.counts()
    summary = summarise(records)
    oof_rows = [{"slide_id": s, "label": lab.labels[i], "predicted": classes[int(np.argmax(oof[i]))],
                 "probabilities": {c: float(p) for c, p in zip(classes, oof[i])}} for i, s in enumerate(lab.slide_ids)]
    report = TrainReport(out=str(out), table=table, model=cfg.model, classes=classes, counts=counts, folds=records,
                         summary=summary, majority_rate=max(counts.values()) / n, final_epochs=final_epochs,
                         cached=bags.cached, seconds=0.0, test=test, oof=oof_rows)
    extra = {"final_epochs": final_epochs, "folds": folds,
             "labels": {"source": str(all_labels.source), "slides": n, "counts": counts,
                        "grouped_by": "patient_id" if lab.has_patients else "slide_id"}}
    model_cfg = {k: getattr(final.model.cfg, k) for k in final.model.cfg.__dataclass_fields__}
    report.seconds = time.perf_counter() - t0
    save_model(out, final.model, model_cfg, classes, cfg.to_dict(), feature_provenance(store, table), extra,
               report.to_dict())
    return report
