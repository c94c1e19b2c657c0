"""Encoder runtimes (torch, ONNX Runtime, OpenVINO): export cache, tolerance, provenance, resume, laziness.

Real onnxruntime and openvino throughout; faults are injected into the measured
tolerance or the weights file, never into the runtimes themselves.
"""

from __future__ import annotations

import builtins
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import SMALL_FIELDS, TINY, sample_rows, write_manifest
from cytostore import CellStore, IngestConfig, ingest, open_source
from cytostore.encoders import create_encoder
from cytostore.encoders import runtime as rt
from cytostore.errors import EncoderError, ProvenanceError
from cytostore.ingest import IngestInterrupted
from cytostore.store.provenance import RUNTIME_MIN_COSINE

runner = CliRunner()


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    """A fresh user cache for every test (graphs, sidecars, digests)."""
    path = tmp_path / "cache"
    monkeypatch.setenv("CYTOSTORE_CACHE", str(path))
    return path


def _config(weights, **kw) -> IngestConfig:
    return IngestConfig(encoder=TINY, weights=str(weights), device="cpu", batch_size=16, **kw)


def _manifest(tmp_path: Path, name: str, rows: list[dict]) -> Path:
    return write_manifest(rows, tmp_path / f"{name}.csv")


def _by_key(store: Path) -> dict[tuple[str, str], np.ndarray]:
    s = CellStore.open(store)
    emb, keys = s.embeddings()
    return {k: e for k, e in zip(zip(keys.column("slide_id").to_pylist(), keys.column("cell_id").to_pylist()), emb)}


def _real_crops(n: int, size: int) -> np.ndarray:
    from cytostore.embed import CropSpec, plan_tasks, process_task
    from cytostore.imaging import CropPolicy
    from cytostore.keys import UidSet

    rows = sample_rows(["chula-27"])[:n]
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        src = open_source(write_manifest(rows, Path(d) / "m.csv"))
        spec = CropSpec(CropPolicy(), size, "bicubic")
        tasks = [t for kind, t in plan_tasks(src, UidSet()) if kind == "task"]
        return np.concatenate([process_task(t, spec, UidSet())["pixels"] for t in tasks])[:n]


# -- export, cache and tolerance --------------------------------------------------------
def test_export_is_cached_reused_and_its_tolerance_recorded(tiny_weights, cache):
    enc = create_encoder(TINY, str(tiny_weights))
    first = rt.ensure_export(enc, 16)
    assert first.exported and first.path.parent == cache / "onnx" and first.path.suffix == ".onnx"
    check = rt.tolerance("onnx", first, enc)
    assert check["passed"] and check["min_cosine"] > 0.999 and check["median_cosine"] >= check["min_cosine"]
    again = rt.ensure_export(create_encoder(TINY, str(tiny_weights)), 16)
    assert not again.exported and again.path == first.path
    side = json.loads(again.sidecar.read_text())
    assert side["tolerance"][rt.runtime_identity("onnx")]["min_cosine"] == check["min_cosine"]
    assert side["fields"]["batch"] == 16 and side["fields"]["weights_sha256"] == enc.weights_sha256
    # Another batch size or input size is another graph.
    assert rt.ensure_export(enc, 8).path != first.path
    assert [p.name for p in (cache / "onnx").iterdir() if p.name.startswith(".")] == []  # no temp file left


