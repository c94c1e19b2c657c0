"""Trained encoders on disk: a folder holding ``model.safetensors`` and ``config.json``.

The folder is found by name in the user registry (``$CYTOSTORE_HOME/encoders/NAME``,
default ``~/.local/share/cytostore/encoders/NAME``), so ``cytostore ingest --encoder NAME``
works from any directory; ``encoders train`` also leaves a copy in the store
(``encoders/NAME``). ``config.json`` is timm's layout (``architecture``,
``pretrained_cfg``: ``local-dir:FOLDER`` loads it too) plus a ``cytostore`` part: the
recipe, its parameters, the training table and Lance version, the training-cell digest.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from cytostore.encoders.registry import Encoder, state_dict_sha256
from cytostore.errors import EncoderError

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def cytostore_home() -> Path:
    """``$CYTOSTORE_HOME``, or ``$XDG_DATA_HOME/cytostore``, or ``~/.local/share/cytostore``."""
    if os.environ.get("CYTOSTORE_HOME"):
        return Path(os.environ["CYTOSTORE_HOME"]).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base).expanduser() / "cytostore"


def encoders_home() -> Path:
    """The user registry of trained encoders: one folder per name."""
    return cytostore_home() / "encoders"


def is_trained_folder(path: str | Path) -> bool:
    """Whether ``path`` is a folder written by ``encoders train``."""
    p = Path(path)
    cfg = p / CONFIG
    if not (cfg.is_file() and (p / WEIGHTS).is_file()):
        return False
    try:
        return "cytostore" in json.loads(cfg.read_text())
    except (OSError, ValueError):
        return False


def find_trained(name: str) -> Path | None:
    """The user-registry folder of trained encoder ``name``, or None."""
    if not name or "/" in name or name.startswith("."):
        return None
    p = encoders_home() / name
    return p if is_trained_folder(p) else None


def read_config(folder: str | Path) -> dict[str, Any]:
    """The ``config.json`` of a trained encoder folder."""
    path = Path(folder) / CONFIG
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise EncoderError(f"{path}: not a readable encoder config ({e}); train the encoder again") from e


def write_folder(folder: Path, state: dict[str, Any], config: dict[str, Any]) -> Path:
    """Writes weights and config into ``folder`` atomically (a temporary folder renamed)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    if folder.exists():
        raise EncoderError(f"{folder} exists already; choose another --name or remove that folder")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp / WEIGHTS))
        (tmp / CONFIG).write_text(json.dumps(config, indent=1, sort_keys=True))
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def trained_config(name: str, arch: str, dim: int, input_size: int, mean, std, interpolation: str,
                   weights_sha256: str, details: dict[str, Any]) -> dict[str, Any]:
    """A timm-compatible ``config.json`` with the cytostore part (``details``) under ``cytostore``."""
    return {
        "architecture": arch,
        "num_classes": 0,
        "num_features": dim,
        "pretrained_cfg": {"input_size": [3, input_size, input_size], "mean": list(mean), "std": list(std),
                           "interpolation": interpolation, "crop_pct": 1.0},
        "cytostore": {"name": name, "dim": dim, "weights_sha256": weights_sha256, **details},
    }


def load_trained(folder: str | Path, name: str | None = None) -> Encoder:
    """Builds the Encoder of a trained folder; the weights are checked against the recorded sha256."""
    import timm

    from cytostore.encoders.timm_encoders import load_weights_into, read_checkpoint

    folder = Path(folder)
    cfg = read_config(folder)
    meta, pre = cfg.get("cytostore", {}), cfg.get("pretrained_cfg", {})
    try:
        model = timm.create_model(cfg["architecture"], pretrained=False, num_classes=0)
    except (KeyError, RuntimeError) as e:
        raise EncoderError(f"{folder}: cannot build architecture {cfg.get('architecture')!r} ({e})") from e
    load_weights_into(model, read_checkpoint(folder / WEIGHTS), str(folder / WEIGHTS))
    model.eval()
    sha = state_dict_sha256(model)
    if meta.get("weights_sha256") and meta["weights_sha256"] != sha:
        raise EncoderError(f"{folder}: weights sha256 {sha[:16]}... differs from the one recorded in config.json "
                           f"({meta['weights_sha256'][:16]}...); the file was changed after training")
    trained = {k: meta[k] for k in ("recipe", "params", "base", "training", "created") if k in meta}
    return Encoder(
        name=name or meta.get("name") or folder.name,
        arch=str(cfg["architecture"]),
        model=model,
        dim=int(getattr(model, "num_features", meta.get("dim", 0))),
        input_size=int(pre["input_size"][-1]),
        mean=tuple(float(v) for v in pre["mean"]),
        std=tuple(float(v) for v in pre["std"]),
        interpolation=str(pre.get("interpolation", "bicubic")),
        weights_sha256=sha,
        weights_source=f"trained:{meta.get('name') or folder.name}",
        extra={"trained": trained},
    )


def list_trained(extra_folders: list[Path] | None = None) -> list[dict[str, Any]]:
    """Trained encoders of the user registry and of ``extra_folders`` (store copies), by name."""
    out: dict[str, dict[str, Any]] = {}
    folders = sorted(encoders_home().iterdir()) if encoders_home().is_dir() else []
    for p in [*folders, *(extra_folders or [])]:
        if not is_trained_folder(p):
            continue
        cfg = read_config(p)
        meta = cfg["cytostore"]
        name = meta.get("name") or p.name
        row = out.setdefault(name, {
            "name": name, "arch": cfg.get("architecture"), "dim": meta.get("dim"),
            "input_size": cfg.get("pretrained_cfg", {}).get("input_size", [0])[-1],
            "weights_sha256": meta.get("weights_sha256"), "recipe": meta.get("recipe"),
            "labels": (meta.get("training") or {}).get("labels"), "base": meta.get("base"),
            "training": {k: v for k, v in (meta.get("training") or {}).items() if k not in {"groups", "held_out"}},
            "folders": []})
        row["folders"].append(str(p))
    return list(out.values())
