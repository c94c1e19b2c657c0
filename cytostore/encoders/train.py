"""``cytostore encoders train``: a new encoder adapted from the cells of a store.

Self-supervised without labels; supervised with a label column, on the training slides of
a split by slide (groups holding identical content merged first, as ``cytostore evaluate``
does), so the held-out slides stay unseen. The result is a folder (``model.safetensors``,
``config.json``) in the user registry and a copy in the store; ``create_encoder(NAME)``
finds it, and its provenance names the recipe, the training table and Lance version, the
training slides and a digest of the training cells.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from cytostore.errors import CytostoreError, InputError

RECIPES = ("auto", "cpu", "gpu")
DEFAULTS = {  # per recipe: input side, epochs, learning rate of the trained layers
    "cpu": {"input_size": 96, "epochs_ssl": 12, "epochs_supervised": 8, "lr": 3e-4},
    "gpu": {"input_size": 160, "epochs_ssl": 100, "epochs_supervised": 30, "lr": 1e-4},
}


@dataclass(frozen=True)
class TrainConfig:
    """How ``train_encoder`` trains; 0 means the recipe's default."""

    recipe: str = "auto"  # auto (gpu when a CUDA GPU is visible, else cpu), cpu or gpu
    base: str = "efficientnet_lite0"  # encoder the training starts from
    base_weights: str | None = None  # a checkpoint for ``base`` (as ingest --weights)
    input_size: int = 0  # square input side; 0: 96 (cpu) or 160 (gpu)
    train_blocks: int = 2  # cpu: last stages trained (the rest is frozen and cached)
    views: int = 4  # cpu: augmented views of each cell cached
    bn_cells: int = 1024  # cells batch-norm statistics are re-estimated on (a seeded sample)
    epochs: int = 0  # passes over the training cells; 0: recipe default
    batch_size: int = 256  # cells per step (SimCLR negatives come from the batch)
    lr: float = 0.0  # learning rate of the backbone layers; 0: recipe default
    temperature: float = 0.2  # SimCLR temperature
    holdout: float = 0.3  # supervised: share of the (merged) groups held out, never trained on
    group: str = "slide_id"  # column the supervised split is made by
    source: str = "auto"  # crops from source images (auto: thumbnail when unreadable), images, thumbnails
    max_cells: int = 20000  # at most this many training cells (a seeded sample beyond)
    augment: float = 1.0  # strength of scale and colour jitter
    background: float = 0.5  # probability of the Cyto-SSL background swap
    seed: int = 0  # sampling, split, augmentations, initialisation
    device: str = "auto"  # gpu recipe: auto or cuda[:N]


def resolve(config: TrainConfig, supervised: bool) -> dict[str, Any]:
    """The parameters a run really uses: recipe and defaults resolved."""
    import torch

    if config.recipe not in RECIPES:
        raise InputError(f"unknown recipe {config.recipe!r}; use one of {', '.join(RECIPES)}")
    recipe = config.recipe if config.recipe != "auto" else ("gpu" if torch.cuda.is_available() else "cpu")
    d = DEFAULTS[recipe]
    p = asdict(config)
    p["recipe"] = recipe
    p["input_size"] = config.input_size or d["input_size"]
    p["epochs"] = config.epochs or d["epochs_supervised" if supervised else "epochs_ssl"]
    p["lr"] = config.lr or d["lr"]
    p["device"] = "cpu" if recipe == "cpu" else ("cuda" if config.device == "auto" else config.device)
    if recipe == "gpu" and not torch.cuda.is_available():
        raise InputError("--recipe gpu needs a CUDA GPU and none is visible; use --recipe cpu (or auto)")
    if not 0 < config.holdout < 1:
        raise InputError(f"--holdout must be between 0 and 1 (a share of the groups), got {config.holdout}")
    if config.views < 2 and not supervised:
        raise InputError("self-supervised training needs --views 2 or more (two views make a positive pair)")
    if p["input_size"] < 32 or config.batch_size < 4 or p["epochs"] < 1:
        raise InputError("need --input-size >= 32, --batch-size >= 4 and --epochs >= 1")
    return p


