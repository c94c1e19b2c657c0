"""``evaluate``: compares the encoder tables of one store on the same labelled cells."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from cytostore.errors import InputError, StoreError
from cytostore.evaluate import probes
from cytostore.evaluate.heldout import restrict_to_held_out
from cytostore.evaluate.splits import (GroupEpisodes, check_groups, content_hash, file_hash,
                                       merge_duplicate_groups, sample_cross_group_episodes, stored_hashes)
from cytostore.fewshot.prototypes import PrototypeConfig, Whitening
from cytostore.fewshot.tables import as_store, stats_for
from cytostore.store import CellStore


@dataclass(frozen=True)
class EvalConfig:
    """What ``evaluate`` measures and how."""

    label: str = "label"  # column with the cell label
    group: str = "slide_id"  # column splits are made by (slides, fields, patients)
    folds: int = 5  # outer grouped folds of the linear probe and k-NN
    ways: int = 5  # classes per few-shot episode
    shots: int = 5  # support cells per class
    queries: int = 15  # query cells per class
    episodes: int = 200  # few-shot episodes
    neighbours: int = 10  # k of same-label precision@k
    seed: int = 0  # folds, episodes, slide-of-origin folds
    hash_images: bool = True  # also merge groups cropped from byte-identical source images
    c_grid: tuple[float, ...] = probes.C_GRID  # probe C candidates
    k_grid: tuple[int, ...] = probes.K_GRID  # k-NN k candidates
    shrink_grid: tuple[float, ...] = probes.SHRINK_GRID  # whitening shrinkage candidates (first wins ties)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def fewshot_key(self) -> str:
        return f"fewshot_{self.ways}way{self.shots}shot"


def labelled_tables(store: CellStore, label: str) -> list[str]:
    """Tables with a ``label`` column holding at least one value."""
    out = []
    for t in store.tables():
        ds = store.dataset(t)
        if label in ds.schema.names and ds.count_rows(filter=f"`{label}` IS NOT NULL"):
            out.append(t)
    return out


def _resolve_tables(store: CellStore, tables: Sequence[str] | None, label: str) -> list[str]:
    have = store.tables()
    if not have:
        raise StoreError(f"store {store.root} holds no cell tables; run `cytostore ingest` first")
    if not tables:
        found = labelled_tables(store, label)
        if not found:
            raise StoreError(f"no table of {store.root} has cells with a {label!r} value (tables: {have}); "
                             "ingest a source with labels, or pass --label COLUMN")
        return found
    missing = [t for t in tables if t not in have]
    if missing:
        raise StoreError(f"store {store.root} has no table(s) {missing}; it has {have}: pass --tables from those")
    return list(dict.fromkeys(tables))


def _keys(store: CellStore, table: str, label: str, group: str) -> dict[str, np.ndarray]:
    names = store.dataset(table).schema.names
    for col, opt in ((label, "--label"), (group, "--group")):
        if col not in names:
            raise StoreError(f"table {table!r} has no column {col!r}; pass {opt} with one of {names}")
    cols = list(dict.fromkeys(["uid", label, group]))
    t = store.cells(columns=cols, where=f"`{label}` IS NOT NULL", encoder=table)
    g = t.column(group).to_pylist()
    if any(v is None for v in g):
        raise StoreError(f"table {table!r}: {sum(v is None for v in g)} labelled cells have no {group!r}; "
                         "fill it or pass another --group")
    return {"uid": t.column("uid").to_numpy(), "label": np.array([str(v) for v in t.column(label).to_pylist()],
                                                                   dtype=object),
            "group": np.array([str(v) for v in g], dtype=object)}


def _common_cells(store: CellStore, tables: list[str], config: EvalConfig) -> tuple[dict[str, np.ndarray], dict]:
    """The labelled cells every table holds, with one label and group each (first table's)."""
    first = _keys(store, tables[0], config.label, config.group)
    common = first["uid"]
    disagree = 0
    first_label = dict(zip(first["uid"].tolist(), first["label"].tolist()))
    for t in tables[1:]:
        k = _keys(store, t, config.label, config.group)
        common = np.intersect1d(common, k["uid"])
        bad = [u for u, v in zip(k["uid"].tolist(), k["label"].tolist()) if u in first_label and first_label[u] != v]
        disagree += len(bad)
        common = np.setdiff1d(common, np.asarray(bad, dtype=common.dtype))
    common = np.unique(common)
    order = np.argsort(first["uid"], kind="stable")
    pos = order[np.searchsorted(first["uid"], common, sorter=order)]
    cells = {"uid": common, "label": first["label"][pos], "group": first["group"][pos]}
    info = {"label_disagreements_dropped": int(disagree)}
    if not len(common):
        raise StoreError(f"the tables {tables} share no labelled cell (key); evaluate compares tables on the "
                         "same cells: ingest the same source into each, or pass --tables")
    return cells, info


def _rows_for(store: CellStore, table: str, uids: np.ndarray, columns: list[str], label: str):
    """Columns of the labelled rows of ``table``, in the order of ``uids``."""
    t = store.cells(columns=["uid", *columns], where=f"`{label}` IS NOT NULL", encoder=table)
    u = t.column("uid").to_numpy()
    order = np.argsort(u, kind="stable")
    pos = order[np.searchsorted(u, uids, sorter=order)]
    return t.take(pos)


def find_duplicates(store: CellStore, table: str, cells: dict[str, np.ndarray], config: EvalConfig):
    """Thumbnail hashes of each cell and file hashes of each group's source images, merged."""
    stored = [c for c in ("content_hash", "image_hash") if c in store.dataset(table).schema.names]
    rows = _rows_for(store, table, cells["uid"], ["thumbnail", "image", *stored], config.label)
    # The crop hashes written at ingest when every compared cell has one, else the thumbnails'.
    hashes = stored_hashes(rows, "content_hash")
    by_crop = hashes is not None
    hashes = hashes or [content_hash(b) if b else None for b in rows.column("thumbnail").to_pylist()]
    images: dict[str, set[bytes]] = {}
    unreadable = 0
    if config.hash_images:
        paths: dict[str, set[str]] = {}
        for g, p in zip(cells["group"].tolist(), rows.column("image").to_pylist()):
            paths.setdefault(g, set()).add(p)
        cache: dict[str, bytes | None] = dict(zip(rows.column("image").to_pylist(),
                                                  stored_hashes(rows, "image_hash") or []))
        for g, ps in paths.items():
            for p in ps:
                if p not in cache:
                    cache[p] = file_hash(p)
                if cache[p] is None:
                    unreadable += 1
                else:
                    images.setdefault(g, set()).add(cache[p])
    dedup = merge_duplicate_groups(cells["group"], hashes, images)
    dedup.report["source_images_hashed"] = sum(len(v) for v in images.values())
    dedup.report["source_images_unreadable"] = unreadable
    dedup.report["cell_hash"] = "content_hash (crop pixels, stored at ingest)" if by_crop else "thumbnail"
    return dedup


def evaluate(store: CellStore | str | Path, tables: Sequence[str] | None = None, config: EvalConfig = EvalConfig(),
             progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Linear probe, k-NN, cross-group few-shot episodes, precision@k and slide-of-origin per table.

    Every table is scored on the same labelled cells (the keys all of them hold), the same
    folds and the same episodes. Groups holding identical content are merged first.

    Returns:
        ``{"tables": {table: figures}, "cells": ..., "duplicates": ..., "config": ...}``.

    Raises:
        StoreError: no labelled cells, a table or column missing.
        InputError: too few groups for the folds or the episodes.
    """
    check_inputs(config)
    say = progress or (lambda _m: None)
    t0 = time.perf_counter()
    s = as_store(store)
    names = _resolve_tables(s, tables, config.label)
    say(f"evaluate: reading keys of {len(names)} table(s): {', '.join(names)}")
    cells, info = _common_cells(s, names, config)
    y = cells["label"]
    if len(set(y.tolist())) < 2:
        raise StoreError(f"the labelled cells have one {config.label!r} value only ({y[0]!r}); evaluate needs 2 or more")
    say(f"evaluate: {len(y)} labelled cells in common; hashing thumbnails and source images for duplicates")
    dedup = find_duplicates(s, names[0], cells, config)
    groups = dedup.groups
    keep, held_out = restrict_to_held_out(
        s, names, cells, groups, config.group,
        lambda t, col: _rows_for(s, t, cells["uid"], [col], config.label).column(col).to_pylist())
    if not keep.all():
        say(f"evaluate: {held_out['cells_excluded']} cells on slides a compared encoder was trained on "
            f"({', '.join(held_out['tables'])}) are left out; the rest are scored")
        cells = {k: v[keep] for k, v in cells.items()}
        groups = groups[keep]
        y = cells["label"]
        if len(set(y.tolist())) < 2:
            raise StoreError("the held-out cells hold one label only; evaluate needs 2 or more")
    held_out["scored_groups"] = sorted(set(cells["group"].tolist()))
    check_groups(groups, config.folds)
    d = dedup.report
    say(f"evaluate: {d['groups_before']} groups -> {d['groups_after']} after merging duplicates "
        f"({d['groups_merged']} groups, {d['cells_in_merged_groups']} cells merged)")
    sampled = sample_cross_group_episodes(y, groups, config.ways, config.shots, config.queries, config.episodes,
                                          config.seed)
    out: dict[str, Any] = {}
    for name in names:
        say(f"evaluate: table {name}")
        out[name] = _table(s, name, cells, groups, sampled, config, say)
    classes, counts = np.unique(y, return_counts=True)
    return {
        "tables": out,
        "store": s.root,
        "label": config.label,
        "group": config.group,
        "n_cells": int(len(y)),
        "n_groups": int(len(set(groups.tolist()))),
        "n_groups_before_merging": int(d["groups_before"]),
        "classes": {str(c): int(n) for c, n in zip(classes, counts)},
        "duplicates": d,
        **info,
        "held_out": held_out,
        "config": config.to_dict(),
        "seconds": round(time.perf_counter() - t0, 1),
    }


def _table(s: CellStore, name: str, cells: dict[str, np.ndarray], groups: np.ndarray, sampled: GroupEpisodes,
           config: EvalConfig, say: Callable[[str], None]) -> dict[str, Any]:
    t0 = time.perf_counter()
    from cytostore.store import embedding_matrix

    rows = _rows_for(s, name, cells["uid"], ["embedding"], config.label)
    x = np.asarray(embedding_matrix(rows.column("embedding")), dtype=np.float32)
    y = cells["label"]
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):  # the machine is shared; BLAS threads mostly wait
        say(f"  linear probe: {config.folds} grouped folds, C from {list(config.c_grid)} on inner folds")
        probe = probes.linear_probe(x, y, groups, config.folds, config.seed, config.c_grid, say)
        say(f"  k-NN: k from {list(config.k_grid)} on inner folds")
        knn = probes.knn_probe(x, y, groups, config.folds, config.seed, config.k_grid, say)
        say(f"  same-label precision@{config.neighbours} excluding the query's group")
        prec = probes.precision_at_k(x, y, groups, config.neighbours)
        say("  slide of origin")
        origin = probes.slide_of_origin(x, groups, config.seed)
        say(f"  {len(sampled.episodes)} cross-group {config.ways}-way {config.shots}-shot episodes")
        fewshot = _fewshot(s, name, x, y, sampled, config)
    ds = s.dataset(name)
    return {
        config.fewshot_key: fewshot,
        "linear_probe": probe,
        "knn": knn,
        f"precision_at_{config.neighbours}": prec["precision"],
        f"precision_at_{config.neighbours}_detail": prec,
        "slide_of_origin": None if origin is None else origin["balanced_accuracy"],
        "slide_of_origin_chance": None if origin is None else origin["chance"],
        "slide_of_origin_detail": origin,
        "label_chance": {"majority": round(float(np.unique(y, return_counts=True)[1].max() / len(y)), 4),
                         "balanced": round(1 / len(set(y.tolist())), 4)},
        "n_cells": int(len(y)),
        "n_groups": int(len(set(groups.tolist()))),
        "dim": int(x.shape[1]),
        "encoder": s.provenance(name).get("encoder", {}).get("name"),
        "table_version": int(ds.version),
        "seconds": round(time.perf_counter() - t0, 1),
    }


def _fewshot(s: CellStore, name: str, x: np.ndarray, y: np.ndarray, sampled: GroupEpisodes,
             config: EvalConfig) -> dict[str, Any]:
    if not sampled.episodes:
        return {"accuracy": None, "ci95": None, "episodes": 0, "skipped": sampled.skipped,
                "note": (f"no split of the groups left {config.ways} classes with {config.shots} support cells on "
                         f"one side and {config.queries} query cells on the other; lower --ways, --shots or "
                         "--queries, or add groups")}
    pconf = PrototypeConfig()
    stats = stats_for(s, name, pconf)
    base = probes.base_transform(pconf, stats.mean)(x)
    whitenings = {float(v): Whitening.from_stats(stats, float(v)) for v in config.shrink_grid}
    res = probes.prototype_episodes(base, y, sampled, config.shots, whitenings)
    sup = [len(a) for a, _ in sampled.sides]
    return {"accuracy": res["accuracy"], "ci95": res["ci95"], "balanced_accuracy": res["balanced_accuracy"],
            "chance": round(1 / config.ways, 4), "episodes": len(sampled.episodes), "skipped": sampled.skipped,
            "queries_per_class": config.queries, "classes": sampled.classes,
            "support_groups_mean": round(float(np.mean(sup)), 1), "shrinkage_chosen": res["shrinkage_chosen"],
            "recipe": "power 0.5, store-mean centring, shrinkage whitening (chosen per episode by leave-one-out "
                      "on the support set), L2, nearest class mean"}


def check_inputs(config: EvalConfig) -> None:
    """Raises InputError on impossible settings before any reading."""
    if config.folds < 2:
        raise InputError(f"--folds must be at least 2, got {config.folds}")
    if config.neighbours < 1:
        raise InputError(f"precision@k needs k >= 1, got {config.neighbours}")