def test_a_damaged_cached_graph_is_exported_again(tiny_weights):
    enc = create_encoder(TINY, str(tiny_weights))
    first = rt.ensure_export(enc, 16)
    good = first.path.read_bytes()
    first.path.write_bytes(good[: len(good) // 2])  # a partial write
    again = rt.ensure_export(enc, 16)
    assert again.exported and again.path.read_bytes() == good
    first.path.write_bytes(b"x" * len(good))  # same size, other bytes
    assert rt.ensure_export(enc, 16).exported and first.path.read_bytes() == good


def test_onnx_and_openvino_agree_with_torch_on_real_cells(tiny_weights):
    from cytostore.embed import Embedder

    enc = create_encoder(TINY, str(tiny_weights))
    px = _real_crops(40, enc.input_size)
    out = {}
    for name in ("torch", "onnx", "openvino"):
        emb = Embedder(create_encoder(TINY, str(tiny_weights)), "cpu", 16, "auto", name)
        out[name] = np.concatenate([emb(px[i:i + 16]) for i in range(0, len(px), 16)])
        assert emb.runtime == name and (emb.check is None) == (name == "torch")
    for name in ("onnx", "openvino"):
        cos = rt.cosine_rows(out["torch"], out[name])
        assert cos.min() > 0.999, (name, cos.min())
    # Padding: a cell's embedding does not depend on the batch it shares.
    emb = Embedder(enc, "cpu", 16, "auto", "onnx")
    assert np.array_equal(emb(px[:3]), emb(px[:16])[:3])


# -- ingest: default, provenance, refusal -------------------------------------------------
def test_default_on_cpu_is_onnx_with_its_check_recorded(tiny_weights, tmp_path):
    store = tmp_path / "store"
    rows = sample_rows(["chula-27"])
    report = ingest(open_source(_manifest(tmp_path, "a", rows[:10])), store, _config(tiny_weights))
    assert report.cells_added == 10
    prov = CellStore.open(store).provenance()
    assert prov["identity"]["compute"]["runtime"] == rt.runtime_identity("onnx")
    assert prov["runtime_check"]["min_cosine"] >= RUNTIME_MIN_COSINE
    # The table's runtime is what auto keeps: an identical re-run and an append are accepted.
    more = ingest(open_source(_manifest(tmp_path, "b", rows[:20])), store, _config(tiny_weights))
    assert (more.cells_added, more.cells_skipped) == (10, 10)


def test_onnx_rows_join_a_torch_table_only_within_tolerance(tiny_weights, tmp_path, monkeypatch):
    store = tmp_path / "store"
    rows = sample_rows(["chula-27"])
    ingest(open_source(_manifest(tmp_path, "a", rows[:8])), store, _config(tiny_weights, runtime="torch"))
    version = CellStore.open(store).dataset().version
    # auto on a torch table keeps torch (a table of one runtime, bit-identical resumes).
    same = ingest(open_source(_manifest(tmp_path, "a", rows[:8])), store, _config(tiny_weights))
    assert same.cells_skipped == 8 and CellStore.open(store).dataset().version == version
    # A measured tolerance below the threshold (the cosines the check computes, lowered).
    real = rt.cosine_rows
    monkeypatch.setattr(rt, "cosine_rows", lambda a, b: real(a, b) - 0.01)
    with pytest.raises(ProvenanceError, match=r"--runtime torch") as e:
        ingest(open_source(_manifest(tmp_path, "b", rows[8:16])), store, _config(tiny_weights, runtime="onnx"))
    assert "below the threshold" in str(e.value) and "min cosine 0.99" in str(e.value)
    assert CellStore.open(store).count() == 8 and CellStore.open(store).dataset().version == version
    # Only the lowered cosine is put back: monkeypatch.undo() would also undo the cache fixture's
    # CYTOSTORE_CACHE, and the rmtree below would then hit another (or the user's) cache.
    monkeypatch.setattr(rt, "cosine_rows", real)
    shutil.rmtree(rt.cache_dir())  # the failing check was cached with the graph: measure again
    ok = ingest(open_source(_manifest(tmp_path, "b", rows[8:16])), store, _config(tiny_weights, runtime="onnx"))
    assert ok.cells_added == 8 and any("runtime_joins" in n for n in ok.notes), ok.notes
    prov = CellStore.open(store).provenance()
    assert prov["identity"]["compute"]["runtime"] == "torch"  # the table's identity is unchanged
    (join,) = prov["runtime_joins"]
    assert join["runtime"] == rt.runtime_identity("onnx") and join["passed"] and join["min_cosine"] >= 0.9999


def test_torch_rows_are_refused_by_an_onnx_table_whose_check_failed(tiny_weights, tmp_path, monkeypatch):
    store = tmp_path / "store"
    rows = sample_rows(["chula-27"])
    real = rt.cosine_rows
    monkeypatch.setattr(rt, "cosine_rows", lambda a, b: real(a, b) - 0.01)
    ingest(open_source(_manifest(tmp_path, "a", rows[:8])), store, _config(tiny_weights, runtime="onnx"))
    assert CellStore.open(store).provenance()["runtime_check"]["min_cosine"] < RUNTIME_MIN_COSINE
    with pytest.raises(ProvenanceError, match=r"--runtime onnx"):
        ingest(open_source(_manifest(tmp_path, "b", rows[8:12])), store, _config(tiny_weights, runtime="torch"))


def test_auto_falls_back_to_torch_when_the_check_fails(tiny_weights, tmp_path, monkeypatch):
    real = rt.cosine_rows
    monkeypatch.setattr(rt, "cosine_rows", lambda a, b: real(a, b) - 0.01)
    report = ingest(open_source(_manifest(tmp_path, "a", sample_rows(["chula-27"])[:6])), tmp_path / "s",
                    _config(tiny_weights))
    assert any("PyTorch runs the encoder" in n for n in report.notes), report.notes
    assert CellStore.open(tmp_path / "s").provenance()["identity"]["compute"]["runtime"] == "torch"


def test_input_size_is_identity(tiny_weights, tmp_path):
    store = tmp_path / "store"
    rows = sample_rows(["chula-27"])
    ingest(open_source(_manifest(tmp_path, "a", rows[:6])), store, _config(tiny_weights, input_size=96))
    prov = CellStore.open(store).provenance()
    assert prov["identity"]["preprocessing"]["input_size"] == 96
    with pytest.raises(ProvenanceError, match=r"input_size: table has 96"):
        ingest(open_source(_manifest(tmp_path, "b", rows[6:10])), store, _config(tiny_weights))


# -- resume and laziness -------------------------------------------------------------------
@pytest.mark.parametrize("runtime", ["onnx", "openvino"])
def test_resume_with_a_runtime_is_bit_identical(runtime, tiny_weights, tmp_path):
    manifest = _manifest(tmp_path, "m", sample_rows(SMALL_FIELDS[:2]))
    cfg = _config(tiny_weights, runtime=runtime, commit_rows=32)

    def abort(cells, images, report):
        if report.cells_added >= 64:  # after the second commit
            raise KeyboardInterrupt

    with pytest.raises(IngestInterrupted):
        ingest(open_source(manifest), tmp_path / "resumed", cfg, progress=abort)
    kept = CellStore.open(tmp_path / "resumed").count()
    again = ingest(open_source(manifest), tmp_path / "resumed", cfg)
    assert again.cells_skipped == kept and again.cells_added > 0
    ingest(open_source(manifest), tmp_path / "whole", cfg)
    a, b = _by_key(tmp_path / "resumed"), _by_key(tmp_path / "whole")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    prov = CellStore.open(tmp_path / "resumed").provenance()
    assert prov["identity"]["compute"]["runtime"] == rt.runtime_identity(runtime)


def test_a_rerun_with_nothing_to_embed_builds_no_encoder(tiny_weights, tmp_path, monkeypatch):
    import cytostore.encoders.lazy as lazy

    built = []
    real = lazy.create_encoder

    def counting(name, weights=None):
        built.append(name)
        return real(name, weights)

    monkeypatch.setattr(lazy, "create_encoder", counting)
    manifest = _manifest(tmp_path, "m", sample_rows(["chula-27"])[:12])
    ingest(open_source(manifest), tmp_path / "s", _config(tiny_weights))
    assert built == [TINY]
    built.clear()
    again = ingest(open_source(manifest), tmp_path / "s", _config(tiny_weights))
    assert (again.cells_added, again.cells_skipped) == (0, 12) and built == []
    # Something new to embed: built once, and its weights are checked against the digest.
    more = ingest(open_source(_manifest(tmp_path, "n", sample_rows(["chula-27"])[:16])), tmp_path / "s",
                  _config(tiny_weights))
    assert more.cells_added == 4 and built == [TINY]


def test_a_weights_file_changed_in_place_is_never_trusted(tiny_weights, tmp_path):
    import timm
    import torch
    from safetensors.torch import save_file

    weights = tmp_path / "w.safetensors"
    shutil.copy(tiny_weights, weights)
    manifest = _manifest(tmp_path, "m", sample_rows(["chula-27"])[:6])
    ingest(open_source(manifest), tmp_path / "s", _config(weights))
    st = weights.stat()
    torch.manual_seed(1)
    other = timm.create_model(TINY, num_classes=0)
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(weights))
    assert weights.stat().st_size == st.st_size
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))  # same path, size and mtime: the digest is stale
    with pytest.raises(EncoderError, match="weights changed"):
        ingest(open_source(_manifest(tmp_path, "n", sample_rows(["chula-27"])[:10])), tmp_path / "s",
               _config(weights))
    assert CellStore.open(tmp_path / "s").count() == 6
    # The stale digest is gone: the next run hashes the new weights and is refused by the table.
    with pytest.raises(ProvenanceError, match="weights_sha256"):
        ingest(open_source(_manifest(tmp_path, "n", sample_rows(["chula-27"])[:10])), tmp_path / "s",
               _config(weights))


