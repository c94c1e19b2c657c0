"""Encoder registry: ``@register_encoder`` + ``create_encoder(name)``, as in timm."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from cytostore.errors import EncoderError


@dataclass(frozen=True)
class EncoderSpec:
    """What the registry knows about an encoder before building it."""

    name: str  # registry name, e.g. "efficientnet_lite0"
    arch: str  # timm architecture the weights load into
    dim: int  # embedding dimension
    input_size: int  # square input side, pixels
    build: Callable[[Path | None], "Encoder"]  # factory; gets --weights or None
    weights_present: Callable[[], bool]  # whether default weights are on this machine
    description: str = ""  # one line for `cytostore encoders`


@dataclass
class Encoder:
    """A ready model plus everything needed to reproduce its embeddings."""

    name: str  # registry or timm name the user asked for
    arch: str  # timm architecture
    model: Any  # torch.nn.Module in eval mode, outputs (N, dim) pooled features
    dim: int  # embedding dimension
    input_size: int  # square input side the crops are resized to
    mean: tuple[float, float, float]  # normalisation mean, 0..1 scale
    std: tuple[float, float, float]  # normalisation std, 0..1 scale
    interpolation: str  # resize filter name
    weights_sha256: str  # sha256 over the state dict (sorted keys, raw tensor bytes)
    weights_source: str  # package, file or hub name the weights came from
    extra: dict[str, Any] = field(default_factory=dict)  # anything else worth recording

    def provenance(self) -> dict[str, Any]:
        """Encoder part of a table's provenance (compared on every append)."""
        return {
            "name": self.name,
            "arch": self.arch,
            "dim": self.dim,
            "input_size": self.input_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
            "weights_sha256": self.weights_sha256,
            "weights_source": self.weights_source,
            # A trained encoder names its recipe, training table + version and training-cell digest.
            **({"trained": self.extra["trained"]} if "trained" in self.extra else {}),
        }


_REGISTRY: dict[str, EncoderSpec] = {}


def register_encoder(
    name: str,
    *,
    arch: str,
    dim: int,
    input_size: int,
    weights_present: Callable[[], bool],
    description: str = "",
) -> Callable[[Callable[[Path | None], Encoder]], Callable[[Path | None], Encoder]]:
    """Decorator registering an encoder factory under ``name``. A name registers once."""

    def wrap(fn: Callable[[Path | None], Encoder]) -> Callable[[Path | None], Encoder]:
        if name in _REGISTRY:
            raise EncoderError(f"encoder {name!r} is already registered")
        _REGISTRY[name] = EncoderSpec(name, arch, dim, input_size, fn, weights_present, description)
        return fn

    return wrap


def list_encoders() -> list[EncoderSpec]:
    """Registered encoders, in registration order."""
    return list(_REGISTRY.values())


def get_spec(name: str) -> EncoderSpec | None:
    """The registered spec of ``name``, or None for a plain timm / hub name."""
    return _REGISTRY.get(name)


def state_dict_sha256(model: Any) -> str:
    """sha256 over a module's state dict: sorted keys, dtype, shape and raw bytes."""
    import torch

    h = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(key.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
