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
    """A PNG contact sheet of the most attended cells' stored thumbnails, attention under each."""
    from PIL import Image, ImageDraw

    from cytostore.imaging import decode_thumbnail

    store = CellStore.open(store_path)
    best = explanation.cells.slice(0, top)
    uids = best.column("uid").to_pylist()
    if not uids:
        raise InputError(f"slide {explanation.slide_id!r} has no cell to show")
    where = f"slide_id = {sql_quote(explanation.slide_id)} AND uid IN ({', '.join(str(int(u)) for u in uids)})"
    thumbs = store.cells(columns=["uid", "thumbnail"], where=where, encoder=explanation.table)
    by_uid = dict(zip(thumbs.column("uid").to_pylist(), thumbs.column("thumbnail").to_pylist()))
    cols = min(columns, len(uids))
    rows = (len(uids) + cols - 1) // cols
    label_h = 16
    sheet = Image.new("RGB", (cols * tile, rows * (tile + label_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for k, (uid, a) in enumerate(zip(uids, best.column("attention").to_pylist())):
        if uid not in by_uid:
            raise StoreError(f"cell uid {uid} of slide {explanation.slide_id!r} has no thumbnail")
        img = Image.fromarray(decode_thumbnail(by_uid[uid])).resize((tile, tile), Image.BILINEAR)
        x, y = (k % cols) * tile, (k // cols) * (tile + label_h)
        sheet.paste(img, (x, y))
        draw.text((x + 3, y + tile + 2), f"#{k + 1} a={a:.3f}", fill="black")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out, format="PNG")
    return out
