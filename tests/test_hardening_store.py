"""Hardening of the store and query side: filters, finiteness, query vectors, MIL classes,
damaged files, schema changes, checksums (`store check`) and injected faults."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cli.main import app
from cytostore import CellStore
from cytostore.errors import InputError
from cytostore.store.filters import MAX_FILTER_CHARS, MAX_FILTER_TERMS, check_where

runner = CliRunner()
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture()
def store_copy(small_store, tmp_path) -> Path:
    """A writable copy of the small store (360 real cells, default encoder)."""
    path = tmp_path / "store"
    shutil.copytree(small_store, path)
    return path


# -- filters -------------------------------------------------------------------------
@pytest.mark.parametrize("bad, says", [
    ("1=1; DROP TABLE cells", "';'"),
    ("slide_id = 'chula-1') OR (1=1", "without its '('"),
    ("(slide_id = 'chula-1'", "never closed"),
    ("slide_id = 'chula-1", "never closes"),
    ("slide_id = 'chula-1' -- AND label = 'x'", "comment"),
])
def test_a_malformed_where_is_refused_everywhere_with_exit_2(store_copy, tmp_path, bad, says):
    vec = tmp_path / "q.npy"
    np.save(vec, np.ones(1280, np.float32))
    for args in (["search", "--store", str(store_copy), "--vector", str(vec), "--where", bad, "--json"],
                 ["store", "delete", "--store", str(store_copy), "--where", bad, "--json"]):
        res = runner.invoke(app, args)
        assert res.exit_code == 2, (args[0], res.output)
        assert says in res.output
    with pytest.raises(InputError, match=re.escape(says)):
        CellStore.open(store_copy).cells(columns=["uid"], where=bad)
    assert CellStore.open(store_copy).count() == 360  # nothing deleted


def test_quotes_keep_their_text_and_valid_filters_pass(store_copy):
    ok = "slide_id = 'chula-1' AND (label != 'a;b' OR label = 'it''s (x')"
    assert check_where(ok) == ok
    assert CellStore.open(store_copy).count(where="slide_id IN ('chula-1', 'chula-27')") > 0


def test_too_many_terms_or_characters_are_refused(store_copy):
    many = " OR ".join(f"uid = {i}" for i in range(MAX_FILTER_TERMS + 1))
    with pytest.raises(InputError, match="IN"):
        CellStore.open(store_copy).count(where=many)
    with pytest.raises(InputError, match="characters"):
        check_where("uid IN (" + ",".join(["1"] * MAX_FILTER_CHARS) + ")")
    check_where(" OR ".join(f"uid = {i}" for i in range(MAX_FILTER_TERMS)))  # at the limit: fine


def test_100000_or_terms_do_not_crash_the_process(store_copy, tmp_path):
    # Before the validator Lance's planner segfaulted on this filter (exit -11).
    code = ("import sys, numpy as np; from cytostore.search import run_search\n"
            "from cytostore.errors import InputError\n"
            "w = ' OR '.join(f\"slide_id = '{i}'\" for i in range(100000))\n"
            "try:\n  run_search(sys.argv[1], vector=np.ones(1280, np.float32), where=w)\n"
            "except InputError as e:\n  print('refused:', str(e)[:60]); sys.exit(2)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(store_copy)], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-500:])
    assert "refused" in proc.stdout


# -- finiteness of embeddings ------------------------------------------------------------
def _weights(tiny_weights: Path, path: Path, how: str) -> Path:
    """The tiny checkpoint with every float weight NaN ("nan"), or its last norm layer scaled by 10^8 ("huge")."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(tiny_weights))
    for k, v in state.items():
        if v.is_floating_point() and (how == "nan" or k.startswith("bn2.") and k.endswith(("weight", "bias"))):
            state[k] = v * float("nan") if how == "nan" else v * 1e8
    save_file(state, str(path))
    return path


