"""Round trips out of the store: QuPath GeoJSON, AnnData (.h5ad), CLAM/TRIDENT .h5, DuckDB.

Every export is read back with the tool's own reader (cytostore's GeoJSON source, anndata,
h5py, DuckDB SQL) and compared with what the store holds. Stores: the three real Chula
RBC-12 fields of ``small_store`` (points), one real BCCD field ingested from its VOC
boxes (polygons), and a generated MIL store for attention (no image needed there).
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import sys
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from typer.testing import CliRunner

from cli.main import app
from conftest import SHARED_DATA
from cytostore import CellStore, IngestConfig, ingest, open_source
from cytostore.sources import ImageTask

runner = CliRunner()
BCCD_XML = SHARED_DATA / "bccd" / "Annotations" / "BloodImage_00002.xml"


def _json(res) -> dict:
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def store(small_store, tmp_path_factory) -> Path:
    """A writable copy of the 360-cell store, with a cluster prediction set ``km``."""
    dst = tmp_path_factory.mktemp("export") / "store"
    shutil.copytree(small_store, dst)
    _json(runner.invoke(app, ["cluster", "--store", str(dst), "--name", "km", "--k", "4", "--json", "-q"]))
    return dst


@pytest.fixture(scope="module")
def boxed_store(tmp_path_factory) -> Path:
    """One real BCCD field ingested from its VOC boxes: cells with x0, y0, x1, y1."""
    if not BCCD_XML.is_file():
        pytest.skip(f"real data not found: {BCCD_XML}")
    path = tmp_path_factory.mktemp("export") / "boxed"
    report = ingest(open_source(BCCD_XML, fmt="voc"), path, IngestConfig(batch_size=16))
    assert report.cells_failed == 0
    return path


def _read_back(path: Path, image: str) -> list:
    """The cells cytostore's own GeoJSON source reads from an exported file."""
    cells = []
    for item in open_source(path, fmt="geojson", image=image):
        assert isinstance(item, ImageTask), f"the source could not read {path}: {item}"
        cells.extend(item.cells)
    return cells


def _check_qupath_feature(f: dict) -> None:
    """A feature shaped as QuPath (v0.4+) writes and reads detections (PathObjectTypeAdapters)."""
    assert f["type"] == "Feature"
    uuid.UUID(f["id"])  # QuPath keeps the id only when it parses as a UUID
    geom = f["geometry"]
    if geom["type"] == "Point":
        assert len(geom["coordinates"]) == 2
    else:
        assert geom["type"] == "Polygon"
        ring = geom["coordinates"][0]
        assert len(ring) == 5 and ring[0] == ring[-1]  # a closed ring
    props = f["properties"]
    assert props["objectType"] == "detection"
    assert isinstance(props["name"], str)
    if "classification" in props:
        cls = props["classification"]
        assert isinstance(cls["name"], str) and ":" not in cls["name"]  # ':' would make a derived class
        assert len(cls["color"]) == 3 and all(isinstance(c, int) and 0 <= c <= 255 for c in cls["color"])
    for k, v in props.get("measurements", {}).items():  # read as Map<String, Double>
        assert isinstance(k, str) and isinstance(v, (int, float)) and math.isfinite(v)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in props["metadata"].items())


# -- GeoJSON -----------------------------------------------------------------------
def test_geojson_points_read_back_as_the_same_cells(store, tmp_path):
    out = tmp_path / "qupath"
    r = _json(runner.invoke(app, ["export", "geojson", "--store", str(store), "--out", str(out), "--json", "-q"]))
    cells = CellStore.open(store).cells(columns=["uid", "slide_id", "x", "y", "label", "image", "class_id"])
    assert r["cells"] == cells.num_rows == 360 and r["slides"] == 3
    for slide in ("chula-1", "chula-27", "chula-255"):
        mine = cells.filter(pa.compute.equal(cells.column("slide_id"), slide)).to_pylist()
        path = out / f"{slide}.geojson"
        data = json.loads(path.read_text())
        assert data["type"] == "FeatureCollection" and len(data["features"]) == len(mine)
        for f in data["features"]:
            _check_qupath_feature(f)
        by_uid = {int(f["properties"]["metadata"]["uid"]): f for f in data["features"]}
        for c in mine:
            f = by_uid[c["uid"]]
            assert f["id"] == str(uuid.uuid5(uuid.UUID("6f1c2a53-8d0e-4b7a-9c1e-2f4b5d6a7c80"), str(c["uid"])))
            assert f["properties"]["metadata"]["slide_id"] == slide
            assert f["properties"]["measurements"]["class_id"] == c["class_id"]  # numeric extra column
        back = _read_back(path, mine[0]["image"])
        assert Counter((b.x, b.y, b.label, b.box) for b in back) == Counter((c["x"], c["y"], c["label"], None)
                                                                            for c in mine)
    # The same store exports byte-identical files (ids and colours are deterministic).
    again = tmp_path / "again"
    _json(runner.invoke(app, ["export", "geojson", "--store", str(store), "--out", str(again), "--json", "-q"]))
    assert (again / "chula-1.geojson").read_bytes() == (out / "chula-1.geojson").read_bytes()


