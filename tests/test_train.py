"""`cytostore encoders train`: encoders adapted from the store's cells, found by name from any
directory, evaluated only on slides they never saw; `cytostore encoders list`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from conftest import TINY, sample_rows, write_manifest

runner = CliRunner()
QUICK = ["--base", TINY, "--input-size", "64", "--epochs", "1", "--batch-size", "64", "--views", "2",
         "--max-cells", "256", "-q"]
FIELDS = ["chula-1", "chula-27", "chula-255", "chula-247", "chula-329", "chula-656"]  # 578 real cells


def _last_json(result) -> dict:
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cytostore_home")


@pytest.fixture(autouse=True)
def _user_home(home, monkeypatch):
    # Trained encoders are registered under $CYTOSTORE_HOME: never the real home in tests.
    monkeypatch.setenv("CYTOSTORE_HOME", str(home))


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory, tiny_weights, home) -> Path:
    """Six real fields of the bundled sample embedded with the tiny encoder."""
    from cytostore import IngestConfig, ingest, open_source

    path = tmp_path_factory.mktemp("stores") / "tiny"
    ingest(open_source(_manifest(tmp_path_factory)), path, IngestConfig(encoder=TINY, weights=str(tiny_weights),
                                                                        batch_size=64))
    return path


def _manifest(tmp_path_factory) -> Path:
    path = tmp_path_factory.getbasetemp() / "train_fields.csv"
    if not path.is_file():
        write_manifest(sample_rows(FIELDS), path)
    return path


@pytest.fixture(scope="module")
def ssl_encoder(tmp_path_factory, tiny_store, tiny_weights, home) -> tuple[Path, dict]:
    """A self-supervised encoder trained (through the CLI) on a copy of the tiny store."""
    import os

    store = tmp_path_factory.mktemp("ssl") / "store"
    shutil.copytree(tiny_store, store)
    old = os.environ.get("CYTOSTORE_HOME")
    os.environ["CYTOSTORE_HOME"] = str(home)
    try:
        res = _train(store, "cells-ssl", tiny_weights)
    finally:
        os.environ.pop("CYTOSTORE_HOME") if old is None else os.environ.__setitem__("CYTOSTORE_HOME", old)
    assert res.exit_code == 0, res.output
    return store, _last_json(res)


def _copy(store: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "store"
    shutil.copytree(store, dst)
    return dst


def _train(store: Path, name: str, tiny_weights: Path, *extra: str):
    return runner.invoke(app, ["encoders", "train", "--store", str(store), "--name", name, "--base-weights",
                               str(tiny_weights), *QUICK, *extra, "--json"])


def test_ssl_encoder_changes_weights_keeps_dim_and_round_trips_through_ingest(ssl_encoder, tiny_weights, home,
                                                                               tmp_path, tmp_path_factory, monkeypatch):
    from safetensors.torch import load_file

    from cytostore.encoders import create_encoder
    from cytostore.store import CellStore

    store, rep = ssl_encoder
    base = create_encoder(TINY, tiny_weights)
    assert rep["recipe"] == "cpu-ssl" and rep["dim"] == base.dim and rep["input_size"] == 64
    assert rep["weights_sha256"] != base.weights_sha256
    assert Path(rep["folder"]) == home / "encoders" / "cells-ssl" and Path(rep["store_copy"]).is_dir()
    # Only the last stages moved: the trunk's convolutions are the base's, the head's are not.
    new, old = load_file(str(Path(rep["folder"]) / "model.safetensors")), base.model.state_dict()
    assert torch.equal(new["conv_stem.weight"], old["conv_stem.weight"])
    assert not torch.equal(new["conv_head.weight"], old["conv_head.weight"])

    # Found by name from another directory; its table's provenance names the training table and cells.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    res = runner.invoke(app, ["ingest", str(_manifest(tmp_path_factory)), "--store", str(store), "--encoder",
                              "cells-ssl", "--json"])
    assert res.exit_code == 0, res.output
    s = CellStore.open(store)
    assert "cells-ssl" in s.tables() and s.count("cells-ssl") == s.count(TINY)
    enc = s.provenance("cells-ssl")["encoder"]
    assert enc["weights_sha256"] == rep["weights_sha256"] == s.provenance("cells-ssl")["identity"]["encoder"][
        "weights_sha256"]
    training = enc["trained"]["training"]
    assert training["table"] == TINY and training["table_version"] == rep["training"]["table_version"]
    assert training["cells_digest"] == rep["training"]["cells_digest"] and training["labels"] is None
    assert s.embeddings("cells-ssl")[0].shape[1] == base.dim

    # `encoders list` shows the encoder, its table, and (after evaluate) the stored evaluation.
    res = runner.invoke(app, ["evaluate", "--store", str(store), "--tables", f"{TINY},cells-ssl", "--folds", "3",
                              "--ways", "2", "--shots", "2", "--queries", "3", "--episodes", "5", "-q", "--json"])
    assert res.exit_code == 0, res.output
    assert len(_last_json(res)["saved"]) == 2
    res = runner.invoke(app, ["encoders", "list", "--store", str(store), "--json"])
    assert res.exit_code == 0, res.output
    rows = {r["name"]: r for r in _last_json(res)["encoders"]}
    mine = rows["cells-ssl"]
    assert mine["kind"] == "trained" and [t["table"] for t in mine["tables"]] == ["cells-ssl"]
    ev = mine["tables"][0]["evaluation"]
    assert ev["compared_with"] == sorted([TINY, "cells-ssl"]) and 0 <= ev["linear_probe"]["accuracy"] <= 1
    assert "accuracy" in ev["fewshot_2way2shot"]
    assert rows[TINY]["kind"] == "other" and rows[TINY]["tables"][0]["evaluation"] is not None
    text = runner.invoke(app, ["encoders", "list", "--store", str(store)])
    assert "cells-ssl" in text.stdout and "probe acc" in text.stdout


def test_supervised_encoder_is_scored_only_on_slides_it_never_saw(tiny_store, tiny_weights, tmp_path,
                                                                    tmp_path_factory):
    from cytostore.store import CellStore

    store = _copy(tiny_store, tmp_path)
    res = _train(store, "cells-sup", tiny_weights, "--labels", "label", "--holdout", "0.5")
    assert res.exit_code == 0, res.output
    rep = _last_json(res)
    trained, held = set(rep["training_groups"]), set(rep["held_out_groups"])
    assert rep["recipe"] == "cpu-supervised" and trained and held and not trained & held
    all_groups = set(CellStore.open(store).cells(columns=["slide_id"]).column("slide_id").to_pylist())
    assert trained | held == all_groups
    res = runner.invoke(app, ["ingest", str(_manifest(tmp_path_factory)), "--store", str(store), "--encoder",
                              "cells-sup", "-q", "--json"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["evaluate", "--store", str(store), "--folds", "2", "--ways", "2", "--shots", "2",
                              "--queries", "3", "--episodes", "5", "-q", "--json"])
    assert res.exit_code == 0, res.output
    out = _last_json(res)
    assert set(out["tables"]) == {TINY, "cells-sup"}  # every labelled table, both on the held-out cells
    scored = set(out["held_out"]["scored_groups"])
    assert scored and not scored & trained and scored <= held
    assert out["held_out"]["tables"]["cells-sup"]["cells_digest"] == rep["training"]["cells_digest"]
    assert out["tables"][TINY]["n_cells"] == out["tables"]["cells-sup"]["n_cells"] == out["n_cells"]
    # The baseline alone is scored on every slide.
    alone = runner.invoke(app, ["evaluate", "--store", str(store), "--tables", TINY, "--folds", "2", "--ways", "2",
                                "--shots", "2", "--queries", "3", "--episodes", "5", "-q", "--no-save", "--json"])
    assert set(_last_json(alone)["held_out"]["scored_groups"]) == all_groups


def test_groups_merged_with_a_training_group_are_never_scored():
    from cytostore.evaluate.heldout import restrict_to_held_out

    class FakeStore:  # only the provenance a trained table carries
        def provenance(self, table):
            if table == "plain":
                return {"encoder": {"name": "lite"}}
            return {"encoder": {"name": "sup", "trained": {"training": {
                "labels": "label", "group": "slide_id", "groups": ["a"], "cells_digest": "sha256:x"}}}}

    groups = np.array(["a", "a", "b", "c", "c", "d"], dtype=object)
    merged = np.array(["a", "a", "b", "a", "a", "d"], dtype=object)  # c holds a copy of a's field
    cells = {"uid": np.arange(6), "label": np.array(list("xyxyxy"), dtype=object), "group": groups}
    keep, rec = restrict_to_held_out(FakeStore(), ["plain", "sup"], cells, merged, "slide_id", lambda t, c: None)
    assert keep.tolist() == [False, False, True, False, False, True]
    assert rec["cells_excluded"] == 4 and list(rec["tables"]) == ["sup"]
    keep, rec = restrict_to_held_out(FakeStore(), ["plain"], cells, merged, "slide_id", lambda t, c: None)
    assert keep.all() and rec["cells_excluded"] == 0


def test_bad_taken_or_missing_inputs_exit_2(tiny_store, tiny_weights, home, tmp_path):
    (home / "encoders" / "taken").mkdir(parents=True, exist_ok=True)
    for name, extra, says in (("bad/name", [], "not valid"), ("taken", [], "exists already"),
                              ("efficientnet_lite0", [], "bundled"), ("resnet18", [], "timm architecture"),
                              ("fine", ["--labels", "no_such_column"], "no column 'no_such_column'"),
                              ("fine", ["--table", "nope"], "no table"),
                              ("fine", ["--recipe", "tpu"], "unknown recipe")):
        res = _train(tiny_store, name, tiny_weights, *extra)
        assert res.exit_code == 2, (name, extra, res.output)
        assert says in res.stderr, (says, res.stderr)
    assert not (home / "encoders" / "fine").exists()


def test_trained_encoder_with_altered_weights_is_refused(ssl_encoder, tmp_path):
    from safetensors.torch import load_file, save_file

    from cytostore.encoders import create_encoder
    from cytostore.errors import EncoderError

    _, rep = ssl_encoder
    assert create_encoder("cells-ssl").extra["trained"]["recipe"] == "cpu-ssl"
    assert create_encoder(rep["store_copy"]).name == "cells-ssl"  # the store's copy, by its path
    folder = tmp_path / "altered"
    shutil.copytree(rep["folder"], folder)
    state = load_file(str(folder / "model.safetensors"))
    state["conv_head.weight"] = state["conv_head.weight"] * 2
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(EncoderError, match="differs from the one recorded"):
        create_encoder(str(folder))


@pytest.mark.gpu
def test_gpu_recipe_trains_the_whole_network(tiny_store, tiny_weights, tmp_path):
    from cytostore.encoders import create_encoder

    store = _copy(tiny_store, tmp_path)
    res = _train(store, "cells-gpu", tiny_weights, "--recipe", "gpu")
    assert res.exit_code == 0, res.output
    rep = _last_json(res)
    enc, base = create_encoder("cells-gpu"), create_encoder(TINY, tiny_weights)
    assert rep["recipe"] == "gpu-ssl" and enc.dim == base.dim
    assert not torch.equal(enc.model.conv_stem.weight, base.model.conv_stem.weight)  # the trunk trained too
