"""Using a trained MIL model: per-slide predictions, per-cell attention, montages."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from cytostore.errors import InputError, StoreError
from cytostore.mil.artifacts import MILModel, check_features, load_model
from cytostore.mil.bags import BagSet, slides_filter, sql_quote, store_slides
from cytostore.store import CellStore
from cytostore.store.check import names_missing_files


def _open(store_path: str | Path, model_dir: str | Path, table: str | None) -> tuple[CellStore, str, MILModel]:
    model = load_model(model_dir)
    store = CellStore.open(store_path)
    if table is None:
        trained_on = model.features.get("table")
        table = trained_on if trained_on in store.tables() else store.resolve(None)
    else:
        table = store.resolve(table)
    check_features(model.features, store, table, model.path)
    return store, table, model


@dataclass
class Predictions:
    """Per-slide predictions of a MIL model."""

    classes: list[str]  # class names, column order of ``proba``
    slide_ids: list[str]  # predicted slides
    proba: np.ndarray  # (n, C) class probabilities
    n_cells: list[int]  # cells in each bag
    table: str  # feature table read

    def labels(self) -> list[str]:
        """Predicted class per slide."""
        return [self.classes[int(i)] for i in self.proba.argmax(1)] if len(self.proba) else []

    def rows(self) -> list[dict[str, Any]]:
        """One dict per slide: slide_id, label, n_cells, probabilities."""
        return [{"slide_id": s, "label": lab, "n_cells": n,
                 "probabilities": {c: round(float(p), 6) for c, p in zip(self.classes, row)}}
                for s, lab, n, row in zip(self.slide_ids, self.labels(), self.n_cells, self.proba)]

    def to_arrow(self) -> pa.Table:
        """slide_id, label, n_cells and one ``p_<class>`` column per class."""
        cols = {"slide_id": pa.array(self.slide_ids, pa.string()), "label": pa.array(self.labels(), pa.string()),
                "n_cells": pa.array(self.n_cells, pa.int64())}
        for k, c in enumerate(self.classes):
            cols[f"p_{c}"] = pa.array(self.proba[:, k].astype(np.float32), pa.float32())
        return pa.table(cols)

    def write(self, path: str | Path) -> Path:
        """Writes the table as CSV, or Parquet for a .parquet path."""
        path = Path(path)
        table = self.to_arrow()
        if path.suffix.lower() in {".parquet", ".pq"}:
            import pyarrow.parquet as pq

            pq.write_table(table, path)
        else:
            import pyarrow.csv as pcsv

            pcsv.write_csv(table, path)
        return path


def predict(store_path: str | Path, model_dir: str | Path, where: str | None = None, table: str | None = None,
            device: str = "auto", cache_bytes: int = 0, threads: int = 1) -> Predictions:
    """Predicts every slide with cells matching ``where`` (every cell of the bag is used).

    Args:
        store_path: the cell store.
        model_dir: a directory written by ``train_mil``.
        where: SQL filter on cells; a slide's bag is its matching cells.
        table: feature table; default the one the model was trained on.
        device: auto, cpu or cuda.
        cache_bytes: cache bags in RAM under this many bytes (0 streams slide by slide).
        threads: torch CPU threads (0 = torch's default).

    Raises:
        ProvenanceError: the table's features come from another encoder or preprocessing.
    """
    from cytostore.mil.train import torch_threads

    with torch_threads(threads):
        return _predict(store_path, model_dir, where, table, device, cache_bytes)


@names_missing_files
def _predict(store_path, model_dir, where, table, device, cache_bytes) -> Predictions:
    import torch

    from cytostore.embed import resolve_device
    from cytostore.mil.train import predict_proba

    store, table, model = _open(store_path, model_dir, table)
    slides = store_slides(store, table, where)
    dev = torch.device(resolve_device(device))
    module = model.module.to(dev)
    if not slides:
        return Predictions(model.classes, [], np.zeros((0, len(model.classes))), [], table)
    bags = BagSet(store, table, slides, where=where, cache_bytes=cache_bytes)
    proba = np.concatenate([predict_proba(module, bags, [i], dev)[0] for i in range(len(slides))])
    return Predictions(model.classes, slides, proba, [bags.size(s) for s in slides], table)


@dataclass
class Explanation:
    """Per-cell attention of one slide."""

    slide_id: str  # the slide
    label: str  # predicted class
    probabilities: dict[str, float]  # class probabilities
    cells: pa.Table  # uid, cell_id, x, y, attention: every cell, most attended first
    table: str  # feature table read
    model_kind: str  # abmil, mean... (mean pooling gives every cell 1/n)

    def top(self, k: int) -> list[dict[str, Any]]:
        """The ``k`` most attended cells as dicts."""
        return self.cells.slice(0, k).to_pylist()


def explain(store_path: str | Path, model_dir: str | Path, slide_id: str, table: str | None = None,
            device: str = "auto", threads: int = 1) -> Explanation:
    """Attention of every cell of ``slide_id`` under the model, with the slide's prediction."""
    from cytostore.mil.train import torch_threads

    with torch_threads(threads):
        return _explain(store_path, model_dir, slide_id, table, device)


def _explain(store_path, model_dir, slide_id, table, device) -> Explanation:
    import torch

    from cytostore.embed import resolve_device
    from cytostore.mil.models import pad_bags
    from cytostore.store import embedding_matrix

    store, table, model = _open(store_path, model_dir, table)
    t = store.cells(columns=["uid", "cell_id", "x", "y", "embedding"], where=slides_filter([slide_id]), encoder=table)
    if t.num_rows == 0:
        raise InputError(f"slide {slide_id!r} has no cell in table {table!r} of {store.root}; "
                         f"list the slides with `cytostore slides --store {store.root}`")
    order = np.argsort(t.column("uid").to_numpy(), kind="stable")  # the order training and predict use
    t = t.take(pa.array(order))
    dev = torch.device(resolve_device(device))
    module = model.module.to(dev)
    x, mask = pad_bags([torch.from_numpy(np.array(embedding_matrix(t.column("embedding"))))], dtype=None)
    with torch.inference_mode():
        logits, attn = module(x.to(dev), mask.to(dev))
    proba = torch.softmax(logits.float(), 1)[0].cpu().numpy()
    att = attn[0].float().cpu().numpy()
    cells = t.drop_columns(["embedding"]).append_column("attention", pa.array(att.astype(np.float32)))
    rank = np.argsort(-att, kind="stable")
    return Explanation(slide_id, model.classes[int(proba.argmax())],
                       {c: round(float(p), 6) for c, p in zip(model.classes, proba)},
                       cells.take(pa.array(rank)), table, model.config["model"]["kind"])


def montage(store_path: str | Path, explanation: Explanation, out: str | Path, top: int = 16,
            columns: int = 8, tile: int = 96) -> Path:
    """A PNG contact sheet of the most attended cells' stored thumbnails; under each its rank,
    attention, cell id and stored label (wrapped to the tile, never cut)."""
    from PIL import Image, ImageDraw

    from cytostore.imaging import decode_thumbnail
    from cytostore.maps.captions import caption_font, line_height, wrap_all

    store = CellStore.open(store_path)
    best = explanation.cells.slice(0, top)
    uids = best.column("uid").to_pylist()
    if not uids:
        raise InputError(f"slide {explanation.slide_id!r} has no cell to show")
    where = f"slide_id = {sql_quote(explanation.slide_id)} AND uid IN ({', '.join(str(int(u)) for u in uids)})"
    has_label = "label" in store.dataset(explanation.table).schema.names
    thumbs = store.cells(columns=["uid", "thumbnail", *(["label"] if has_label else [])], where=where,
                         encoder=explanation.table)
    by_uid = dict(zip(thumbs.column("uid").to_pylist(), thumbs.column("thumbnail").to_pylist()))
    label_of = dict(zip(thumbs.column("uid").to_pylist(), thumbs.column("label").to_pylist())) if has_label else {}
    font = caption_font(10)
    lh = line_height(font)
    captions = []
    for k, (cell, a) in enumerate(zip(best.column("cell_id").to_pylist(), best.column("attention").to_pylist())):
        lab = label_of.get(uids[k])
        captions.append(wrap_all(font, (f"#{k + 1} a={a:.3f}", str(cell), "no label" if lab is None else str(lab)),
                                 tile - 4))
    label_h = max(len(c) for c in captions) * lh + 4
    cols = min(columns, len(uids))
    rows = (len(uids) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * tile, rows * (tile + label_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for k, (uid, lines) in enumerate(zip(uids, captions)):
        if uid not in by_uid:
            raise StoreError(f"cell uid {uid} of slide {explanation.slide_id!r} has no thumbnail")
        img = Image.fromarray(decode_thumbnail(by_uid[uid])).resize((tile, tile), Image.BILINEAR)
        x, y = (k % cols) * tile, (k // cols) * (tile + label_h)
        sheet.paste(img, (x, y))
        for j, line in enumerate(lines):
            draw.text((x + 3, y + tile + 2 + lh * j), line, fill="black", font=font)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out, format="PNG")
    return out


def training_slides(model_dir: str | Path) -> set[str]:
    """Slides the final model was fitted on (the cross-validated ones in its metrics.json)."""
    import json

    from cytostore.mil.artifacts import METRICS

    path = Path(model_dir) / METRICS
    if not path.is_file():
        return set()
    try:
        oof = json.loads(path.read_text()).get("oof") or []
    except json.JSONDecodeError as e:
        raise InputError(f"{path} is not valid JSON ({e}); retrain the model") from e
    return {str(r["slide_id"]) for r in oof if "slide_id" in r}


def score(store_path: str | Path, model_dir: str | Path, preds: Predictions) -> dict[str, Any] | None:
    """Slide predictions against the store's ``slide_label``; None when no predicted slide has one.

    Slides the model was trained on are left out (their predictions are not a test) and counted;
    so are slides whose stored label is not one of the model's classes.
    """
    from collections import Counter

    from cytostore.fewshot.scoring import agreement
    from cytostore.mil.bags import store_slide_labels

    store = CellStore.open(store_path)
    if "slide_label" not in store.dataset(preds.table).schema.names:
        return None
    stored = store_slide_labels(store, preds.table)
    labelled = [(s, stored[s], p) for s, p in zip(preds.slide_ids, preds.labels()) if stored.get(s)]
    if not labelled:
        return None
    trained = training_slides(model_dir)
    classes = set(preds.classes)
    test = [(t, p) for s, t, p in labelled if s not in trained and t in classes]
    other = Counter(t for s, t, _ in labelled if s not in trained and t not in classes)
    result = agreement([t for t, _ in test], [p for _, p in test]) or {"n": 0}
    result.update({"labelled_slides": len(labelled), "training_excluded": sum(s in trained for s, _, _ in labelled),
                   "other_classes_excluded": dict(sorted(other.items()))})
    return result
