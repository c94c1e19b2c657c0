"""Maps (UMAP coordinates, PNG, HTML, mosaic) and QC.

The store here holds real thumbnails cut from three bundled Chula RBC-12 fields,
but seeded synthetic embeddings (a cluster per label, shifted per slide), so that
no encoder has to run and the expected structure is known. UMAP is fitted once
per module (numba's first compile takes ~10-20 s).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image
from typer.testing import CliRunner

from cli.main import app
from conftest import sample_rows
from cytostore import CellStore
from cytostore.store import schema
from cytostore.store.writer import append_rows, delete_rows
from cytostore.imaging import Picture, crop_cell, thumbnail_bytes
from cytostore.keys import cell_uid

runner = CliRunner()
TABLE = "synthetic"
DIM = 32
FIELDS = ["chula-1", "chula-27", "chula-255"]
PARAMS = dict(fit_sample=200, seed=0)  # fit on 200 cells, project the rest: both paths run
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


def _rows(rows: list[dict], start: int, rng: np.random.Generator, centres: dict[str, np.ndarray],
          shifts: dict[str, np.ndarray]) -> pa.Table:
    pics: dict[str, Picture] = {}
    thumbs, emb = [], []
    for r in rows:
        pic = pics.setdefault(r["image"], Picture(r["image"]))
        thumbs.append(thumbnail_bytes(crop_cell(pic, float(r["x"]), float(r["y"]), 64)))
        emb.append(centres[r["label"]] + shifts[r["slide_id"]] + 0.15 * rng.standard_normal(DIM))
    n = len(rows)
    cols = {
        "uid": [cell_uid(r["slide_id"], f"c{start + i}") for i, r in enumerate(rows)],
        "slide_id": [r["slide_id"] for r in rows],
        "cell_id": [f"c{start + i}" for i in range(n)],
        "x": [float(r["x"]) for r in rows], "y": [float(r["y"]) for r in rows],
        "crop_size": [64] * n,
        "label": [r["label"] for r in rows],
        "image": [r["image"] for r in rows],
        "source_ref": [f"test:{start + i}" for i in range(n)],
        "thumbnail": thumbs,
        "run_id": ["test"] * n,
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(np.asarray(emb, np.float16).ravel()), DIM),
        "area": [float(i % 7) for i in range(n)],
    }
    extra = pa.schema([pa.field("area", pa.float64())])
    sch = schema.arrow_schema("cells", dim=DIM, extra=extra, metadata={"encoder": {"name": TABLE}})
    from cytostore.store import conform

    return conform(pa.Table.from_pydict(cols), sch)


def _make_store(path: Path) -> Path:
    rng = np.random.default_rng(7)
    rows = sample_rows(FIELDS)
    labels = sorted({r["label"] for r in rows})
    centres = {lab: 1.5 * rng.standard_normal(DIM) for lab in labels}
    shifts = {s: 0.6 * rng.standard_normal(DIM) for s in FIELDS}
    append_rows(CellStore.create(path), TABLE, _rows(rows, 0, rng, centres, shifts))
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """A store with real thumbnails and synthetic embeddings, UMAP fitted once."""
    from cytostore.maps import UmapParams, compute_umap

    path = _make_store(tmp_path_factory.mktemp("maps") / "store")
    compute_umap(path, TABLE, params=UmapParams(**PARAMS))
    return path


def _last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


def _nonblank(png: Path) -> tuple[tuple[int, int], float, int]:
    im = np.asarray(Image.open(png).convert("RGB"))
    nonwhite = float((im.min(axis=2) < 245).mean())
    colours = len(np.unique(im.reshape(-1, 3), axis=0))
    return (im.shape[1], im.shape[0]), nonwhite, colours


# -- coordinates ---------------------------------------------------------------------------------
def test_coordinates_stored_with_version_and_params(store):
    import lance

    from cytostore.maps import UmapParams, umap_uri

    s = CellStore.open(store)
    stored = lance.dataset(umap_uri(s, TABLE))
    meta = schema.read_metadata(stored.schema)
    assert meta["table_version"] == s.dataset(TABLE).version
    assert meta["params"] == UmapParams(**PARAMS).to_dict()
    assert meta["fitted_cells"] == 200 and meta["projected_cells"] == s.count(TABLE) - 200
    t = stored.to_table()
    assert t.num_rows == s.count(TABLE)
    assert set(t.column("uid").to_pylist()) == set(s.cells(["uid"], encoder=TABLE).column("uid").to_pylist())
    assert int(np.sum(t.column("fitted").to_numpy(zero_copy_only=False))) == 200
    assert np.isfinite(t.column("umap_x").to_numpy()).all()
    # Projected cells land beside the fitted cell they most resemble in embedding space.
    emb, keys = s.embeddings(TABLE)
    assert keys.column("uid").equals(t.column("uid"))
    e = np.asarray(emb, np.float32)
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    xy = np.c_[t.column("umap_x").to_numpy(), t.column("umap_y").to_numpy()]
    fitted = t.column("fitted").to_numpy(zero_copy_only=False)
    nearest = np.flatnonzero(fitted)[np.argmax(e[~fitted] @ e[fitted].T, axis=1)]
    to_twin = np.linalg.norm(xy[~fitted] - xy[nearest], axis=1)
    rng = np.random.default_rng(0)
    random_pairs = np.linalg.norm(xy[rng.integers(0, len(xy), 500)] - xy[rng.integers(0, len(xy), 500)], axis=1)
    assert np.median(to_twin) < 0.2 * np.median(random_pairs)


def test_second_call_reuses_without_umap(store, monkeypatch):
    import umap

    from cytostore.maps import UmapParams, compute_umap

    first = compute_umap(store, TABLE, params=UmapParams(**PARAMS))

    def boom(*a, **k):
        raise AssertionError("UMAP refitted although the stored coordinates are current")

    monkeypatch.setattr(umap, "UMAP", boom)
    again = compute_umap(store, TABLE, params=UmapParams(**PARAMS))
    assert schema.read_metadata(again.schema)["reused"] is True
    assert again.column("umap_x").equals(first.column("umap_x")) and again.column("uid").equals(first.column("uid"))
    # Other parameters do not match the stored ones: a refit is attempted.
    with pytest.raises(AssertionError, match="refitted"):
        compute_umap(store, TABLE, params=UmapParams(fit_sample=200, seed=1))


def test_recomputed_after_append(store, tmp_path):
    from cytostore.maps import UmapParams, compute_umap

    path = tmp_path / "store"
    shutil.copytree(store, path)
    s = CellStore.open(path)
    v0 = s.dataset(TABLE).version
    rng = np.random.default_rng(3)
    extra = _rows(sample_rows(["chula-1"])[:10], 10_000, rng, {r["label"]: np.zeros(DIM) for r in sample_rows(FIELDS)},
                  {"chula-1": np.zeros(DIM)})
    append_rows(s, TABLE, extra)
    delete_rows(s, TABLE, "cell_id IN ('c1', 'c2', 'c300')")  # row offsets shift: coordinates must follow uids
    out = compute_umap(path, TABLE, params=UmapParams(**PARAMS))
    meta = schema.read_metadata(out.schema)
    assert meta["reused"] is False and meta["table_version"] == s.dataset(TABLE).version > v0
    assert out.num_rows == s.count(TABLE)
    assert out.column("uid").to_pylist() == s.cells(["uid"], encoder=TABLE).column("uid").to_pylist()
    assert set(extra.column("uid").to_pylist()) <= set(out.column("uid").to_pylist())
    assert np.isfinite(out.column("umap_x").to_numpy()).all()


# -- PNG, HTML, mosaic -----------------------------------------------------------------------------
def test_png_map(store, tmp_path):
    r = runner.invoke(app, ["map", "--store", str(store), "--encoder", TABLE, "--out", str(tmp_path / "m.png"),
                            "--fit-sample", "200", "--json"])
    assert r.exit_code == 0, r.output
    out = _last_json(r.stdout)
    assert out["umap"]["reused"] is True and out["points"] == CellStore.open(store).count(TABLE)
    size, nonwhite, colours = _nonblank(tmp_path / "m.png")
    assert size == (out["width"], out["height"]) == (990, 770)
    assert nonwhite > 0.01 and colours > 20


def test_png_numeric_where_and_sample(store, tmp_path):
    from cytostore.maps import UmapParams, load_map_data, render_png

    data = load_map_data(store, color_by="area", where="slide_id = 'chula-1'", sample=50, encoder=TABLE,
                         params=UmapParams(**PARAMS))
    assert data.color.numeric and data.n == 50 and set(data.slide_id) == {"chula-1"}
    assert data.total_cells == len(sample_rows(["chula-1"]))
    info = render_png(data, tmp_path / "area.png")
    assert _nonblank(tmp_path / "area.png")[1] > 0.01 and info["points"] == 50


def _html(store, tmp_path) -> tuple[Path, dict]:
    out = tmp_path / "map.html"
    r = runner.invoke(app, ["map", "--store", str(store), "--encoder", TABLE, "--out", str(out),
                            "--fit-sample", "200", "--json"])
    assert r.exit_code == 0, r.output
    return out, _last_json(r.stdout)


def test_html_is_one_self_contained_file(store, tmp_path):
    out, info = _html(store, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["map.html"]
    text = out.read_text()
    assert not re.search(r"https?://", text), "the page references something on the network"
    assert "<script src" not in text and "<link" not in text
    data = json.loads(re.search(r'<script type="application/json" id="data">(.*?)</script>', text, re.S)
                      .group(1).replace("<\\/", "</"))
    s = CellStore.open(store)
    cells = s.cells(["uid", "cell_id"], encoder=TABLE)
    assert len(data["x"]) == len(data["thumb"]) == cells.num_rows == info["points"]
    assert sorted(data["uid"]) == sorted(str(u) for u in cells.column("uid").to_pylist())
    assert all(t.startswith("/9j/") for t in data["thumb"])  # base64 of a JPEG's first bytes
    assert set(data["categories"]) == {r["label"] for r in sample_rows(FIELDS)}


def _chromium(*args: str) -> subprocess.CompletedProcess:
    profile = tempfile.mkdtemp(prefix="chromium-")
    try:
        return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                               "--disable-component-update", "--disable-sync", "--no-first-run",
                               f"--user-data-dir={profile}", "--window-size=1200,900", *args],
                              capture_output=True, text=True, timeout=90)
    finally:
        shutil.rmtree(profile, ignore_errors=True)


@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (apt-get install chromium)")
def test_html_hover_and_filter_in_chromium(store, tmp_path):
    out, _ = _html(store, tmp_path)
    res = _chromium("--virtual-time-budget=5000", "--dump-dom", out.as_uri() + "?selftest=1")
    m = re.search(r'<pre id="selftest"[^>]*>(.*?)</pre>', res.stdout, re.S)
    assert m and m.group(1), f"no self-test result in the DOM: {res.stderr[-500:]}"
    r = json.loads(m.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert r["ok"], r
    assert r["tip_shown"] and r["tip_has_jpeg"] and r["tip_cell"] == r["tip_expected_cell"]
    assert "slide chula-" in r["tip_text"] and "cell c" in r["tip_text"]
    assert r["drawn_after"] == r["expected_after"] < r["drawn_before"] and r["external_refs"] == 0
    shot = tmp_path / "shot.png"
    _chromium(f"--screenshot={shot}", out.as_uri())
    size, nonwhite, colours = _nonblank(shot)
    assert size == (1200, 900) and nonwhite > 0.01 and colours > 20


def test_mosaic(store, tmp_path):
    r = runner.invoke(app, ["mosaic", "--store", str(store), "--encoder", TABLE, "--out", str(tmp_path / "mo.png"),
                            "--grid", "10", "--tile", "32", "--fit-sample", "200", "--json"])
    assert r.exit_code == 0, r.output
    info = _last_json(r.stdout)
    assert 1 < info["tiles"] <= 100
    size, nonwhite, colours = _nonblank(tmp_path / "mo.png")
    assert size == (10 * 33 + 1,) * 2 and nonwhite > 0.05 and colours > 50


def test_mosaic_representative_is_nearest_to_tile_centre():
    from cytostore.maps.tiles import representatives

    rng = np.random.default_rng(0)
    x, y = rng.uniform(0, 10, 500), rng.uniform(0, 10, 500)
    x[:2], y[:2] = (0, 10), (0, 10)  # the plane spans 0..10 both ways: 5 tiles of side 2
    reps = representatives(x, y, 5)
    col, row = np.minimum(x // 2, 4).astype(int), 4 - np.minimum(y // 2, 4).astype(int)  # row 0 at the top
    assert set(reps) == set(zip(col.tolist(), row.tolist()))
    for (c, r), i in reps.items():
        cx, cy = 2 * c + 1, 10 - (2 * r + 1)
        d = (x - cx) ** 2 + (y - cy) ** 2
        assert (col[i], row[i]) == (c, r) and d[i] == d[(col == c) & (row == r)].min()


# -- colour by -------------------------------------------------------------------------------------
def test_color_by_prediction_joins_on_uid(store, tmp_path):
    import lance

    from cytostore.maps import UmapParams, load_map_data

    path = tmp_path / "store"
    shutil.copytree(store, path)
    uids = CellStore.open(path).cells(["uid"], encoder=TABLE).column("uid").to_numpy()
    predicted = uids[::2]
    labels = ["spiky" if i % 3 == 0 else "round" for i in range(len(predicted))]
    lance.write_dataset(pa.table({"uid": pa.array(predicted, pa.int64()), "label": labels,
                                  "score": pa.array(np.linspace(0.5, 1, len(predicted)), pa.float32())}),
                        str(path / "predictions.fs.lance"))
    data = load_map_data(path, color_by="prediction:fs", encoder=TABLE, params=UmapParams(**PARAMS))
    got = {int(u): data.categories[v] for u, v in zip(data.uid, data.values)}
    want = dict(zip(predicted.tolist(), labels))
    assert all(got[u] == want.get(u, "(none)") for u in got)
    assert set(data.categories) == {"spiky", "round", "(none)"} and data.categories[-1] == "(none)"
    r = runner.invoke(app, ["map", "--store", str(path), "--encoder", TABLE, "--out", str(tmp_path / "p.png"),
                            "--color-by", "prediction:fs", "--fit-sample", "200"])
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("color_by, message", [("no_such_column", "no such column"),
                                                ("thumbnail", "no such column"),
                                                ("prediction:missing", "no predictions table")])
def test_bad_color_by_exits_2(store, tmp_path, color_by, message):
    r = runner.invoke(app, ["map", "--store", str(store), "--encoder", TABLE, "--out", str(tmp_path / "m.png"),
                            "--color-by", color_by])
    assert r.exit_code == 2 and message in r.stderr and "error:" in r.stderr
    assert not (tmp_path / "m.png").exists()


# -- QC ------------------------------------------------------------------------------------------
def test_qc_json(store, tmp_path):
    import lance

    # Add one twin of an existing cell (a near-duplicate) and one cell far from all (an outlier).
    path = tmp_path / "store"
    shutil.copytree(store, path)
    s = CellStore.open(path)
    ds = s.dataset(TABLE)
    src = ds.to_table(filter="cell_id = 'c5'")
    far = np.zeros((1, DIM), np.float16)
    far[0, 0] = -40
    for cid, emb in (("twin", None), ("far", far)):
        row = src.set_column(src.schema.get_field_index("cell_id"), "cell_id", pa.array([cid]))
        row = row.set_column(0, "uid", pa.array([cell_uid(src.column("slide_id")[0].as_py(), cid)], pa.int64()))
        if emb is not None:
            row = row.set_column(row.schema.get_field_index("embedding"), "embedding",
                                 pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), DIM))
        append_rows(s, TABLE, row.cast(ds.schema))

    r = runner.invoke(app, ["qc", "--store", str(path), "--encoder", TABLE, "--min-cells-per-slide", "20", "--json"])
    assert r.exit_code == 0, r.output
    rep = _last_json(r.stdout)["tables"][0]
    for key in ("slide", "label"):
        assert 0 <= rep[key]["chance"] < rep[key]["accuracy"] <= 1
        assert rep[key]["balanced_chance"] < rep[key]["balanced_accuracy"]
    assert rep["slide"]["classes"] == 3 and rep["slide"]["chance"] == pytest.approx(
        max(len(sample_rows([f])) for f in FIELDS) / (len(sample_rows(FIELDS)) + 2), abs=0.01)
    assert "slides with >= 20 cells" in rep["slide"]["policy"]
    pairs = {frozenset((p["a"]["cell_id"], p["b"]["cell_id"])) for p in rep["duplicates"]["listed"]}
    assert frozenset(("c5", "twin")) in pairs
    assert "far" in [c["cell_id"] for c in rep["outliers"]["density"]["listed"]]
    assert rep["outliers"]["sharpness"]["median"] > 0


def test_qc_python_api_every_table(store):
    from cytostore.qc import QcConfig, run_qc

    rep = run_qc(store, config=QcConfig(listed=3))
    assert [t["table"] for t in rep["tables"]] == CellStore.open(store).tables()
    assert rep["tables"][0]["slide"]["accuracy"] is not None