def _tiny_manifest(tmp_path: Path) -> Path:
    from conftest import sample_rows, write_manifest

    return write_manifest(sample_rows(["chula-1"]), tmp_path / "m.csv")


def test_nan_weights_stop_the_run_early_and_store_nothing(tiny_weights, tmp_path):
    from conftest import TINY

    bad = _weights(tiny_weights, tmp_path / "nan.safetensors", "nan")
    store = tmp_path / "s"
    res = runner.invoke(app, ["ingest", str(_tiny_manifest(tmp_path)), "--store", str(store), "--encoder", TINY,
                              "--weights", str(bad), "--device", "cpu", "--batch-size", "16", "--json"])
    assert res.exit_code == 2, res.output
    assert "broken" in res.output and "NaN" in res.output and "16 of the 16" in res.output
    s = CellStore.open(store)
    assert not s.tables() or s.count() == 0  # no NaN embedding stored
    fails = s.failures()
    assert fails.num_rows == 16 and set(fails.column("stage").to_pylist()) == {"embed"}


def test_float16_overflow_is_refused_and_float32_stores_it(tiny_weights, tmp_path):
    from conftest import TINY

    huge = _weights(tiny_weights, tmp_path / "huge.safetensors", "huge")
    manifest = _tiny_manifest(tmp_path)
    args = ["ingest", str(manifest), "--encoder", TINY, "--weights", str(huge), "--device", "cpu",
            "--batch-size", "16", "--json"]
    res = runner.invoke(app, [*args, "--store", str(tmp_path / "f16")])
    assert res.exit_code == 2, res.output
    assert "--float32" in res.output and "65504" in res.output
    res = runner.invoke(app, [*args, "--store", str(tmp_path / "f32"), "--float32"])
    assert res.exit_code == 0, res.output
    emb, _ = CellStore.open(tmp_path / "f32").embeddings()
    assert len(emb) == 117 and np.isfinite(emb).all() and np.abs(emb).max() > 65504


def test_a_few_unusable_embeddings_are_failures_and_the_rest_is_stored(tiny_weights, tmp_path, monkeypatch):
    from conftest import TINY
    from cytostore import IngestConfig, ingest, open_source
    from cytostore.embed import Embedder

    real = Embedder.__call__
    calls = {"n": 0}

    def damaged(self, pixels):
        out = real(self, pixels)
        calls["n"] += 1
        if calls["n"] == 2:  # injected: one NaN cell and one beyond float16 in the second batch
            out[0, 3] = np.nan
            out[1, 5] = 1e6
        return out

    monkeypatch.setattr(Embedder, "__call__", damaged)
    report = ingest(open_source(_tiny_manifest(tmp_path)), tmp_path / "s",
                    IngestConfig(encoder=TINY, weights=str(tiny_weights), device="cpu", batch_size=16))
    assert report.cells_failed == 2 and report.cells_added == 115
    s = CellStore.open(tmp_path / "s")
    emb, _ = s.embeddings()
    assert len(emb) == 115 and np.isfinite(emb.astype(np.float32)).all()
    reasons = sorted(s.failures().column("reason").to_pylist())
    assert len(reasons) == 2 and "NaN" in reasons[1] and "--float32" in reasons[0]


# -- query vectors ---------------------------------------------------------------------
@pytest.mark.parametrize("scale, says", [(1e-30, "near zero"), (1e30, "overflowing")])
def test_a_near_zero_or_overflowing_query_vector_is_refused(small_store, tmp_path, scale, says):
    vec = tmp_path / "q.npy"
    np.save(vec, np.full(1280, scale, np.float32))
    res = runner.invoke(app, ["search", "--store", str(small_store), "--vector", str(vec), "--json"])
    assert res.exit_code == 2, res.output  # before: exit 0 and every score 0
    assert says in res.output and "norm" in res.output


