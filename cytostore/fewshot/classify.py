"""`fit`, `predict` and `suggest`: prototype sets in the store and the labelling loop."""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa

from cytostore.store import schema
from cytostore.errors import InputError, ProvenanceError
from cytostore.fewshot.prototypes import (
    UNKNOWN,
    Decision,
    PrototypeConfig,
    build_prototypes,
    class_scores,
    decide,
    make_transform,
    refine,
)
from cytostore.fewshot.support import read_support
from cytostore.fewshot.tables import (
    PrototypeSet,
    as_store,
    check_name,
    load_prototypes,
    stats_for,
    write_predictions,
    write_prototypes,
)
from cytostore.store import CellStore, embedding_matrix
from cytostore.store.filters import check_where
from cytostore.store.layout import is_uri
from cytostore.store.pins import pin

BATCH_ROWS = 16384  # cells scored at a time when no transductive step needs them all


def fit(store: CellStore | str | Path, support: str | Path, name: str, encoder: str | None = None,
        config: PrototypeConfig = PrototypeConfig()) -> dict[str, Any]:
    """Builds prototypes from a support file and stores them as ``prototypes.<name>``.

    Args:
        store: the store (or its path).
        support: CSV/Parquet naming store cells (slide_id, cell_id, label) or images (image, label[, x, y]).
        name: prototype-set name; refitting the same name writes a new version.
        encoder: which encoder table; default the store's only (or default) one.
        config: normalisation and prototype options.

    Returns:
        A summary: name, version, table, classes with support counts, prototypes.
    """
    check_name(name)
    s = as_store(store)
    table = s.resolve(encoder)
    if config.per_class < 1:
        raise InputError(f"--prototypes-per-class must be >= 1, got {config.per_class}")
    ds = s.dataset(table)
    prov = s.provenance(table)
    sup = read_support(support, s, table)
    transform = make_transform(config, stats_for(s, table, config))
    protos = build_prototypes(transform(sup.embeddings), sup.labels, config)
    counts = {c: int(n) for c, n in sorted(Counter(sup.labels.tolist()).items())}
    metadata = {
        "schema": "prototypes", "schema_version": schema.version("prototypes"), "name": name,
        "table": table, "table_version": int(ds.version), "cells_in_table": int(ds.count_rows()),
        "encoder": prov.get("encoder", {}), "preprocessing": prov.get("preprocessing", {}),
        "embedding_dtype": prov.get("embedding_dtype"), "config": config.to_dict(),
        "transform": transform.to_dict(), "support": sup.record(), "support_file": str(Path(support).resolve()),
        "classes": counts, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    version = write_prototypes(s, name, protos, metadata)
    if not is_uri(s.root):  # the cell-table version the set was fitted from survives version cleanup
        pin(s.table_uri(table), f"prototypes.{name}", int(ds.version))
    return {"name": name, "version": version, "table": table, "table_version": int(ds.version),
            "support_kind": sup.kind, "support": int(len(sup.labels)), "classes": counts,
            "prototypes": int(len(protos.labels)), "config": config.to_dict()}


def _checked(s: CellStore, pset: PrototypeSet) -> str:
    """The set's table, after checking it was embedded with the set's encoder weights."""
    table = pset.metadata.get("table")
    table = s.resolve(table)
    have = s.provenance(table).get("encoder", {})
    want = pset.metadata.get("encoder", {})
    if have.get("weights_sha256") != want.get("weights_sha256") or have.get("name") != want.get("name"):
        raise ProvenanceError(
            f"prototype set {pset.name!r} was fitted on encoder {want.get('name')!r} (weights "
            f"{str(want.get('weights_sha256'))[:16]}...), but table {table!r} now holds {have.get('name')!r} "
            f"({str(have.get('weights_sha256'))[:16]}...); fit the set again with `cytostore fewshot fit`")
    return table


def _scored(s: CellStore, table: str, pset: PrototypeSet, where: str | None,
            min_score: float | None) -> Iterator[tuple[pa.Table, Decision]]:
    """(keys, decision) per batch of selected cells; keys carry the stored ``label`` when the table has one."""
    where = check_where(where) or None
    key_cols = ["uid", "slide_id", "cell_id", *(["label"] if "label" in s.dataset(table).schema.names else [])]
    cols = [*key_cols, "embedding"]
    if pset.config.transductive_steps > 0:
        emb, keys = s.embeddings(table, where=where, columns=key_cols)
        feats = pset.transform(emb)
        protos = refine(pset.prototypes, feats, pset.config)
        if len(feats):
            yield keys, decide(*class_scores(feats, protos), min_score)
        return
    try:
        batches = s.dataset(table).to_batches(columns=cols, filter=where, batch_size=BATCH_ROWS)
        for batch in batches:
            if batch.num_rows == 0:
                continue
            feats = pset.transform(embedding_matrix(batch.column("embedding")))
            keys = pa.Table.from_batches([batch]).drop_columns(["embedding"])
            yield keys, decide(*class_scores(feats, pset.prototypes), min_score)
    except Exception as e:
        if where and not isinstance(e, InputError):
            from cytostore.errors import StoreError

            raise StoreError(f"cannot apply filter {where!r}: {e}") from e
        raise


def predict(store: CellStore | str | Path, name: str, where: str | None = None,
            min_score: float | None = None) -> dict[str, Any]:
    """Labels every selected cell with its nearest prototype and writes ``predictions.<name>``.

    Args:
        store: the store (or its path).
        name: a prototype set made by :func:`fit`.
        where: SQL filter on the cell table (default: every cell).
        min_score: cells whose best score is lower get the label ``unknown``.

    Returns:
        A summary with ``counts`` (slide -> label -> cells) and ``totals`` (label -> cells).
    """
    s = as_store(store)
    pset = load_prototypes(s, name)
    table = _checked(s, pset)
    cells_version = int(s.dataset(table).version)
    counts: dict[str, Counter] = defaultdict(Counter)
    parts, stored = [], []
    now = pa.scalar(int(time.time() * 1e6), pa.timestamp("us", tz="UTC"))
    for keys, d in _scored(s, table, pset, where, min_score):
        n = keys.num_rows
        parts.append(pa.table({
            "uid": keys.column("uid"), "slide_id": keys.column("slide_id"), "cell_id": keys.column("cell_id"),
            "prediction": pa.array(d.label.tolist(), pa.string()), "nearest": pa.array(d.nearest.tolist(), pa.string()),
            "runner_up": pa.array(d.runner_up.tolist(), pa.string()),
            "score": pa.array(d.score, pa.float32()), "margin": pa.array(d.margin, pa.float32()),
            "prototypes_version": pa.array(np.full(n, pset.version, np.int64)),
            "cells_version": pa.array(np.full(n, cells_version, np.int64)),
            "predicted_at": pa.array([now.value] * n, pa.timestamp("us", tz="UTC")),
        }))
        for slide, label in zip(keys.column("slide_id").to_pylist(), d.label.tolist()):
            counts[slide][label] += 1
        if "label" in keys.column_names:
            stored.append(keys.column("label"))
    if not parts:
        raise InputError(f"no cells of table {table!r} match {where!r}; nothing to predict")
    rows = pa.concat_tables(parts)
    version = write_predictions(s, name, rows)
    if not is_uri(s.root):  # what the predictions were made from survives version cleanup
        pin(s.table_uri(table), f"predictions.{name}", cells_version)
        pin(s.uri("prototypes", name), "predictions", pset.version)
    totals: Counter = Counter()
    for c in counts.values():
        totals.update(c)
    return {"name": name, "prototypes_version": pset.version, "table": table, "cells_version": cells_version,
            "predictions_version": version, "cells": rows.num_rows, "min_score": min_score,
            "unknown": int(totals.get(UNKNOWN, 0)), "totals": dict(sorted(totals.items())),
            "counts": {k: dict(sorted(v.items())) for k, v in sorted(counts.items())},
            "score": _score(rows, pa.chunked_array([c for ch in stored for c in ch.chunks], pa.string())
                            if stored else None, pset)}


def _score(rows: pa.Table, stored: pa.ChunkedArray | None, pset: PrototypeSet) -> dict[str, Any] | None:
    """Predictions against the labels stored for the same cells; None when no predicted cell has one.

    Support cells are left out (they made the prototypes), and so are cells whose stored
    label is not a class of the set (they cannot be predicted right); both are counted.
    """
    from cytostore.fewshot.scoring import agreement

    if stored is None or stored.null_count == len(stored):
        return None
    truth = np.array(stored.to_pylist(), dtype=object)
    pred = np.array(rows.column("prediction").to_pylist(), dtype=object)
    labelled = np.array([v is not None for v in truth])
    support = np.isin(rows.column("uid").to_numpy(), np.fromiter(pset.support_uids, np.int64)) & labelled
    classes = set(pset.prototypes.classes)
    other = labelled & ~support & ~np.isin(truth, list(classes))
    keep = labelled & ~support & ~other
    result = agreement(truth[keep].tolist(), pred[keep].tolist()) or {"n": 0}
    result.update({"labelled_cells": int(labelled.sum()), "support_excluded": int(support.sum()),
                   "other_classes_excluded": dict(sorted(Counter(truth[other].tolist()).items()))})
    return result


def suggest(store: CellStore | str | Path, name: str, n: int = 20, where: str | None = None) -> list[dict[str, Any]]:
    """The cells to label next: half closest to a decision boundary (smallest margin),
    half farthest from every prototype (lowest best score); support cells excluded.

    Returns:
        Up to ``n`` dicts (rank, uid, slide_id, cell_id, nearest, runner_up, score, margin, reason),
        alternating the two reasons.
    """
    if n < 1:
        raise InputError(f"-n must be >= 1, got {n}")
    s = as_store(store)
    pset = load_prototypes(s, name)
    table = _checked(s, pset)
    exclude = np.array(sorted(pset.support_uids), dtype=np.int64)
    keys_parts, score_parts, margin_parts, near_parts, run_parts = [], [], [], [], []
    for keys, d in _scored(s, table, pset, where, None):
        keep = ~np.isin(keys.column("uid").to_numpy(), exclude)
        keys_parts.append(keys.filter(pa.array(keep)))
        score_parts.append(d.score[keep])
        margin_parts.append(d.margin[keep])
        near_parts.append(d.nearest[keep])
        run_parts.append(d.runner_up[keep])
    if not keys_parts or sum(k.num_rows for k in keys_parts) == 0:
        return []
    keys = pa.concat_tables(keys_parts)
    score, margin = np.concatenate(score_parts), np.concatenate(margin_parts)
    nearest, runner = np.concatenate(near_parts), np.concatenate(run_parts)
    by_margin = np.argsort(margin, kind="stable")
    by_far = np.argsort(score, kind="stable")
    multi = len(pset.prototypes.classes) > 1
    chosen: list[tuple[int, str]] = []
    seen: set[int] = set()
    i = j = 0
    while len(chosen) < min(n, len(score)):
        take_margin = multi and (len(chosen) % 2 == 0 or j >= len(by_far))
        if take_margin and i < len(by_margin):
            k, i = int(by_margin[i]), i + 1
            reason = f"boundary: {nearest[k]} vs {runner[k]} (margin {margin[k]:.3f})"
        else:
            k, j = int(by_far[j]), j + 1
            reason = f"far from every prototype (best {nearest[k]}, score {score[k]:.3f})"
        if k in seen:
            continue
        seen.add(k)
        chosen.append((k, reason))
    out = []
    uid, slide, cell = (keys.column(c).to_pylist() for c in ("uid", "slide_id", "cell_id"))
    for rank, (k, reason) in enumerate(chosen, 1):
        out.append({"rank": rank, "uid": int(uid[k]), "slide_id": slide[k], "cell_id": cell[k],
                    "nearest": nearest[k], "runner_up": runner[k], "score": round(float(score[k]), 4),
                    "margin": round(float(margin[k]), 4), "reason": reason})
    return out


def montage(store: CellStore | str | Path, rows: list[dict[str, Any]], out: str | Path, name: str | None = None,
            encoder: str | None = None, columns: int = 5, scale: int = 2) -> Path:
    """A contact sheet (PNG) of suggested cells from their stored thumbnails, captioned
    with slide/cell and the reason each was suggested."""
    from PIL import Image, ImageDraw

    from cytostore.imaging import decode_thumbnail
    from cytostore.maps.captions import caption_font, line_height, wrap_all

    s = as_store(store)
    table = load_prototypes(s, name).metadata.get("table") if name else encoder
    if not rows:
        raise InputError("no cells to put in a montage")
    uids = [r["uid"] for r in rows]
    got = s.cells(columns=["uid", "thumbnail"], where="uid IN (" + ",".join(map(str, uids)) + ")", encoder=table)
    thumbs = dict(zip(got.column("uid").to_pylist(), got.column("thumbnail").to_pylist()))
    font = caption_font(11)
    side, pad = 64 * scale, 6
    tile_w = max(side, 190)
    # Captions are wrapped to the tile width, never cut; the row height fits the longest.
    captions = [wrap_all(font, (f"#{r['rank']} {r['slide_id']}/{r['cell_id']}", r["reason"].split(" (")[0],
                                f"{r['nearest']}  s={r['score']:.2f}  m={r['margin']:.2f}"), tile_w)
                for r in rows]
    lh = line_height(font)
    text_h = max(len(c) for c in captions) * lh + 4
    ncol = max(1, min(columns, len(rows)))
    nrow = (len(rows) + ncol - 1) // ncol
    sheet = Image.new("RGB", (ncol * (tile_w + pad) + pad, nrow * (side + text_h + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (r, lines) in enumerate(zip(rows, captions)):
        x0 = pad + (i % ncol) * (tile_w + pad)
        y0 = pad + (i // ncol) * (side + text_h + pad)
        thumb = thumbs.get(r["uid"])
        if thumb is not None:
            im = Image.fromarray(decode_thumbnail(thumb)).resize((side, side), Image.NEAREST)
            sheet.paste(im, (x0 + (tile_w - side) // 2, y0))
        for j, line in enumerate(lines):
            draw.text((x0, y0 + side + 2 + lh * j), line, fill="black", font=font)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out