def test_geojson_boxes_read_back_as_the_same_boxes(boxed_store, tmp_path):
    s = CellStore.open(boxed_store)
    cells = s.cells(columns=["uid", "slide_id", "x", "y", "x0", "y0", "x1", "y1", "label", "image"]).to_pylist()
    slide = cells[0]["slide_id"]
    r = _json(runner.invoke(app, ["export", "geojson", "--store", str(boxed_store), "--out", str(tmp_path),
                                  "--slide", slide, "--json"]))
    path = Path(r["files"][0]["file"])
    data = json.loads(path.read_text())
    assert {f["geometry"]["type"] for f in data["features"]} == {"Polygon"}
    for f in data["features"]:
        _check_qupath_feature(f)
    back = _read_back(path, cells[0]["image"])
    want = Counter(((c["x0"], c["y0"], c["x1"], c["y1"]), c["label"]) for c in cells)
    assert Counter((b.box, b.label) for b in back) == want
    centres = sorted((round(c["x"], 6), round(c["y"], 6)) for c in cells)
    assert sorted((round(b.x, 6), round(b.y, 6)) for b in back) == centres
    assert set(r["classes"]) == {c["label"] for c in cells}


def test_geojson_predictions_classify_and_measure(store, tmp_path):
    from cytostore.fewshot import read_predictions

    r = _json(runner.invoke(app, ["export", "geojson", "--store", str(store), "--out", str(tmp_path),
                                  "--slide", "chula-27", "--predictions", "km", "--json", "-q"]))
    assert r["slides"] == 1 and r["unpredicted_cells"] == 0 and [p.name for p in tmp_path.iterdir()] == ["chula-27.geojson"]
    pred = {p["uid"]: p for p in read_predictions(store, "km", where="slide_id = 'chula-27'").to_pylist()}
    feats = json.loads((tmp_path / "chula-27.geojson").read_text())["features"]
    assert len(feats) == len(pred)
    for f in feats:
        p = pred[int(f["properties"]["metadata"]["uid"])]
        assert f["properties"]["classification"]["name"] == p["prediction"]
        assert f["properties"]["classification"]["color"] == r["classes"][p["prediction"]]
        m = f["properties"]["measurements"]
        assert m["score"] == pytest.approx(p["score"]) and m["margin"] == pytest.approx(p["margin"])
        assert f["properties"]["metadata"]["label"]  # the stored label stays beside the prediction


def test_geojson_errors_name_what_to_fix(store, tmp_path):
    res = runner.invoke(app, ["export", "geojson", "--store", str(store), "--out", str(tmp_path), "--slide", "nope"])
    assert res.exit_code == 2 and "'nope'" in res.output and "cytostore slides" in res.output
    res = runner.invoke(app, ["export", "geojson", "--store", str(store), "--out", str(tmp_path),
                              "--predictions", "missing"])
    assert res.exit_code == 2 and "missing" in res.output
    res = runner.invoke(app, ["export", "geojson", "--store", str(store), "--out", str(tmp_path),
                              "--attention", str(tmp_path / "no-model")])
    assert res.exit_code == 2 and "no-model" in res.output
    assert not list(tmp_path.glob("*.geojson")) and not list(tmp_path.glob(".*part"))


def test_geojson_mil_attention(tmp_path):
    """Attention of a trained MIL model becomes a measurement equal to `mil explain`'s."""
    from cytostore.mil import TrainConfig, explain, train_mil
    from cytostore.mil.synthetic import write_synthetic_store

    slides = {f"s{i:02d}": (["neg", "pos"][i % 2], 30 + i) for i in range(8)}
    write_synthetic_store(tmp_path / "mil", slides, ["neg", "pos"], dim=16)
    labels = tmp_path / "labels.csv"
    with open(labels, "w", newline="") as fh:
        csv.writer(fh).writerows([["slide_id", "label"], *[[s, lab] for s, (lab, _) in slides.items()]])
    train_mil(tmp_path / "mil", labels, tmp_path / "model", TrainConfig(epochs=3, patience=2, max_cells=32,
                                                                         device="cpu", hidden=16, attn_dim=8), folds=2)
    r = _json(runner.invoke(app, ["export", "geojson", "--store", str(tmp_path / "mil"), "--out", str(tmp_path / "gj"),
                                  "--slide", "s03", "--attention", str(tmp_path / "model"), "--json", "-q"]))
    e = explain(tmp_path / "mil", tmp_path / "model", "s03", device="cpu")
    want = dict(zip(e.cells.column("uid").to_pylist(), e.cells.column("attention").to_pylist()))
    feats = json.loads((tmp_path / "gj" / "s03.geojson").read_text())["features"]
    got = {int(f["properties"]["metadata"]["uid"]): f["properties"]["measurements"]["attention"] for f in feats}
    assert got.keys() == want.keys() and len(got) == 33
    assert all(got[u] == pytest.approx(want[u], rel=1e-5) for u in want)
    assert sum(got.values()) == pytest.approx(1.0, abs=1e-4)  # attention over a bag sums to one
    assert r["files"][0]["mil_label"] == e.label