# -- CLI ----------------------------------------------------------------------------------
def _cli(tmp_path, tiny_weights, *extra):
    from cli.main import app

    manifest = _manifest(tmp_path, "m", sample_rows(["chula-27"])[:4])
    return runner.invoke(app, ["ingest", str(manifest), "--store", str(tmp_path / "s"), "--encoder", TINY,
                               "--weights", str(tiny_weights), "--device", "cpu", "--batch-size", "4", *extra])


def test_cli_refuses_an_unknown_precision(tmp_path, tiny_weights):
    res = _cli(tmp_path, tiny_weights, "--precision", "fp8")
    assert res.exit_code == 2, res.output
    assert "fp8" in res.output and "fp32" in res.output and "bf16" in res.output


def test_cli_runtime_without_onnxruntime_names_the_extra(tmp_path, tiny_weights, monkeypatch):
    real_import = builtins.__import__

    def no_runtimes(name, *args, **kw):
        if name.split(".")[0] in ("onnxruntime", "openvino"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kw)

    monkeypatch.setattr(builtins, "__import__", no_runtimes)
    res = _cli(tmp_path, tiny_weights, "--runtime", "onnx")
    assert res.exit_code == 2, res.output
    assert "pip install 'cytostore[cpu]'" in res.output and "--runtime torch" in res.output
    # auto falls back to PyTorch.
    res = _cli(tmp_path, tiny_weights, "--json")
    assert res.exit_code == 0, res.output
    assert CellStore.open(tmp_path / "s").provenance()["identity"]["compute"]["runtime"] == "torch"


