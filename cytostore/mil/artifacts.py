"""The MIL model directory: weights, config, metrics and the provenance of the features.

Layout of ``DIR``::

    model.safetensors   the head's state dict (input mean/std included)
    config.json         format, model shape, classes, training config, feature provenance
    metrics.json        cross-validation figures, per fold and out-of-fold predictions
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cytostore.errors import InputError, ProvenanceError
from cytostore.store import CellStore

FORMAT = "cytostore-mil"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
METRICS = "metrics.json"
# Provenance fields that must be equal for a model to read a table's features.
MUST_MATCH = {
    "encoder": ("name", "arch", "dim", "input_size", "mean", "std", "interpolation", "weights_sha256"),
    "preprocessing": ("crop_size", "box_margin"),
}


def feature_provenance(store: CellStore, table: str) -> dict[str, Any]:
    """What a model must know about the features it was trained on."""
    prov = store.provenance(table)
    return {
        "store": store.root,
        "table": table,
        "table_version": store.dataset(table).version,
        "encoder": prov.get("encoder", {}),
        "preprocessing": prov.get("preprocessing", {}),
        "embedding_dtype": prov.get("embedding_dtype"),
    }


def check_features(model_features: dict[str, Any], store: CellStore, table: str, model_dir: str) -> None:
    """Raises ProvenanceError when ``table`` holds features made another way than the model's."""
    prov = store.provenance(table)
    diffs = []
    for part, keys in MUST_MATCH.items():
        for key in keys:
            want = model_features.get(part, {}).get(key)
            have = prov.get(part, {}).get(key)
            if want != have:
                diffs.append(f"{part}.{key}: model trained on {want!r}, table has {have!r}")
    if diffs:
        enc = model_features.get("encoder", {})
        raise ProvenanceError(
            f"model {model_dir} was trained on features of encoder {enc.get('name')!r} (weights sha256 "
            f"{str(enc.get('weights_sha256'))[:16]}...) from table {model_features.get('table')!r}, but table "
            f"{table!r} of {store.root} was made another way:\n  " + "\n  ".join(diffs)
            + f"\nPredict on a table made with that encoder and weights (--table), or retrain on this one."
        )


@dataclass
class MILModel:
    """A loaded model directory."""

    path: str  # the directory
    module: Any  # torch module, eval mode, on the CPU
    classes: list[str]  # class names, index order of the outputs
    features: dict[str, Any]  # provenance of the training features
    config: dict[str, Any]  # the whole config.json


def save_model(out: str | Path, module: Any, model_cfg: dict[str, Any], classes: list[str], train_cfg: dict[str, Any],
               features: dict[str, Any], extra: dict[str, Any], metrics: dict[str, Any]) -> Path:
    """Writes weights, config.json and metrics.json into ``out`` (created when absent)."""
    from safetensors.torch import save_file

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} exists and is not a folder; pick another path")
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(out / WEIGHTS), metadata={"format": FORMAT})
    config = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": model_cfg,
        "classes": list(classes),
        "train": train_cfg,
        "features": features,
        **extra,
    }
    (out / CONFIG).write_text(json.dumps(config, indent=2, default=str))
    (out / METRICS).write_text(json.dumps(metrics, indent=2, default=_json_default))
    return out


def load_model(path: str | Path) -> MILModel:
    """Loads a model directory written by ``save_model``.

    Raises:
        InputError: ``path`` is not such a directory, or it is incomplete.
    """
    import torch
    from safetensors.torch import load_file

    from cytostore.mil.models import ModelConfig, build_model

    path = Path(path)
    cfg_path = path / CONFIG
    if not path.is_dir() or not cfg_path.is_file():
        raise InputError(f"{path} is not a MIL model directory (no {CONFIG}); train one with "
                         "`cytostore mil train --store STORE --labels FILE --out DIR`")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{cfg_path} is not valid JSON ({e}); retrain the model") from e
    if config.get("format") != FORMAT:
        raise InputError(f"{path} is not a MIL model directory ({CONFIG} has format {config.get('format')!r}, "
                         f"expected {FORMAT!r})")
    if not (path / WEIGHTS).is_file():
        raise InputError(f"{path} has no {WEIGHTS}; the training did not finish, retrain the model")
    classes = config.get("classes")
    if not isinstance(classes, list) or not classes or len(set(map(str, classes))) != len(classes):
        raise InputError(f"{cfg_path}: 'classes' must be a list of distinct class names, got {classes!r}; "
                         "retrain the model")
    try:
        module = build_model(ModelConfig(**config["model"]))
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(f"{cfg_path}: 'model' does not describe a MIL model ({e}); retrain the model") from e
    try:
        state = load_file(str(path / WEIGHTS))
        module.load_state_dict(state)
    except Exception as e:
        raise InputError(f"{path / WEIGHTS} does not fit the model in {CONFIG} ({e}); retrain the model") from e
    outputs = int(module.classifier.out_features)
    if len(classes) != outputs:  # a class would silently be dropped (or invented) at prediction
        raise InputError(f"{cfg_path} names {len(classes)} classes but the model in {path / WEIGHTS} has {outputs} "
                         "outputs; the two files do not belong together: retrain the model (or restore its config)")
    module.to(torch.device("cpu")).eval()
    return MILModel(str(path), module, [str(c) for c in classes], config.get("features", {}), config)


def _json_default(value: Any) -> Any:
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)