def check_new_name(name: str, store) -> None:
    """Refuses a name that is invalid or already taken (bundled, trained, or a table of the store)."""
    from cytostore.encoders.registry import get_spec
    from cytostore.encoders.user import encoders_home
    from cytostore.store import layout, table_name_for

    try:
        layout.check_name(name, "encoder name")
    except CytostoreError as e:
        raise InputError(str(e)) from e
    if get_spec(name) is not None:
        raise InputError(f"{name!r} is a bundled encoder; choose another --name")
    import timm

    if timm.is_model(name):
        raise InputError(f"{name!r} is a timm architecture; choose another --name (a trained encoder would hide it)")
    if (encoders_home() / name).exists():
        raise InputError(f"an encoder named {name!r} exists already ({encoders_home() / name}); choose another "
                         "--name (trained encoders are never overwritten: their tables refer to them)")
    if layout.exists(store.root, "encoder", name):
        raise InputError(f"store {store.root} holds an encoder named {name!r} already; choose another --name")
    if table_name_for(name) in store.tables():
        raise InputError(f"store {store.root} has a table {table_name_for(name)!r} already; choose another --name")


def cells_digest(uids: np.ndarray) -> str:
    """sha256 over the sorted uids (int64, little-endian) of the training cells."""
    return "sha256:" + hashlib.sha256(np.sort(np.asarray(uids, dtype="<i8")).tobytes()).hexdigest()


def _read(store, table: str, labels: str | None, group: str, p: dict[str, Any]) -> dict[str, Any]:
    names = store.dataset(table).schema.names
    for col, opt in ((labels, "--labels"), (group, "--group")):
        if col is not None and col not in names:
            raise InputError(f"table {table!r} has no column {col!r}; pass {opt} with one of {names}")
    cols = list(dict.fromkeys(["uid", group, *([labels] if labels else []), "image", "x", "y", "crop_size",
                               "thumbnail"]))
    where = f"`{labels}` IS NOT NULL" if labels else None
    t = store.cells(columns=cols, where=where, encoder=table)
    if t.num_rows == 0:
        raise InputError(f"table {table!r} has no cells" + (f" with a {labels!r} value" if labels else ""))
    return {c: t.column(c).to_pylist() for c in cols}