# -- AnnData -------------------------------------------------------------------------
def test_anndata_round_trip(store, tmp_path):
    anndata = pytest.importorskip("anndata")
    s = CellStore.open(store)
    out = tmp_path / "cells.h5ad"
    r = _json(runner.invoke(app, ["export", "anndata", "--store", str(store), "--out", str(out), "--json"]))
    a = anndata.read_h5ad(out)
    emb, keys = s.embeddings(columns=("uid", "slide_id", "cell_id", "label", "x", "y"))
    assert a.shape == (360, 0) and r["cells"] == 360 and r["dim"] == emb.shape[1]
    assert set(a.obsm) == {"X_efficientnet_lite0"} and "no map stored" in r["umap"]
    names = [f"{sl}:{c}" for sl, c in zip(keys.column("slide_id").to_pylist(), keys.column("cell_id").to_pylist())]
    a = a[names]  # store order
    x = a.obsm["X_efficientnet_lite0"]
    assert x.dtype == np.float32 and np.array_equal(x, emb.astype(np.float32))
    assert a.obs["label"].dtype.name == "category" and a.obs["slide_id"].dtype.name == "category"
    assert a.obs["label"].astype(str).tolist() == keys.column("label").to_pylist()
    assert np.array_equal(a.obs["x"].to_numpy(), keys.column("x").to_numpy())
    assert np.array_equal(a.obs["uid"].to_numpy(), keys.column("uid").to_numpy())
    assert "embedding" not in a.obs and "thumbnail" not in a.obs and "class_id" in a.obs
    assert json.loads(a.uns["cytostore"]["provenance_json"])["encoder"]["name"] == "efficientnet_lite0"

    sub = _json(runner.invoke(app, ["export", "anndata", "--store", str(store), "--out", str(out),
                                    "--where", "label = 'normal'", "--json"]))
    assert sub["cells"] == keys.column("label").to_pylist().count("normal")
    assert set(anndata.read_h5ad(out).obs["label"]) == {"normal"}


def test_anndata_umap_only_when_made_from_this_version(store, tmp_path):
    """X_umap is exported when umap.<table> was made from the current table version, never a stale one."""
    anndata = pytest.importorskip("anndata")
    from cytostore.store import schema
    from cytostore.store.derived import write_version

    dst = tmp_path / "store"
    shutil.copytree(store, dst)
    s = CellStore.open(dst)
    version = int(s.dataset().version)
    uids = s.cells(columns=["uid"]).column("uid").to_numpy()
    xy = np.random.default_rng(0).standard_normal((len(uids), 2)).astype(np.float32)

    def write(table_version: int) -> None:
        meta = {"schema": "umap", "schema_version": schema.version("umap"), "table_version": table_version}
        t = pa.Table.from_pydict({"uid": uids[::-1], "umap_x": xy[::-1, 0], "umap_y": xy[::-1, 1],
                                  "fitted": np.ones(len(uids), bool)}, schema=schema.arrow_schema("umap", metadata=meta))
        write_version(str(dst), "umap", "efficientnet_lite0", t.schema, lambda current: t)

    write(version - 1)
    r = _json(runner.invoke(app, ["export", "anndata", "--store", str(dst), "--out", str(tmp_path / "a.h5ad"), "--json"]))
    assert "X_umap" not in r["obsm"] and f"now at version {version}" in r["umap"]
    write(version)
    r = _json(runner.invoke(app, ["export", "anndata", "--store", str(dst), "--out", str(tmp_path / "a.h5ad"), "--json"]))
    a = anndata.read_h5ad(tmp_path / "a.h5ad")
    assert "X_umap" in r["obsm"] and np.array_equal(a.obsm["X_umap"], xy)  # aligned on uid, not row order


def test_missing_optional_package_names_the_extra(store, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "anndata", None)  # makes `import anndata` fail
    res = runner.invoke(app, ["export", "anndata", "--store", str(store), "--out", str(tmp_path / "a.h5ad")])
    assert res.exit_code == 2 and "cytostore[export]" in res.output and not (tmp_path / "a.h5ad").exists()


