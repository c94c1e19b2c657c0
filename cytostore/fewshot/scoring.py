"""Agreement of predictions with labels already stored: accuracy, balanced accuracy,
macro-F1 and the confusion matrix (few-shot cells and MIL slides alike)."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def agreement(truth: Sequence[str], predicted: Sequence[str]) -> dict[str, Any] | None:
    """Scores ``predicted`` against ``truth`` (same order); None when there is nothing to score.

    Classes are the stored labels (``truth``); a prediction outside them (e.g. ``unknown``)
    counts as wrong and gets a column of the confusion matrix.

    Returns:
        ``n``, ``accuracy``, ``balanced_accuracy`` (mean recall over the stored classes),
        ``macro_f1`` (mean F1 over the stored classes), ``per_class`` (class -> n, recall,
        precision, f1) and ``confusion``: ``rows`` (stored labels), ``columns`` (predictions),
        ``matrix`` (counts, rows x columns).
    """
    t = np.asarray([str(v) for v in truth], dtype=object)
    p = np.asarray([str(v) for v in predicted], dtype=object)
    if len(t) != len(p):
        raise ValueError(f"{len(t)} labels against {len(p)} predictions")
    if not len(t):
        return None
    rows = sorted(set(t.tolist()))
    cols = rows + sorted(set(p.tolist()) - set(rows))
    r_of, c_of = {c: i for i, c in enumerate(rows)}, {c: i for i, c in enumerate(cols)}
    m = np.zeros((len(rows), len(cols)), dtype=np.int64)
    np.add.at(m, (np.array([r_of[v] for v in t]), np.array([c_of[v] for v in p])), 1)
    per_class, recalls, f1s = {}, [], []
    for i, c in enumerate(rows):
        hit, n, called = int(m[i, i]), int(m[i].sum()), int(m[:, i].sum())
        recall = hit / n
        precision = hit / called if called else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[c] = {"n": n, "recall": round(recall, 4), "precision": round(precision, 4), "f1": round(f1, 4)}
        recalls.append(recall)
        f1s.append(f1)
    return {
        "n": int(len(t)),
        "accuracy": round(float(np.trace(m[:, :len(rows)]) / len(t)), 4),
        "balanced_accuracy": round(float(np.mean(recalls)), 4),
        "macro_f1": round(float(np.mean(f1s)), 4),
        "per_class": per_class,
        "confusion": {"rows": rows, "columns": cols, "matrix": m.tolist()},
    }


def confusion_lines(score: dict[str, Any], width: int = 8) -> list[str]:
    """The confusion matrix as aligned text lines (rows: stored label, columns: prediction)."""
    conf = score["confusion"]
    w = max([width, *(len(c) + 1 for c in conf["columns"])])
    first = max([len("stored \\ predicted"), *(len(r) for r in conf["rows"])]) + 2
    lines = ["stored \\ predicted".ljust(first) + "".join(c.rjust(w) for c in conf["columns"])]
    for r, counts in zip(conf["rows"], conf["matrix"]):
        lines.append(r.ljust(first) + "".join(str(n).rjust(w) for n in counts))
    return lines
