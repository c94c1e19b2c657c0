"""Ingest end to end on real cells: store layout, provenance, idempotence, bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image
from typer.testing import CliRunner

from cli.main import app
from conftest import SAMPLE, SHARED_DATA, sample_rows, write_manifest
from cytostore import CellStore, IngestConfig, ProvenanceError, StoreError, ingest, open_source
from cytostore.keys import cell_uid

runner = CliRunner()


def _json_line(result) -> dict:
    import json

    return json.loads(result.stdout.strip().splitlines()[-1])


def test_store_holds_every_cell_with_labels_provenance_and_float16(small_store, small_manifest):
    store = CellStore.open(small_store)
    rows = list(open_source(small_manifest))
    n = sum(len(t.cells) for t in rows)
    assert store.tables() == ["efficientnet_lite0"]
    cells = store.cells()
    assert cells.num_rows == n == 360
    assert "embedding" not in cells.column_names and "class_id" in cells.column_names
    assert set(cells.column("slide_id").to_pylist()) == {"chula-1", "chula-27", "chula-255"}
    # The key is unique and uid is derived from it.
    keys = list(zip(cells.column("slide_id").to_pylist(), cells.column("cell_id").to_pylist()))
    assert len(set(keys)) == n
    assert cells.column("uid").to_pylist() == [cell_uid(s, c) for s, c in keys]
    prov = store.provenance()
    assert prov["encoder"]["name"] == "efficientnet_lite0" and len(prov["encoder"]["weights_sha256"]) == 64
    assert prov["embedding_dtype"] == "float16" and prov["preprocessing"]["crop_size"] == 64
    assert prov["schema_version"] == 2 and "torch" in prov["versions"] and len(prov["identity_sha256"]) == 64
    emb, keys_t = store.embeddings()
    assert emb.dtype == np.float16 and emb.shape == (n, 1280) and np.isfinite(emb).all()
    assert not emb.flags.writeable  # a view on the Arrow buffer, not a copy
    assert keys_t.num_rows == n
    t, _ = store.to_torch(where="label = 'normal'")
    assert t.shape[1] == 1280 and t.shape[0] == store.count(where="label = 'normal'")
    # Different cells get different embeddings; the same label tends to be closer.
    assert np.unique(emb[:50].astype(np.float32), axis=0).shape[0] == 50


def test_thumbnails_decode(small_store):
    from cytostore.imaging import decode_thumbnail

    t = CellStore.open(small_store).cells(columns=["thumbnail"], where="cell_id = '594_95'")
    assert decode_thumbnail(t.column("thumbnail")[0].as_py()).shape == (64, 64, 3)


def test_second_ingest_adds_nothing(small_store, small_manifest, tmp_path):
    path = tmp_path / "store"
    shutil.copytree(small_store, path)
    before = CellStore.open(path).dataset().version
    report = ingest(open_source(small_manifest), path, IngestConfig(batch_size=32))
    assert (report.cells_added, report.cells_skipped, report.cells_failed) == (0, 360, 0)
    assert CellStore.open(path).count() == 360
    assert CellStore.open(path).dataset().version == before


def test_other_provenance_is_refused_with_what_differs(small_store, small_manifest, tmp_path):
    path = tmp_path / "store"
    shutil.copytree(small_store, path)
    with pytest.raises(ProvenanceError, match="crop_size: table has 64, this run has 48"):
        ingest(open_source(small_manifest), path, IngestConfig(crop=__import__("cytostore").CropPolicy(crop_size=48)))
    res = runner.invoke(app, ["ingest", str(small_manifest), "--store", str(path), "--float32"])
    assert res.exit_code == 2 and "embedding_dtype" in res.stderr
    assert CellStore.open(path).count() == 360


def test_cli_ingest_info_and_bad_inputs(tmp_path):
    rows = sample_rows(["chula-27"])[:20]
    good = rows[0]["image"]
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image")
    data = Path(good).read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 3])
    bad = [
        {**rows[0], "image": str(tmp_path / "empty.jpg"), "slide_id": "e"},
        {**rows[0], "image": str(tmp_path / "text.jpg"), "slide_id": "t"},
        {**rows[0], "image": str(tmp_path / "truncated.jpg"), "slide_id": "tr"},
        {**rows[0], "image": str(tmp_path / "missing.jpg"), "slide_id": "m"},
        {**rows[1], "x": "5000", "y": "10", "cell_id": "outside"},
        {**rows[1], "x": "oops", "cell_id": "nan"},
    ]
    manifest = write_manifest(rows + bad, tmp_path / "m.csv")
    store = tmp_path / "store"
    res = runner.invoke(app, ["ingest", str(manifest), "--store", str(store), "--batch-size", "8", "--json"])
    assert res.exit_code == 1, res.output
    out = _json_line(res)
    assert out["cells_added"] == 20 and out["cells_failed"] == 6 and out["slides"] >= 1
    for key in ("cells_skipped", "seconds"):
        assert key in out
    info = runner.invoke(app, ["info", "--store", str(store), "--json"])
    assert info.exit_code == 0
    summary = _json_line(info)
    assert summary["cells"] == 20 and summary["failures"] == 6 and summary["tables"][0]["name"] == "efficientnet_lite0"
    assert summary["tables"][0]["provenance"]["encoder"]["dim"] == 1280
    reasons = " | ".join(f"{f['where']}: {f['reason']}" for f in summary["failure_list"])
    for needle in ("empty.jpg", "text.jpg", "truncated.jpg", "missing.jpg", "outside the", "not a number"):
        assert needle in reasons
    # A second run retries the failures without duplicating their records.
    res2 = runner.invoke(app, ["ingest", str(manifest), "--store", str(store), "--json"])
    assert res2.exit_code == 1 and _json_line(res2)["cells_added"] == 0
    assert _json_line(runner.invoke(app, ["info", "--store", str(store), "--json"]))["failures"] == 6
    human = runner.invoke(app, ["info", "--store", str(store)])
    assert "failures: 6" in human.stdout


def test_opening_a_missing_store_says_how_to_make_one(tmp_path):
    with pytest.raises(StoreError, match="cytostore ingest"):
        CellStore.open(tmp_path / "nothing")
    res = runner.invoke(app, ["info", "--store", str(tmp_path / "nothing")])
    assert res.exit_code == 2 and "not a cytostore store" in res.stderr


def test_encoders_command():
    res = runner.invoke(app, ["encoders", "--json"])
    enc = _json_line(res)["encoders"]
    assert enc[0]["name"] == "efficientnet_lite0" and enc[0]["dim"] == 1280 and enc[0]["weights_present"]


def test_crop_folder_ingest_with_float32(tmp_path):
    for label in ("a", "b"):
        (tmp_path / "crops" / label).mkdir(parents=True)
        for i in range(3):
            arr = np.random.default_rng(i).integers(0, 255, (48, 40, 3), dtype=np.uint8)
            Image.fromarray(arr).save(tmp_path / "crops" / label / f"{i}.png")
    res = runner.invoke(app, ["ingest", str(tmp_path / "crops"), "--format", "crops", "--labels-from-folders",
                              "--store", str(tmp_path / "s"), "--float32", "--json"])
    assert res.exit_code == 0, res.output
    store = CellStore.open(tmp_path / "s")
    emb, _ = store.embeddings()
    assert emb.dtype == np.float32 and emb.shape == (6, 1280)
    assert sorted(store.cells(columns=["label"]).column("label").to_pylist()) == ["a"] * 3 + ["b"] * 3


@pytest.mark.skipif(not (SHARED_DATA / "chula-rbc-diseases").is_dir(), reason="../shared/data absent")
def test_fields_without_coordinates_use_the_detector(tmp_path):
    for diag in ("hs", "thalassemia"):
        (tmp_path / "fields" / diag).mkdir(parents=True)
        first = sorted((SHARED_DATA / "chula-rbc-diseases" / diag).glob("*.JPG"))[0]
        shutil.copy(first, tmp_path / "fields" / diag)
    res = runner.invoke(app, ["ingest", str(tmp_path / "fields"), "--format", "fields", "--labels-from-folders",
                              "--store", str(tmp_path / "s"), "--json"])
    assert res.exit_code == 0, res.output
    cells = CellStore.open(tmp_path / "s").cells(columns=["slide_id", "slide_label", "x0", "crop_size"])
    per_slide = pa.TableGroupBy(cells, "slide_label").aggregate([("slide_id", "count")]).to_pylist()
    assert {d["slide_label"] for d in per_slide} == {"hs", "thalassemia"}
    assert all(d["slide_id_count"] >= 20 for d in per_slide)
    assert cells.column("x0").null_count == 0


def test_whole_slide_cells_are_read_at_level0(tmp_path):
    svs = Path(__file__).parent / "data" / "cmu_small_region.svs"
    rows = [{"image": str(svs), "slide_id": "cmu", "x": x, "y": y, "label": "tissue"}
            for x, y in [(500, 500), (1500, 2000), (2200, 2900), (10, 10)]]
    rows.append({"image": str(svs), "slide_id": "cmu", "x": 99999, "y": 10, "label": "tissue"})
    res = runner.invoke(app, ["ingest", str(write_manifest(rows, tmp_path / "m.csv")), "--store",
                              str(tmp_path / "s"), "--json"])
    assert res.exit_code == 1  # the cell outside the slide is a failure; the rest is stored
    out = _json_line(res)
    assert out["cells_added"] == 4 and out["cells_failed"] == 1
    cells = CellStore.open(tmp_path / "s").cells(columns=["image", "crop_size"])
    assert set(cells.column("image").to_pylist()) == {str(svs)}