# -- CLAM / TRIDENT h5 ----------------------------------------------------------------
def test_h5_per_slide_clam_layout(store, tmp_path):
    h5py = pytest.importorskip("h5py")
    s = CellStore.open(store)
    r = _json(runner.invoke(app, ["export", "h5", "--store", str(store), "--out", str(tmp_path), "--slide", "chula-1",
                                  "--slide", "chula-255", "--json", "-q"]))
    assert sorted(p.name for p in tmp_path.glob("*.h5")) == ["chula-1.h5", "chula-255.h5"] and r["slides"] == 2
    prov = s.provenance()
    for slide in ("chula-1", "chula-255"):
        emb, keys = s.embeddings(where=f"slide_id = '{slide}'", columns=("uid", "cell_id", "x", "y", "crop_size"))
        with h5py.File(tmp_path / f"{slide}.h5", "r") as fh:
            feats, coords = fh["features"][:], fh["coords"][:]
            assert feats.shape == emb.shape and feats.dtype == np.float32
            assert np.array_equal(feats, emb.astype(np.float32))
            assert coords.shape == (len(emb), 2) and np.issubdtype(coords.dtype, np.integer)
            want = [(int(round(x - c / 2)), int(round(y - c / 2))) for x, y, c in
                    zip(keys.column("x").to_pylist(), keys.column("y").to_pylist(), keys.column("crop_size").to_pylist())]
            assert [tuple(c) for c in coords.tolist()] == want  # top-left corner of each crop
            assert [c.decode() for c in fh["cell_ids"][:]] == keys.column("cell_id").to_pylist()
            assert np.array_equal(fh["uids"][:], keys.column("uid").to_numpy())
            assert fh.attrs["encoder"] == prov["encoder"]["name"]
            assert fh.attrs["weights_sha256"] == prov["encoder"]["weights_sha256"]
            assert fh.attrs["crop_size"] == prov["preprocessing"]["crop_size"] == fh["coords"].attrs["patch_size"]
            assert fh["coords"].attrs["patch_level"] == 0 and fh.attrs["slide_id"] == slide


# -- DuckDB --------------------------------------------------------------------------
def test_duckdb_sql_over_the_store(store):
    pytest.importorskip("duckdb")
    from cytostore.export.duckdb import connect, views
    from cytostore.fewshot import read_predictions

    s = CellStore.open(store)
    con = connect(store)
    names = {v["name"]: v["columns"] for v in views(con)}
    assert {"cells", "cells_efficientnet_lite0", "predictions_km"} <= set(names)
    assert "embedding" not in names["cells"] and "thumbnail" not in names["cells"]
    got = con.execute("""
        SELECT c.slide_id, c.label, p.prediction AS cluster, count(*) AS n
        FROM cells c JOIN predictions_km p USING (uid)
        WHERE c.x > 100
        GROUP BY ALL""").fetchall()
    cells = s.cells(columns=["uid", "slide_id", "label", "x"]).to_pylist()
    cluster = {p["uid"]: p["prediction"] for p in read_predictions(store, "km").to_pylist()}
    want = Counter((c["slide_id"], c["label"], cluster[c["uid"]]) for c in cells if c["x"] > 100)
    assert {(a, b, c): n for a, b, c, n in got} == dict(want)
    assert con.execute("SELECT count(*) FROM cells").fetchone()[0] == 360

    wide = connect(store, embeddings=True)
    emb, keys = s.embeddings(where="slide_id = 'chula-27'")
    rows = wide.execute("SELECT uid, embedding FROM cells WHERE slide_id = 'chula-27'").fetchall()
    by_uid = {u: np.asarray(e, dtype=np.float32) for u, e in rows}
    assert wide.execute("SELECT typeof(embedding) FROM cells LIMIT 1").fetchone()[0] == f"FLOAT[{emb.shape[1]}]"
    assert all(np.array_equal(by_uid[u], v.astype(np.float32)) for u, v in zip(keys.column("uid").to_pylist(), emb))


# -- files written whole ----------------------------------------------------------------
def test_a_failed_export_keeps_the_previous_file_and_normal_permissions(store, tmp_path, monkeypatch):
    import os
    import stat

    from cytostore.export import export_geojson
    from cytostore.export import geojson as gj

    _json(runner.invoke(app, ["export", "geojson", "--store", str(store), "--out", str(tmp_path), "--slide",
                              "chula-1", "--json", "-q"]))
    path = tmp_path / "chula-1.geojson"
    before = path.read_bytes()
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask  # as any file the user writes

    real, calls = gj.cell_feature, {"n": 0}

    def fail_on_50th(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 50:
            raise OSError("injected: the disk went away")
        return real(*args, **kwargs)

    monkeypatch.setattr(gj, "cell_feature", fail_on_50th)
    with pytest.raises(OSError, match="injected"):
        export_geojson(store, tmp_path, slides=["chula-1"], predictions="km")
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["chula-1.geojson"]
