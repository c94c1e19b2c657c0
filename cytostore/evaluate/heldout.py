"""Held-out cells of supervised encoders, and the evaluations stored per table.

A table made by an encoder trained with labels (``cytostore encoders train --labels``)
carries, in its provenance, the groups (slides) the encoder was trained on. ``evaluate``
then scores every compared table only on cells of other groups, and drops every group
merged with a training group (identical content), so a label the encoder saw can never
be scored: leakage is impossible by construction, whatever folds or episodes follow.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

from cytostore.errors import StoreError


def trained_with_labels(provenance: dict[str, Any]) -> dict[str, Any] | None:
    """The training record of a table's encoder when it was trained with labels, else None."""
    training = ((provenance.get("encoder") or {}).get("trained") or {}).get("training") or {}
    return training if training.get("labels") else None


def restrict_to_held_out(store, tables: list[str], cells: dict[str, np.ndarray], merged: np.ndarray,
                         group: str, read_column: Callable[[str, str], np.ndarray]) -> tuple[np.ndarray, dict]:
    """Mask of the cells no compared table's encoder was trained on, and what was excluded.

    Args:
        store: the CellStore.
        tables: the compared tables.
        cells: ``uid``, ``label``, ``group`` of the compared cells.
        merged: each cell's group after merging duplicates.
        group: the evaluation's group column (``cells["group"]`` holds it).
        read_column: ``(table, column) -> values`` of the compared cells, for a training
            group column other than ``group``.
    """
    keep = np.ones(len(merged), dtype=bool)
    record: dict[str, Any] = {"tables": {}, "cells_excluded": 0}
    for t in tables:
        training = trained_with_labels(store.provenance(t))
        if training is None:
            continue
        col = training.get("group") or "slide_id"
        seen = set(map(str, training.get("groups") or []))
        values = cells["group"] if col == group else np.asarray([str(v) for v in read_column(t, col)], dtype=object)
        on_train = np.isin(values, list(seen))
        touched = set(merged[on_train].tolist())  # groups merged with a training group go too
        drop = np.isin(merged, list(touched)) if touched else on_train
        keep &= ~drop
        record["tables"][t] = {"encoder": (store.provenance(t).get("encoder") or {}).get("name"),
                               "group": col, "training_groups": len(seen), "cells_on_training_groups": int(drop.sum()),
                               "cells_digest": training.get("cells_digest")}
    record["cells_excluded"] = int((~keep).sum())
    if record["tables"] and not keep.any():
        raise StoreError(f"every labelled cell lies on a slide the encoder(s) of {sorted(record['tables'])} were "
                         "trained on; evaluate them on a store of other slides, or train with a larger --holdout")
    return keep, record


def save(store, report: dict[str, Any]) -> list[str]:
    """Writes each table's figures to the store (``evaluations/{table}.json``); returns the paths."""
    from cytostore.store import layout

    when = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    shared = {k: report.get(k) for k in ("label", "group", "n_cells", "n_groups", "classes", "config", "held_out")}
    out = []
    for table, figures in report["tables"].items():
        path = Path(layout.uri(str(store.root), "evaluation", table))
        path.parent.mkdir(parents=True, exist_ok=True)
        doc = {"table": table, "evaluated_at": when, "compared_with": sorted(report["tables"]), **shared,
               "figures": figures}
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(doc, fh, default=str)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        out.append(str(path))
    return out


def latest(store, table: str) -> dict[str, Any] | None:
    """The stored evaluation of ``table`` (None when it was never evaluated)."""
    from cytostore.store import layout

    path = Path(layout.uri(str(store.root), "evaluation", table))
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