def _supervised_split(store, table: str, rows: dict[str, Any], labels: str, group: str,
                      p: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
    """Training cell indices, split by merged group (duplicates on one side), and the split's record."""
    from cytostore.evaluate.run import EvalConfig, find_duplicates
    from cytostore.evaluate.splits import assert_disjoint, grouped_folds

    y = np.array([str(v) for v in rows[labels]], dtype=object)
    g = np.array([str(v) for v in rows[group]], dtype=object)
    if len(set(y.tolist())) < 2:
        raise InputError(f"column {labels!r} holds one value only; supervised training needs 2 classes or more")
    cells = {"uid": np.asarray(rows["uid"], dtype=np.int64), "label": y, "group": g}
    dedup = find_duplicates(store, table, cells, EvalConfig(label=labels, group=group))
    k = max(2, int(round(1 / p["holdout"])))
    train, held = grouped_folds(y, dedup.groups, k, p["seed"])[0]
    assert_disjoint(dedup.groups[train], dedup.groups[held])
    held_groups = sorted(set(g[held].tolist()))
    train_groups = sorted(set(g[train].tolist()))
    return train, {"groups": train_groups, "held_out": held_groups, "n_groups": len(train_groups),
                   "n_held_out_groups": len(held_groups), "merged_duplicates": dedup.report["groups_merged"]}


def train_encoder(store_path: str | Path, name: str, labels: str | None = None, table: str | None = None,
                  config: TrainConfig = TrainConfig(),
                  progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """Trains encoder ``name`` on the cells of a store table and registers it.

    Args:
        store_path: the store.
        name: the new encoder's name (``cytostore ingest --encoder NAME``).
        labels: a label column: supervised on the training slides; None: self-supervised.
        table: the cell table to train on (default: the store's default table).
        config: recipe and its parameters.
        progress: ``(phase, done, total)`` callback.

    Returns:
        A report: name, folders, recipe and parameters, the training record, losses, seconds.

    Raises:
        InputError: a bad or taken name, a missing column, too few classes or groups.
    """
    from cytostore.encoders import create_encoder
    from cytostore.encoders import recipes
    from cytostore.encoders.adapt import load_crops
    from cytostore.encoders.registry import state_dict_sha256
    from cytostore.encoders.user import encoders_home, trained_config, write_folder
    from cytostore.store import CellStore, layout

    t0 = time.perf_counter()
    tick = progress or (lambda *_a: None)
    store = CellStore.open(store_path)
    check_new_name(name, store)
    tname = store.resolve(table)
    p = resolve(config, labels is not None)
    rows = _read(store, tname, labels, config.group, p)
    n_all = len(rows["uid"])
    record: dict[str, Any] = {}
    if labels is not None:
        keep, record = _supervised_split(store, tname, rows, labels, config.group, p)
    else:
        keep = np.arange(n_all)
        record = {"groups": sorted({str(v) for v in rows[config.group]})}
        record["n_groups"] = len(record["groups"])
    if len(keep) > config.max_cells:
        keep = np.sort(np.random.default_rng(config.seed).choice(keep, size=config.max_cells, replace=False))
    rows = {c: [v[i] for i in keep] for c, v in rows.items()}
    if len(keep) < 8:
        raise InputError(f"only {len(keep)} training cells; training needs at least 8")
    base = create_encoder(config.base, config.base_weights)
    model = base.model
    pixels, crops = load_crops(rows, p["input_size"], base.interpolation, config.source,
                               progress=lambda d, t: tick("crops", d, t))
    y = None
    classes: list[str] = []
    if labels is not None:
        classes = sorted({str(v) for v in rows[labels]})
        y = np.searchsorted(classes, np.array([str(v) for v in rows[labels]]))
    run = recipes.run_cpu if p["recipe"] == "cpu" else recipes.run_gpu
    stats = run(model, pixels, y, base.mean, base.std, p, tick)
    sha = state_dict_sha256(model)
    ds = store.dataset(tname)
    training = {
        "store": str(store.root), "table": tname, "table_version": int(ds.version), "table_id": store.table_id(tname),
        "labels": labels, "classes": classes, "group": config.group, **record,
        "n_cells": int(len(keep)), "n_cells_available": int(n_all), "cells_digest": cells_digest(rows["uid"]),
        "crops": {"input_size": p["input_size"], **crops},
    }
    details = {
        "recipe": p["recipe"] + ("-supervised" if labels else "-ssl"),
        "params": {k: v for k, v in p.items() if k not in {"base", "base_weights"}},
        "base": {"name": base.name, "arch": base.arch, "weights_sha256": base.weights_sha256,
                 "weights_source": base.weights_source},
        "training": training,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "stats": stats,
    }
    cfg = trained_config(name, base.arch, int(model.num_features), p["input_size"], base.mean, base.std,
                         base.interpolation, sha, details)
    folder = write_folder(encoders_home() / name, model.state_dict(), cfg)
    copy = Path(layout.uri(str(store.root), "encoder", name))
    copy_error = None
    try:
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(folder, copy)
    except OSError as e:  # a read-only store still gets a usable encoder in the user registry
        copy_error = f"no copy in the store ({e})"
    return {"name": name, "folder": str(folder), "store_copy": None if copy_error else str(copy),
            "store_copy_error": copy_error, "recipe": details["recipe"], "params": details["params"],
            "dim": int(model.num_features), "input_size": p["input_size"], "weights_sha256": sha,
            "base": details["base"], "training": {k: v for k, v in training.items() if k not in {"groups", "held_out"}},
            "training_groups": training["groups"], "held_out_groups": training.get("held_out", []),
            "stats": stats, "seconds": round(time.perf_counter() - t0, 1),
            "next": f"cytostore ingest SOURCE --store {store.root} --encoder {name}"}