# -- MIL models ------------------------------------------------------------------------
def test_a_mil_model_with_fewer_classes_than_outputs_is_refused(small_store, tmp_path):
    import torch

    from cytostore.mil.artifacts import feature_provenance, save_model
    from cytostore.mil.models import ModelConfig, build_model

    torch.manual_seed(0)
    cfg = ModelConfig(n_classes=3)
    store = CellStore.open(small_store)
    model = save_model(tmp_path / "m", build_model(cfg), cfg.to_dict(), ["a", "b"], {},
                       feature_provenance(store, store.resolve()), {}, {})
    res = runner.invoke(app, ["mil", "predict", "--store", str(small_store), "--model", str(model), "--json",
                              "--device", "cpu"])
    assert res.exit_code == 2, res.output  # before: exit 0, the third class silently dropped
    assert "config.json names 2 classes" in res.output and "3 outputs" in res.output


# -- damaged files: checksums, `store check`, typed errors ---------------------------------
@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory, tiny_weights, small_manifest) -> Path:
    """The small manifest (360 cells) ingested with the tiny encoder in commits of 100 rows (read-only)."""
    path = tmp_path_factory.mktemp("tiny") / "store"
    res = runner.invoke(app, tiny_ingest(small_manifest, path, tiny_weights))
    assert res.exit_code == 0, res.output
    return path


def tiny_ingest(manifest: Path, store: Path, weights: Path, *extra: str) -> list[str]:
    from conftest import TINY

    return ["ingest", str(manifest), "--store", str(store), "--encoder", TINY, "--weights", str(weights),
            "--device", "cpu", "--batch-size", "32", "--commit-rows", "100", "--json", *extra]


def data_files(store: Path) -> list[Path]:
    import lance

    uri = next(store.glob("cells.*.lance"))
    return [uri / "data" / f.path for fr in lance.dataset(str(uri)).get_fragments() for f in fr.metadata.files]


def _check(store: Path, *extra: str) -> tuple[int, dict]:
    res = runner.invoke(app, ["store", "check", "--store", str(store), "--json", *extra])
    return res.exit_code, json.loads(res.stdout.strip().splitlines()[-1])


