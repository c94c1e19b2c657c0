"""``cytostore encoders list``: every encoder (bundled, trained), the tables each made in a
store, and the latest stored evaluation of each table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

ALSO = "any timm architecture, hf-hub:org/model, local-dir:/path, with --weights FILE"


def _evaluation(store, table: str) -> dict[str, Any] | None:
    from cytostore.evaluate.heldout import latest

    doc = latest(store, table)
    if doc is None:
        return None
    f = doc.get("figures", {})
    c = doc.get("config") or {}
    key = f"fewshot_{c.get('ways', 5)}way{c.get('shots', 5)}shot"
    probe = f.get("linear_probe") or {}
    return {"evaluated_at": doc.get("evaluated_at"), "table_version": f.get("table_version"),
            "compared_with": doc.get("compared_with"), "label": doc.get("label"), "group": doc.get("group"),
            "n_cells": f.get("n_cells"), "n_groups": f.get("n_groups"),
            key: {"accuracy": (f.get(key) or {}).get("accuracy"), "ci95": (f.get(key) or {}).get("ci95")},
            "linear_probe": {m: probe.get(m) for m in ("accuracy", "balanced_accuracy", "macro_f1")},
            "precision_at_10": f.get("precision_at_10"), "slide_of_origin": f.get("slide_of_origin"),
            "held_out_only": bool((doc.get("held_out") or {}).get("tables"))}


def _tables_by_encoder(store) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for t in store.tables():
        prov = store.provenance(t)
        enc = prov.get("encoder") or {}
        ds = store.dataset(t)
        row = {"table": t, "cells": ds.count_rows(), "version": int(ds.version),
               "weights_sha256": enc.get("weights_sha256"), "evaluation": _evaluation(store, t)}
        out.setdefault(str(enc.get("name")), []).append(row)
    return out


def overview(store_path: str | Path | None = None) -> dict[str, Any]:
    """Bundled and trained encoders, with the tables each made in ``store_path`` (when given).

    A table belongs to an encoder by name and weights sha256; a table whose encoder is
    neither bundled nor trained here (a timm or hub name) is listed with kind ``other``.
    """
    from cytostore.encoders.registry import list_encoders
    from cytostore.encoders.user import list_trained
    from cytostore.store import CellStore, layout

    store = CellStore.open(store_path) if store_path is not None else None
    copies: list[Path] = []
    if store is not None:
        copies = [Path(layout.uri(str(store.root), "encoder", n)) for n in layout.names(str(store.root), "encoder")]
    rows = [{"name": s.name, "kind": "bundled", "arch": s.arch, "dim": s.dim, "input_size": s.input_size,
             "weights_present": s.weights_present(), "description": s.description} for s in list_encoders()]
    for t in list_trained(copies):
        desc = f"{t['recipe']} from {(t['base'] or {}).get('name')} on {t['training'].get('table')} " \
               f"v{t['training'].get('table_version')} ({t['training'].get('n_cells')} cells" + \
               (f", labels {t['labels']!r}" if t["labels"] else "") + ")"
        rows.append({"name": t["name"], "kind": "trained", "arch": t["arch"], "dim": t["dim"],
                     "input_size": t["input_size"], "weights_present": True, "description": desc,
                     "weights_sha256": t["weights_sha256"], "recipe": t["recipe"], "base": t["base"],
                     "training": t["training"], "folders": t["folders"]})
    if store is not None:
        by_name = _tables_by_encoder(store)
        for r in rows:
            made = by_name.pop(r["name"], [])
            sha = r.get("weights_sha256")
            r["tables"] = [m for m in made if sha is None or m["weights_sha256"] == sha]
        for name, made in sorted(by_name.items()):
            rows.append({"name": name, "kind": "other", "arch": None, "dim": None, "input_size": None,
                         "weights_present": None, "description": "named when its table was ingested",
                         "tables": made})
    return {"encoders": rows, "store": None if store is None else str(store.root), "also": ALSO}
