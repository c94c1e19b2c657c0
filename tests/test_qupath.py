"""QuPath GeoJSON in: detections, a MultiPoint of ovalocytes and an annotation ROI with
measurements, written the way QuPath exports them for a real Chula RBC-12 field."""

from __future__ import annotations

import json
import shutil
import uuid

import pytest
from PIL import Image

from conftest import SAMPLE, TINY, sample_rows
from cytostore import IngestConfig, ingest
from cytostore.sources import GeoJsonSource, open_source
from cytostore.sources.annotations import measurement_column
from cytostore.store import CellStore

FIELD = "chula-1"  # 112 normal cells and 5 ovalocytes


def _feature(geometry, object_type, cls=None, measurements=None):
    # QuPath 0.4+: a UUID id, objectType, classification {name, color}, measurements dict.
    props = {"objectType": object_type}
    if cls:
        props["classification"] = {"name": cls, "color": [255, 0, 0]}
    if measurements is not None:
        props["measurements"] = measurements
    return {"type": "Feature", "id": str(uuid.uuid4()), "geometry": geometry, "properties": props}


def _octagon(x, y, r):
    # A closed ring centred on (x, y): its area centroid is exactly the point.
    k = 0.41421356 * r
    ring = [[x + r, y - k], [x + r, y + k], [x + k, y + r], [x - k, y + r], [x - r, y + k], [x - r, y - k],
            [x - k, y - r], [x + k, y - r]]
    return {"type": "Polygon", "coordinates": [ring + [ring[0]]]}


@pytest.fixture()
def qupath_field(tmp_path):
    """chula-1.jpg beside chula-1.geojson: 12 detections (polygons), one MultiPoint of the
    5 ovalocytes, a whole-image annotation ROI with measurements (QuPath's older list form)."""
    rows = sample_rows([FIELD])
    image = tmp_path / f"{FIELD}.jpg"
    shutil.copy(rows[0]["image"], image)
    w, h = Image.open(image).size
    normal = [r for r in rows if r["label"] == "normal"][:12]
    ovalo = [r for r in rows if r["label"] == "ovalocyte"]
    assert len(ovalo) == 5
    feats = [_feature({"type": "Polygon", "coordinates": [[[0, 0], [w, 0], [w, h], [0, h], [0, 0]]]}, "annotation",
                      "Region*", [{"name": "Num Detections", "value": 17}, {"name": "Area µm^2", "value": 1.5e5}])]
    for k, r in enumerate(normal):
        meas = {"Area µm^2": 40.0 + k, "Circularity": 0.9, "Nucleus: Hematoxylin OD mean": None}
        feats.append(_feature(_octagon(float(r["x"]), float(r["y"]), 12), "detection", "normal", meas))
    feats.append(_feature({"type": "MultiPoint", "coordinates": [[float(r["x"]), float(r["y"])] for r in ovalo]},
                          "annotation", "ovalocyte"))  # the Points tool
    path = tmp_path / f"{FIELD}.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    return path, normal, ovalo, (w, h)


def _cells(store):
    return CellStore.open(store).frame(["cell_id", "x", "y", "label", "m_area_m_2", "m_circularity"]).to_dicts()


def test_qupath_geojson_ingests_points_detections_and_measurements(qupath_field, tmp_path, tiny_weights):
    path, normal, ovalo, _ = qupath_field
    src = open_source(path)
    assert {f.name for f in src.extra_schema} == {"m_area_m_2", "m_circularity", "m_nucleus_hematoxylin_od_mean"}
    store = tmp_path / "store"
    report = ingest(src, store, IngestConfig(encoder=TINY, weights=str(tiny_weights), device="cpu", workers=0))
    assert report.cells_failed == 0 and report.cells_added == len(normal) + len(ovalo)
    cells = _cells(store)
    assert len(cells) == 17  # the annotation ROI is no cell; the MultiPoint is five
    got = sorted((round(c["x"], 3), round(c["y"], 3), c["label"]) for c in cells)
    want = sorted((float(r["x"]), float(r["y"]), r["label"]) for r in normal + ovalo)
    assert got == want  # each cell at its point (the octagons' centroids), with its class
    by_label = {}
    for c in cells:
        by_label.setdefault(c["label"], []).append(c)
    assert len(by_label["ovalocyte"]) == 5 and len(by_label["normal"]) == 12
    assert sorted(c["m_area_m_2"] for c in by_label["normal"]) == [40.0 + k for k in range(12)]
    assert all(c["m_circularity"] == pytest.approx(0.9) for c in by_label["normal"])
    assert all(c["m_area_m_2"] is None for c in by_label["ovalocyte"])  # points carry no measurements
    assert "Region*" not in by_label


def test_within_annotations_keeps_only_cells_inside(qupath_field):
    path, normal, ovalo, (w, h) = qupath_field
    data = json.loads(path.read_text())
    roi = data["features"][0]
    roi["geometry"]["coordinates"] = [[[0, 0], [w / 2, 0], [w / 2, h], [0, h], [0, 0]]]  # the left half
    path.write_text(json.dumps(data))
    kept = [c for t in GeoJsonSource(path, within_annotations=True) for c in t.cells]
    want = sorted((float(r["x"]), float(r["y"])) for r in normal + ovalo if float(r["x"]) < w / 2)
    assert 0 < len(want) < 17
    assert sorted((round(c.x, 3), round(c.y, 3)) for c in kept) == want
    data["features"] = data["features"][1:]
    path.write_text(json.dumps(data))
    fails = list(GeoJsonSource(path, within_annotations=True))
    assert len(fails) == 1 and "no annotation polygon" in fails[0].reason


def test_multipoint_ids_and_measurement_names(tmp_path):
    Image.new("RGB", (100, 100)).save(tmp_path / "f.png")
    feats = [{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [99, 0], [0, 99], [0, 0]]]},
              "properties": {"objectType": "annotation", "classification": {"name": "Tumor"}}},
             {"type": "Feature", "geometry": {"type": "MultiPoint", "coordinates": [[10, 10], [30, 40], [50, 60]]},
              "properties": {"objectType": "annotation", "classification": {"name": "WBC"}}}]
    (tmp_path / "f.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    (task,) = list(open_source(tmp_path / "f.geojson"))
    assert [(c.cell_id, c.x, c.y, c.label) for c in task.cells] == [
        ("10_10", 10, 10, "WBC"), ("30_40", 30, 40, "WBC"), ("50_60", 50, 60, "WBC")]
    assert measurement_column("Area µm^2") == "m_area_m_2"
    assert measurement_column("Nucleus: Hematoxylin OD mean") == "m_nucleus_hematoxylin_od_mean"