def test_cli_threads_and_input_size(tmp_path, tiny_weights):
    res = _cli(tmp_path, tiny_weights, "--runtime", "onnx", "--threads", "1", "--input-size", "64", "--json")
    assert res.exit_code == 0, res.output
    prov = CellStore.open(tmp_path / "s").provenance()
    assert prov["identity"]["preprocessing"]["input_size"] == 64
    assert prov["preprocessing"]["resize"].startswith("64x64")


@pytest.mark.gpu
def test_auto_on_a_gpu_is_torch_bf16_channels_last(tiny_weights):
    import torch

    from cytostore.embed import Embedder

    emb = Embedder(create_encoder(TINY, str(tiny_weights)), "cuda", 8, "auto", "auto")
    assert emb.runtime == "torch" and emb.precision in ("bf16", "fp16")
    out = emb(np.zeros((3, emb.encoder.input_size, emb.encoder.input_size, 3), np.uint8))
    assert out.shape == (3, emb.encoder.dim) and np.isfinite(out).all()
    assert next(emb.model.parameters()).is_cuda and torch.backends.cudnn.benchmark is False


def test_image_queries_use_the_tables_input_size(tmp_path):
    from types import SimpleNamespace

    from cytostore.fewshot.support import load_table_encoder
    from cytostore.search import embed_image

    rows = sample_rows(["chula-27"])[:12]
    store = tmp_path / "s"
    ingest(open_source(_manifest(tmp_path, "m", rows)), store, IngestConfig(input_size=96, batch_size=16))
    cells = CellStore.open(store)
    table = cells.resolve()
    assert load_table_encoder(cells.provenance(table), table).input_size == 96
    r = rows[5]
    vec, _ = embed_image(SimpleNamespace(dataset=cells.dataset(table), table=table), r["image"],
                         float(r["x"]), float(r["y"]))
    stored = _by_key(store)[(r["slide_id"], f"{r['x']}_{r['y']}")].astype(np.float32)
    # Resized as the table was (96 px, not the encoder's 224): the same numbers as the stored cell.
    assert rt.cosine_rows(vec[None], stored[None])[0] > 0.999
