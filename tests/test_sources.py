"""Sources turn manifests, folders and annotations into cells; bad rows become failures."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import SAMPLE, SHARED_DATA, sample_rows, write_manifest
from cytostore.errors import InputError
from cytostore.keys import cell_uid, check_id
from cytostore.sources import ImageTask, SourceFailure, SourceOptions, detect_format, open_source


def _split(items):
    tasks = [i for i in items if isinstance(i, ImageTask)]
    fails = [i for i in items if isinstance(i, SourceFailure)]
    return tasks, fails


def test_manifest_points_keep_labels_and_extra_columns(tmp_path):
    rows = sample_rows(["chula-1"])
    src = open_source(write_manifest(rows, tmp_path / "m.csv"))
    tasks, fails = _split(list(src))
    assert not fails
    assert len(tasks) == 1 and len(tasks[0].cells) == len(rows)
    cell = tasks[0].cells[0]
    assert cell.label == rows[0]["label"]
    assert cell.cell_id == f"{rows[0]['x']}_{rows[0]['y']}"
    assert "class_id" in src.extra_schema.names and cell.extra["class_id"] == int(rows[0]["class_id"])


def test_manifest_bad_rows_are_failures_with_line_numbers(tmp_path):
    img = str(SAMPLE / "fields" / "1.jpg")
    rows = [
        {"image": img, "slide_id": "s1", "x": "10", "y": "20", "x0": "", "y0": "", "x1": "", "y1": ""},
        {"image": img, "slide_id": "s1", "x": "abc", "y": "20", "x0": "", "y0": "", "x1": "", "y1": ""},
        {"image": img, "slide_id": "../etc", "x": "1", "y": "2", "x0": "", "y0": "", "x1": "", "y1": ""},
        {"image": img, "slide_id": "s1", "x": "", "y": "", "x0": "50", "y0": "50", "x1": "40", "y1": "60"},
        {"image": img, "slide_id": "s1", "x": "10", "y": "", "x0": "", "y0": "", "x1": "", "y1": ""},
        {"image": img, "slide_id": "s1", "x": "10", "y": "20", "x0": "", "y0": "", "x1": "", "y1": ""},
        {"image": img, "slide_id": "s1", "x": "", "y": "", "x0": "5", "y0": "5", "x1": "45", "y1": "40"},
    ]
    tasks, fails = _split(list(open_source(write_manifest(rows, tmp_path / "m.csv"))))
    where = sorted(f.where.rsplit(":", 1)[1] for f in fails)
    assert where == ["line 3", "line 4", "line 5", "line 6", "line 7"]
    reasons = " ".join(f.reason for f in fails)
    assert "not a number" in reasons and "path separator" in reasons and "duplicate key" in reasons
    cells = [c for t in tasks for c in t.cells]
    assert [c.cell_id for c in cells] == ["10_20", "5_5_45_40"]
    assert cells[1].box == (5.0, 5.0, 45.0, 40.0) and cells[1].x == 25.0


def test_manifest_rows_without_coordinates_are_crops_and_parquet_works(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"image": ["a.png", "b.png"], "slide_id": ["s", "s"], "stain": ["x", None]}),
                   tmp_path / "m.parquet")
    tasks, fails = _split(list(open_source(tmp_path / "m.parquet")))
    assert not fails and [t.cells[0].cell_id for t in tasks] == ["a", "b"]
    assert tasks[0].cells[0].x is None and tasks[0].image == str(tmp_path / "a.png")


def test_manifest_without_image_column_is_refused(tmp_path):
    (tmp_path / "m.csv").write_text("path,slide_id\na.png,s\n")
    with pytest.raises(InputError, match="'image' column"):
        open_source(tmp_path / "m.csv")


def test_crop_folder_labels_from_folders(tmp_path):
    for label in ("normal", "spherocyte"):
        (tmp_path / "crops" / label).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (40, 40), (200, 100, 100)).save(tmp_path / "crops" / label / f"c{i}.png")
    src = open_source(tmp_path / "crops", "crops", SourceOptions(labels_from_folders=True))
    tasks, fails = _split(list(src))
    assert not fails and len(tasks) == 4
    assert {t.cells[0].label for t in tasks} == {"normal", "spherocyte"}
    assert {t.slide_id for t in tasks} == {"crops"}
    assert len({t.cells[0].cell_id for t in tasks}) == 4


@pytest.mark.skipif(not (SHARED_DATA / "bccd").is_dir(), reason="../shared/data/bccd absent")
def test_voc_boxes_from_bccd(tmp_path):
    root = tmp_path / "bccd"
    (root / "Annotations").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    for stem in ("BloodImage_00000", "BloodImage_00001"):
        shutil.copy(SHARED_DATA / "bccd" / "Annotations" / f"{stem}.xml", root / "Annotations")
        shutil.copy(SHARED_DATA / "bccd" / "JPEGImages" / f"{stem}.jpg", root / "JPEGImages")
    assert detect_format(root) == "voc"
    tasks, fails = _split(list(open_source(root)))
    assert not fails and [t.slide_id for t in tasks] == ["BloodImage_00000", "BloodImage_00001"]
    labels = {c.label for t in tasks for c in t.cells}
    assert {"RBC", "WBC"} <= labels
    box = tasks[0].cells[0].box
    assert box[2] > box[0] and box[3] > box[1]


def test_geojson_points_and_polygons(tmp_path):
    Image.new("RGB", (200, 100), (230, 230, 240)).save(tmp_path / "field7.png")
    features = [
        {"type": "Feature", "id": "a1", "geometry": {"type": "Point", "coordinates": [10, 20]},
         "properties": {"classification": {"name": "Lymphocyte"}}},
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[40, 40], [60, 40], [60, 50], [40, 50], [40, 40]]]},
         "properties": {"objectType": "detection"}},
        {"type": "Feature", "geometry": None, "properties": {}},
    ]
    (tmp_path / "field7.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    tasks, fails = _split(list(open_source(tmp_path / "field7.geojson")))
    assert len(fails) == 1 and "feature2" in fails[0].where
    cells = tasks[0].cells
    assert tasks[0].slide_id == "field7" and cells[0].cell_id == "a1" and cells[0].label == "Lymphocyte"
    assert cells[1].x == pytest.approx(50) and cells[1].y == pytest.approx(45)
    assert cells[1].box == (40.0, 40.0, 60.0, 50.0)


def test_format_detection(tmp_path):
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (10, 10)).save(tmp_path / "imgs" / "a.png")
    with pytest.raises(InputError, match="--format crops"):
        detect_format(tmp_path / "imgs")
    with pytest.raises(InputError, match="no such file"):
        detect_format(tmp_path / "missing")
    assert detect_format(SAMPLE / "manifest.csv") == "manifest"


@pytest.mark.parametrize("bad", ["", "a/b", "..", "a\\b", "x" * 300, "a\nb"])
def test_bad_slide_ids_are_refused(bad):
    with pytest.raises(InputError):
        check_id(bad)


def test_uids_are_stable_and_distinct():
    assert cell_uid("s", "1_2") == cell_uid("s", "1_2")
    uids = {cell_uid(f"s{i}", f"{j}") for i in range(50) for j in range(50)}
    assert len(uids) == 2500 and min(uids) >= 0 and max(uids) < 2**63
    assert np.int64(cell_uid("a", "b")) >= 0


def _crop_tree(root):
    # scope/<slide>/<label>/1.jpg: a microscope names every file 1.jpg.
    for rel in ["slideA/normal/1.jpg", "slideA/ovalocyte/1.jpg", "slideB/normal/1.jpg", "slideB/normal/2.jpg"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (24, 24), (200, 100, 100)).save(root / rel)
    return root


def _slides(src):
    tasks, fails = _split(list(src))
    assert not fails
    return sorted((t.slide_id, t.cells[0].cell_id, t.cells[0].label) for t in tasks)


def test_crop_folder_slide_ids_from_parent_path_root_fixed_and_prefix(tmp_path):
    from cytostore.sources import CropFolderSource

    root = _crop_tree(tmp_path / "scope")
    labelled = SourceOptions(labels_from_folders=True)
    # Default, as before: the root's name with labels, the parent folder without.
    assert {s for s, _, _ in _slides(CropFolderSource(root, labelled))} == {"scope"}
    assert {s for s, _, _ in _slides(CropFolderSource(root))} == {"normal", "ovalocyte"}
    # parent: the folder above the label folder (the same slides with or without labels as slide layout).
    got = _slides(CropFolderSource(root, labelled, slide_from="parent", slide_prefix="s2-"))
    assert got == [("s2-slideA", "slideA~normal~1", "normal"), ("s2-slideA", "slideA~ovalocyte~1", "ovalocyte"),
                   ("s2-slideB", "slideB~normal~1", "normal"), ("s2-slideB", "slideB~normal~2", "normal")]
    assert {s for s, _, _ in _slides(CropFolderSource(root, slide_from="path"))} == {
        "slideA~normal", "slideA~ovalocyte", "slideB~normal"}
    assert {s for s, _, _ in _slides(CropFolderSource(root, labelled, slide_from="path"))} == {"slideA", "slideB"}
    assert {s for s, _, _ in _slides(CropFolderSource(root, slide_from="root", slide_prefix="x-"))} == {"x-scope"}
    fixed = SourceOptions(slide_id="run7", labels_from_folders=True)
    assert {s for s, _, _ in _slides(CropFolderSource(root, fixed, slide_from="fixed"))} == {"run7"}
    with pytest.raises(InputError, match="needs --slide-id"):
        CropFolderSource(root, slide_from="fixed")
    with pytest.raises(InputError, match="pass one of them"):
        CropFolderSource(root, fixed, slide_from="parent")
    with pytest.raises(InputError, match="not one of"):
        CropFolderSource(root, slide_from="stem")


def test_field_folder_slide_ids_from_relative_path(tmp_path):
    from cytostore.sources import FieldFolderSource

    for rel in ["day1/1.jpg", "day2/1.jpg"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 32)).save(tmp_path / rel)
    tasks, fails = _split(list(FieldFolderSource(tmp_path)))
    assert len(tasks) == 1 and len(fails) == 1 and "--slide-from path" in fails[0].reason  # both are "1"
    tasks, fails = _split(list(FieldFolderSource(tmp_path, slide_from="path", slide_prefix="scope-")))
    assert not fails and sorted(t.slide_id for t in tasks) == ["scope-day1~1", "scope-day2~1"]


def test_ingest_cli_options_and_help(tmp_path):
    from typer.testing import CliRunner

    from cli.main import app

    runner = CliRunner()
    res = runner.invoke(app, ["ingest", "--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0 and "needs the [scale] extra" in res.output
    assert "--slide-from" in res.output and "--slide-prefix" in res.output and "--within-annotations" in res.output
    res = runner.invoke(app, ["ingest", str(SAMPLE / "manifest.csv"), "--store", str(tmp_path / "s"),
                              "--slide-prefix", "x-"])
    assert res.exit_code == 2 and "not manifest" in res.output


def test_folder_and_geojson_sources_know_their_image_count(tmp_path):
    from cytostore.sources import CropFolderSource, FieldFolderSource, GeoJsonSource

    root = _crop_tree(tmp_path / "scope")
    assert CropFolderSource(root).n_images == 4 == len(list(CropFolderSource(root)))
    assert FieldFolderSource(root, slide_from="path").n_images == 4
    Image.new("RGB", (50, 50)).save(tmp_path / "f7.png")
    (tmp_path / "f7.geojson").write_text('{"type": "Feature", "geometry": {"type": "Point", "coordinates": [9, 9]}}')
    assert GeoJsonSource(tmp_path / "f7.geojson").n_images == 1