def test_store_check_names_damaged_files_and_their_slides_and_a_rerun_repairs_them(tiny_store, tiny_weights,
                                                                                   small_manifest, tmp_path):
    store = tmp_path / "s"
    shutil.copytree(tiny_store, store)
    code, out = _check(store)
    assert code == 0 and out["damaged"] == 0 and out["verified"] == len(data_files(store)) == 4
    flipped, cut, gone = data_files(store)[:3]
    gone.unlink()
    # A missing data file is a typed error naming the file and `store check`, not a traceback (exit 3).
    res = runner.invoke(app, ["search", "--store", str(store), "--slide", "chula-1", "--cell", "0"])
    assert res.exit_code == 2 and gone.name in res.output and f"store check --store {store}" in res.output
    raw = bytearray(flipped.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one flipped bit pattern, same size
    flipped.write_bytes(bytes(raw))
    cut.write_bytes(cut.read_bytes()[:-100])
    code, out = _check(store)
    assert code == 1 and out["damaged"] == 3
    problems = {Path(d["file"]).name: d for d in out["tables"][0]["damaged"]}
    assert "corrupted" in problems[flipped.name]["problem"] and "truncated" in problems[cut.name]["problem"]
    assert problems[gone.name]["problem"] == "missing" and problems[gone.name]["rows"] == 100
    assert all(d["slides"] for d in problems.values()) and "--drop-damaged" in out["tables"][0]["fix"]
    res = runner.invoke(app, ["index", "build", "--store", str(store), "--quiet"])
    assert res.exit_code == 2 and "store check" in res.output  # a truncated file: typed too
    code, out = _check(store, "--drop-damaged")
    assert code == 1 and out["tables"][0]["dropped_rows"] == 300
    assert CellStore.open(store).count() == 60
    res = runner.invoke(app, tiny_ingest(small_manifest, store, tiny_weights))
    assert res.exit_code == 0 and json.loads(res.stdout.strip().splitlines()[-1])["cells_added"] == 300
    assert _check(store)[0] == 0
    a, b = CellStore.open(store).embeddings(), CellStore.open(tiny_store).embeddings()
    oa, ob = np.argsort(a[1].column("uid").to_numpy()), np.argsort(b[1].column("uid").to_numpy())
    assert np.array_equal(np.asarray(a[0])[oa], np.asarray(b[0])[ob])  # the same cells, bit-identical


def test_a_table_written_before_checksums_is_unverified_not_damaged(tiny_store, tmp_path):
    store = tmp_path / "s"
    shutil.copytree(tiny_store, store)
    next(store.glob("checksums.*.jsonl")).unlink()
    code, out = _check(store)
    assert code == 0 and out["unverified"] == 4 and out["damaged"] == 0
    assert "no recorded checksum" in out["tables"][0]["note"]


def test_an_index_sidecar_missing_a_key_is_a_typed_error(tiny_store, tmp_path):
    store = tmp_path / "s"
    shutil.copytree(tiny_store, store)
    assert runner.invoke(app, ["index", "build", "--store", str(store), "--quiet"]).exit_code == 0
    side = next((store / "indexes").iterdir()) / "sidecar.json"
    data = json.loads(side.read_text())
    del data["uid_digest"]
    side.write_text(json.dumps(data))
    for args in (["search", "--store", str(store), "--slide", "chula-1", "--cell", "0"],
                 ["index", "verify", "--store", str(store)]):
        res = runner.invoke(app, args)
        assert res.exit_code == 2, res.output  # before: KeyError, exit 3
        assert "uid_digest (missing)" in res.output and "index build" in res.output


# -- injected faults: abort after commit N, disk full, read-only ---------------------------
ABORT_AFTER_COMMIT = """
import os, sys
from cytostore.store import writer
real, made, n = writer.CellWriter._commit_pending, [0], int(sys.argv[1])
def commit_then_die(self):
    rows = real(self)
    if rows:
        made[0] += 1
        if made[0] == n:
            os._exit(9)  # as abrupt as SIGKILL: no clean-up, no lock release, nothing flushed
    return rows
writer.CellWriter._commit_pending = commit_then_die
sys.argv = ["cytostore", *sys.argv[2:]]
from cli.main import main
main()
"""


def assert_same_cells(store: Path, reference: Path) -> None:
    """Same keys (no duplicates) and bit-identical embeddings."""
    (ea, ka), (eb, kb) = CellStore.open(store).embeddings(), CellStore.open(reference).embeddings()
    ua, ub = ka.column("uid").to_numpy(), kb.column("uid").to_numpy()
    assert len(np.unique(ua)) == len(ua), "a cell is stored twice"
    oa, ob = np.argsort(ua), np.argsort(ub)
    assert np.array_equal(ua[oa], ub[ob])
    assert np.array_equal(np.asarray(ea)[oa], np.asarray(eb)[ob])


@pytest.mark.parametrize("commit", [2])  # every N: benchmarks/fault_campaign.py
def test_abort_after_commit_n_then_rerun_equals_an_uninterrupted_run(tiny_store, tiny_weights, small_manifest,
                                                                    tmp_path, commit):
    store = tmp_path / "s"
    proc = subprocess.run([sys.executable, "-c", ABORT_AFTER_COMMIT, str(commit),
                           *tiny_ingest(small_manifest, store, tiny_weights)], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 9, proc.stderr[-2000:]
    assert CellStore.open(store).count() == 100 * commit  # exactly the committed rows, deterministically
    assert _check(store)[0] == 0  # what was committed reads back against its checksums
    res = runner.invoke(app, tiny_ingest(small_manifest, store, tiny_weights))  # the dead writer's lock is free
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert (report["cells_skipped"], report["cells_added"]) == (100 * commit, 360 - 100 * commit)
    assert_same_cells(store, tiny_store)


@pytest.mark.parametrize("fault", [errno.ENOSPC, errno.EROFS])
def test_disk_full_or_read_only_mid_run_exits_2_and_loses_nothing(tiny_store, tiny_weights, small_manifest,
                                                                   tmp_path, monkeypatch, fault):
    import lance

    store, real, appends = tmp_path / "s", lance.write_dataset, [0]

    def failing_third_append(data, uri, *args, mode="create", **kwargs):
        if mode == "append" and "cells." in str(uri):
            appends[0] += 1
            if appends[0] == 3:
                raise OSError(fault, os.strerror(fault), str(uri))
        return real(data, uri, *args, mode=mode, **kwargs)

    monkeypatch.setattr(lance, "write_dataset", failing_third_append)
    res = runner.invoke(app, tiny_ingest(small_manifest, store, tiny_weights))
    assert res.exit_code == 2, res.output
    assert ("disk is full" if fault == errno.ENOSPC else "read-only") in res.output
    assert "kept" in res.output and "Traceback" not in res.output
    monkeypatch.setattr(lance, "write_dataset", real)
    assert CellStore.open(store).count() == 200  # the two commits before the fault are kept
    res = runner.invoke(app, tiny_ingest(small_manifest, store, tiny_weights))
    assert res.exit_code == 0, res.output
    assert_same_cells(store, tiny_store)
    assert _check(store)[0] == 0


def test_a_read_only_store_is_refused_with_exit_2_and_left_as_it_was(tiny_store, tiny_weights, tmp_path):
    from conftest import sample_rows, write_manifest

    if os.geteuid() == 0:
        pytest.skip("running as root: chmod cannot make a folder read-only (the EROFS injection covers it)")
    store = tmp_path / "s"
    shutil.copytree(tiny_store, store)
    more = write_manifest(sample_rows(["chula-2"]), tmp_path / "more.csv")
    modes = {p: p.stat().st_mode for p in [store, *store.rglob("*")]}
    for p in modes:
        p.chmod(modes[p] & ~0o222)
    try:
        res = runner.invoke(app, tiny_ingest(more, store, tiny_weights))
    finally:
        for p, m in modes.items():
            p.chmod(m)
    assert res.exit_code == 2, res.output
    assert "permission denied" in res.output or "read-only" in res.output
    assert CellStore.open(store).count() == 360 and _check(store)[0] == 0


def test_the_ray_engines_check_moves_unusable_cells_to_failures():
    import pyarrow as pa

    from cytostore.ingest.stages import drop_unstorable

    def task():
        cells = [{"uid": i, "slide_id": "s", "cell_id": str(i), "image": "f.png", "source_ref": None} for i in range(3)]
        return {"cells": cells, "failures": [], "failed_cells": 0}

    emb = np.ones((3, 4), np.float32)
    emb[0, 1], emb[2, 0] = np.nan, 7e4
    out = task()
    kept = drop_unstorable(out, emb, pa.float16())  # the Ray write task passes the table's Arrow type
    assert [c["cell_id"] for c in out["cells"]] == ["1"] and kept.shape == (1, 4)
    assert out["failed_cells"] == 2 and {f.stage for f in out["failures"]} == {"embed"}
    out = task()
    assert len(drop_unstorable(out, emb, pa.float32())) == 2  # 7e4 fits in float32


def test_a_query_npy_whose_header_claims_10_12_values_is_refused_before_reading(small_store, tmp_path):
    bomb = tmp_path / "bomb.npy"
    with open(bomb, "wb") as fh:
        np.lib.format.write_array_header_1_0(fh, {"descr": "<f4", "fortran_order": False, "shape": (10**12,)})
        fh.write(b"\0" * 64)
    res = runner.invoke(app, ["search", "--store", str(small_store), "--vector", str(bomb)])
    assert res.exit_code == 2, res.output
    assert "bomb.npy" in res.output
