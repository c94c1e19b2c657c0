"""Bad inputs: each becomes a recorded failure (the rest ingested) or is refused up front
(exit 2, nothing written); never a traceback, a hang, a silent change or a loss."""

from __future__ import annotations

import json
import os
import shutil
import struct
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cli.main import app
from cytostore import CellStore, IngestConfig, ingest, limits
from cytostore.errors import InputError
from cytostore.imaging import crop_cell
from cytostore.sources import ManifestSource, SourceOptions, open_source

from conftest import TINY

runner = CliRunner()


def _config(weights: Path, **kw) -> IngestConfig:
    return IngestConfig(encoder=TINY, weights=str(weights), device="cpu", batch_size=8, **kw)


def _cli(src: Path, store: Path, weights: Path, *extra: str):
    return runner.invoke(app, ["ingest", str(src), "--store", str(store), "--encoder", TINY, "--weights",
                               str(weights), "--device", "cpu", "--quiet", *extra])


def _field(path: Path, size: tuple[int, int] = (96, 96), seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype("uint8")).save(path)
    return path


def _rows(store: Path, *columns: str) -> list[dict]:
    return sorted(CellStore(store).cells(columns=list(columns)).to_pylist(), key=lambda r: tuple(map(str, r.values())))


def _failures(store: Path) -> list[dict]:
    return CellStore(store).failures().select(["where", "stage", "reason"]).to_pylist()


# -- manifests: text that is not UTF-8 ---------------------------------------------------------
def test_manifest_byte_that_is_not_utf8_is_a_failure_naming_the_column(tmp_path, tiny_weights):
    img = _field(tmp_path / "f.png")
    csv = tmp_path / "m.csv"
    csv.write_bytes(b"image,slide_id,x,y,label\n" + f"{img},s1,50,50,lym".encode() + b"\xe9\n"
                    + f"{img},s1,20,20,neu\n{img},s\xe9,30,30,neu\n".encode("latin1"))
    report = ingest(open_source(csv), tmp_path / "st", _config(tiny_weights))
    rows = _rows(tmp_path / "st", "slide_id", "label")
    assert rows == [{"slide_id": "s1", "label": "neu"}]  # never the text "b'...'"
    assert report.cells_failed == 2 and report.cells_added == 1
    fails = sorted(_failures(tmp_path / "st"), key=lambda f: f["where"])
    assert [f["where"] for f in fails] == [f"{csv}:line 2", f"{csv}:line 4"]
    assert "'label' (#5)" in fails[0]["reason"] and "UTF-8" in fails[0]["reason"]
    assert "'slide_id' (#2)" in fails[1]["reason"]


def test_manifest_encoding_option_decodes_latin1(tmp_path, tiny_weights):
    img = _field(tmp_path / "f.png")
    csv = tmp_path / "m.csv"
    csv.write_bytes(f"image,slide_id,x,y,label\n{img},s1,50,50,lymé\n".encode("latin1"))
    report = ingest(open_source(csv, options=SourceOptions(encoding="latin1")), tmp_path / "st", _config(tiny_weights))
    assert report.cells_failed == 0 and _rows(tmp_path / "st", "label") == [{"label": "lymé"}]


def test_manifest_encoding_option_on_the_command_line(tmp_path, tiny_weights):
    img = _field(tmp_path / "f.png")
    csv = tmp_path / "m.csv"
    csv.write_bytes(f"image,slide_id,x,y,label\n{img},s1,50,50,lymé\n".encode("latin1"))
    base = ["ingest", str(csv), "--store", str(tmp_path / "st"), "--encoder", TINY, "--weights", str(tiny_weights),
            "--device", "cpu", "--json"]
    res = runner.invoke(app, base)
    assert res.exit_code == 1, res.output  # utf8 by default: the row is a recorded failure
    res = runner.invoke(app, [*base, "--encoding", "latin1"])
    assert res.exit_code == 0, res.output
    assert _rows(tmp_path / "st", "label") == [{"label": "lymé"}]


def test_manifest_byte_that_is_not_utf8_in_a_later_block(tmp_path):
    img = _field(tmp_path / "f.png")
    csv = tmp_path / "m.csv"
    good = "".join(f"{img},s1,{10 + i % 70},{10 + i // 70},note{i}\n" for i in range(2000)).encode()
    csv.write_bytes(b"image,slide_id,x,y,note\n" + good + f"{img},s1,5,5,bad".encode() + b"\xff\n")
    src = ManifestSource(csv)
    src.table.block_bytes = 4096  # the bad byte comes blocks after the types were guessed
    items = list(src)
    fails = [i for i in items if not hasattr(i, "cells")]
    cells = [c for i in items if hasattr(i, "cells") for c in i.cells]
    assert len(cells) == 2000 and {c.extra["note"] for c in cells} == {f"note{i}" for i in range(2000)}
    assert len(fails) == 1 and fails[0].where.endswith(":line 2002") and "'note'" in fails[0].reason


# -- manifests: column names and counts --------------------------------------------------------
def test_manifest_empty_column_name_refused_before_anything_is_written(tmp_path, tiny_weights):
    img = _field(tmp_path / "f.png")
    good = tmp_path / "good.csv"
    good.write_text(f"image,slide_id,x,y\n{img},s1,50,50\n")
    store = tmp_path / "st"
    assert _cli(good, store, tiny_weights).exit_code == 0
    version = CellStore(store).dataset().version
    bad = tmp_path / "bad.csv"
    bad.write_text(f"image,slide_id,x,y,\n{img},s1,20,20,a\n")
    res = _cli(bad, store, tiny_weights)
    assert res.exit_code == 2, res.output
    assert str(bad) in res.output and "column #5 has an empty name" in res.output
    s = CellStore(store)
    assert s.dataset().version == version and "" not in s.dataset().schema.names and s.count() == 1
    # The table stays writable: a later manifest with a new, named column appends.
    later = tmp_path / "later.csv"
    later.write_text(f"image,slide_id,x,y,note\n{img},s1,20,20,a\n")
    assert _cli(later, store, tiny_weights).exit_code == 0
    assert CellStore(store).count() == 2


@pytest.mark.parametrize("header, message", [
    ("image,slide_id,x,y,a,a", "columns #5 and #6 are both named 'a'"),
    ("image,slide_id,x,y,  ", "column #5 has an empty name"),
    ("image,slide_id,x,y,uid", "column #5 'uid' is a column cytostore writes itself"),
])
def test_manifest_bad_column_names_refused_with_exit_2(tmp_path, tiny_weights, header, message):
    img = _field(tmp_path / "f.png")
    bad = tmp_path / "bad.csv"
    bad.write_text(f"{header}\n{img},s1,20,20,1,2\n" if header.endswith("a,a") else f"{header}\n{img},s1,20,20,1\n")
    res = _cli(bad, tmp_path / "st", tiny_weights)
    assert res.exit_code == 2 and message in res.output, res.output
    assert not (tmp_path / "st").exists()


def test_manifest_with_too_many_columns_refused(tmp_path, tiny_weights):
    n = limits.MAX_MANIFEST_COLUMNS + 1
    bad = tmp_path / "wide.csv"
    bad.write_text("image,slide_id," + ",".join(f"c{i}" for i in range(n)) + "\n" + "a.png,s," + ",".join("1" * n) + "\n")
    with pytest.raises(InputError, match="MAX_MANIFEST_COLUMNS"):
        ManifestSource(bad)
    assert _cli(bad, tmp_path / "st", tiny_weights).exit_code == 2


# -- limits checked before allocation ----------------------------------------------------------
@pytest.mark.parametrize("option", [["--crop-size", "0"], ["--crop-size", "-5"], ["--crop-size", "100000"],
                                    ["--box-margin", "nan"], ["--box-margin", "-1"], ["--batch-size", "1000000000"],
                                    ["--workers", "100000"], ["--min-diameter", "-3"], ["--max-diameter", "inf"],
                                    ["--min-diameter", "30", "--max-diameter", "10"]])
def test_options_out_of_bounds_refused_before_the_store_is_made(tmp_path, tiny_weights, option):
    img = _field(tmp_path / "f.png")
    m = tmp_path / "m.csv"
    m.write_text(f"image,slide_id,x,y\n{img},s1,50,50\n{img},s1,20,20\n")
    res = _cli(m, tmp_path / "st", tiny_weights, *option)
    assert res.exit_code == 2 and option[-2] in res.output, res.output
    assert not (tmp_path / "st").exists()


def test_box_over_the_crop_limit_is_a_failure_before_any_allocation(tmp_path, tiny_weights):
    class NoRegion:
        size = (100, 100)

        def region(self, *a):  # pragma: no cover - reached only if the limit is not checked first
            raise AssertionError("a crop was allocated")

    with pytest.raises(InputError, match="MAX_CROP_SIDE"):
        crop_cell(NoRegion(), 50, 50, limits.MAX_CROP_SIDE + 1)
    img = _field(tmp_path / "f.png")
    m = tmp_path / "m.csv"
    m.write_text(f"image,slide_id,x0,y0,x1,y1\n{img},s1,-10000,-10000,10000,10000\n{img},s1,10,10,30,30\n")
    report = ingest(open_source(m), tmp_path / "st", _config(tiny_weights))
    assert report.cells_added == 1 and report.cells_failed == 1
    (fail,) = _failures(tmp_path / "st")
    assert fail["where"] == f"{m}:line 2" and "MAX_CROP_SIDE" in fail["reason"]


def test_whole_image_crop_of_extreme_aspect_is_a_failure(tmp_path, tiny_weights):
    crops = tmp_path / "crops" / "s"
    crops.mkdir(parents=True)
    Image.new("RGB", (1, 30000), (200, 100, 50)).save(crops / "thin.png")
    _field(crops / "ok.png", (40, 40))
    report = ingest(open_source(tmp_path / "crops", "crops"), tmp_path / "st", _config(tiny_weights))
    assert report.cells_added == 1 and report.cells_failed == 1
    (fail,) = _failures(tmp_path / "st")
    assert fail["where"].endswith("thin.png") and "MAX_CROP_SIDE" in fail["reason"]


def _png_claiming(path: Path, width: int, height: int) -> Path:
    """A valid 1x1 PNG whose header then claims ``width`` x ``height`` (a decompression bomb's header)."""
    _field(path, (1, 1))
    data = bytearray(path.read_bytes())
    ihdr = data[12:29]  # b"IHDR" + 13 bytes
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)) & 0xFFFFFFFF)
    path.write_bytes(bytes(data))
    return path


def test_image_over_the_pixel_limit_is_refused_from_its_header(tmp_path, tiny_weights):
    crops = tmp_path / "crops" / "s"
    crops.mkdir(parents=True)
    _png_claiming(crops / "bomb.png", 20000, 20000)  # 4e8 pixels, over limits.MAX_IMAGE_PIXELS
    _png_claiming(crops / "wide.png", 70000, 10)  # a side over limits.MAX_IMAGE_SIDE
    _field(crops / "ok.png", (40, 40))
    report = ingest(open_source(tmp_path / "crops", "crops"), tmp_path / "st", _config(tiny_weights))
    assert report.cells_added == 1 and report.cells_failed == 2
    reasons = {Path(f["where"]).name: f["reason"] for f in _failures(tmp_path / "st")}
    assert "MAX_IMAGE_PIXELS" in reasons["bomb.png"] and "MAX_IMAGE_SIDE" in reasons["wide.png"]


def test_npy_header_claiming_too_many_values_is_refused_before_reading(tmp_path):
    ok = tmp_path / "ok.npy"
    np.save(ok, np.arange(8, dtype=np.float32))
    assert limits.load_npy(ok).tolist() == list(range(8))
    header = {"descr": "<f4", "fortran_order": False, "shape": (10**12,)}
    bomb = tmp_path / "bomb.npy"
    with open(bomb, "wb") as fh:
        np.lib.format.write_array_header_1_0(fh, header)
        fh.write(b"\0" * 64)
    with pytest.raises(InputError, match="MAX_NPY_VALUES"):
        limits.load_npy(bomb)
    short = tmp_path / "short.npy"
    with open(short, "wb") as fh:
        np.lib.format.write_array_header_1_0(fh, {**header, "shape": (1000,)})
        fh.write(b"\0" * 64)
    with pytest.raises(InputError, match="truncated"):
        limits.load_npy(short)


# -- FIFOs, devices and folders are never opened -----------------------------------------------
def _unblock_later(fifo: Path, after: float = 30.0) -> threading.Timer:
    """Opens the FIFO for writing after ``after`` s, so code that did open it gets EOF, not a hang."""
    def poke():
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:
            return  # nobody is reading it: nothing to unblock
        os.close(fd)
    t = threading.Timer(after, poke)
    t.daemon = True
    t.start()
    return t


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_device_or_folder_as_an_image_is_a_failure(tmp_path, tiny_weights):
    img = _field(tmp_path / "f.png")
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    (tmp_path / "dir.png").mkdir()
    timer = _unblock_later(fifo)
    m = tmp_path / "m.csv"
    m.write_text(f"image,slide_id,x,y\n{fifo},s1,5,5\n/dev/zero,s2,5,5\n{tmp_path / 'dir.png'},s3,5,5\n{img},s4,20,20\n")
    report = ingest(open_source(m), tmp_path / "st", _config(tiny_weights))
    timer.cancel()
    assert report.cells_added == 1 and report.cells_failed == 3
    reasons = {f["where"]: f["reason"] for f in _failures(tmp_path / "st")}
    assert "a FIFO" in reasons[str(fifo)] and "a device" in reasons["/dev/zero"]
    assert "a folder" in reasons[str(tmp_path / "dir.png")]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_in_a_crops_folder_is_a_failure_not_skipped(tmp_path, tiny_weights):
    crops = tmp_path / "crops" / "s"
    crops.mkdir(parents=True)
    os.mkfifo(crops / "pipe.jpg")
    _field(crops / "ok.png", (40, 40))
    timer = _unblock_later(crops / "pipe.jpg")
    report = ingest(open_source(tmp_path / "crops", "crops"), tmp_path / "st", _config(tiny_weights))
    timer.cancel()
    assert report.cells_added == 1 and report.cells_failed == 1
    (fail,) = _failures(tmp_path / "st")
    assert fail["where"].endswith("pipe.jpg") and "FIFO" in fail["reason"]


# -- malformed VOC and GeoJSON -----------------------------------------------------------------
def _voc_object(name: str, box: tuple) -> str:
    tags = "".join(f"<{t}>{v}</{t}>" for t, v in zip(("xmin", "ymin", "xmax", "ymax"), box))
    return f"<object><name>{name}</name><bndbox>{tags}</bndbox></object>"


def test_malformed_voc_objects_are_failures_and_the_rest_ingest(tmp_path, tiny_weights):
    d = tmp_path / "voc"
    d.mkdir()
    _field(d / "f.png")
    objects = [_voc_object("good", (10, 10, 30, 30)), _voc_object("nan", ("nan", 10, 30, 30)),
               _voc_object("inf", (10, "inf", 30, 30)), _voc_object("inverted", (50, 10, 30, 30)),
               "<object><name>nobox</name></object>", _voc_object("text", ("a", 10, 30, 30)),
               _voc_object("again", (10, 10, 30, 30)), _voc_object("also good", (40, 40, 60, 70))]
    (d / "f.xml").write_text(f"<annotation><filename>f.png</filename>{''.join(objects)}</annotation>")
    report = ingest(open_source(d), tmp_path / "st", _config(tiny_weights))
    assert report.cells_added == 2 and report.cells_failed == 6
    assert [r["label"] for r in _rows(tmp_path / "st", "label")] == ["also good", "good"]
    reasons = {f["where"].rsplit("#", 1)[1]: f["reason"] for f in _failures(tmp_path / "st")}
    assert set(reasons) == {"object1", "object2", "object3", "object4", "object5", "object6"}
    assert "finite" in reasons["object1"] and "finite" in reasons["object2"]
    assert "inverted" in reasons["object3"] and "no bndbox" in reasons["object4"]
    assert "not a number" in reasons["object5"] and "same box" in reasons["object6"]


def test_malformed_geojson_features_are_failures_and_the_rest_ingest(tmp_path, tiny_weights):
    d = tmp_path / "geo"
    d.mkdir()
    _field(d / "f.png")
    point = lambda x, y, **p: {"type": "Feature", "geometry": {"type": "Point", "coordinates": [x, y]},  # noqa: E731
                               "properties": p}
    feats = [point(20, 20, classification={"name": 5}),  # a numeric class name is kept as its text
             point(1e400, 20), {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[1e400, 1],
                                                                                                      [2, 2], [3, 1]]]}},
             {"type": "Feature", "geometry": {"type": "Point", "coordinates": [40, 40]}, "properties": [1, 2]},
             {"type": "Feature", "geometry": {"type": "Point", "coordinates": {"x": 1}}},
             {"type": "Feature", "geometry": {"type": "MultiPoint", "coordinates": 7}},
             point(30, 30, classification={"name": {"deep": [1]}}), "not a feature", 12,
             {"type": "Feature", "geometry": {"type": "Point", "coordinates": [50, 50]}, "id": [1, 2]},
             point(60, 60, classification={"name": "ok"}),
             {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": "x"},
              "properties": {"objectType": "annotation"}}]
    (d / "f.geojson").write_text(json.dumps(feats).replace("Infinity", "1e400"))
    report = ingest(open_source(d), tmp_path / "st", _config(tiny_weights))
    assert report.cells_added == 2
    assert [r["label"] for r in _rows(tmp_path / "st", "label")] == ["5", "ok"]
    wheres = sorted(f["where"].rsplit("#", 1)[1] for f in _failures(tmp_path / "st"))
    assert wheres == sorted(f"feature{k}" for k in (1, 2, 3, 4, 5, 6, 7, 8, 9, 11))
    assert report.cells_failed == 10


@pytest.mark.parametrize("text", ["[" * 100000 + "]" * 100000, '{"features": 5}', '{"features": "abc"}', "\xff",
                                  '{"type": "Thing", "feature": []}'])
def test_geojson_file_that_is_not_a_feature_list_is_one_failure(tmp_path, tiny_weights, text):
    d = tmp_path / "geo"
    d.mkdir()
    _field(d / "a.png")
    _field(d / "b.png", seed=1)
    (d / "a.geojson").write_bytes(text.encode("latin1"))
    (d / "b.geojson").write_text(json.dumps([{"type": "Feature", "geometry": {"type": "Point",
                                                                                "coordinates": [20, 20]}}]))
    res = _cli(d, tmp_path / "st", tiny_weights, "--format", "geojson")
    assert res.exit_code == 1, res.output
    assert len(_rows(tmp_path / "st", "slide_id")) == 1
    (fail,) = _failures(tmp_path / "st")
    assert fail["where"] == str(d / "a.geojson")


# -- duplicate keys from file naming: a recorded "key" failure, exit 1, one stored row ---------
def _crops_jpg_png(d: Path) -> list[str]:
    (d / "s").mkdir(parents=True)
    Image.open(_field(d / "s" / "a.png")).save(d / "s" / "a.jpg")
    return ["--format", "crops"]


def _crops_tilde(d: Path) -> list[str]:
    (d / "s" / "a").mkdir(parents=True)
    _field(d / "s" / "a~b.png")
    shutil.copy(d / "s" / "a~b.png", d / "s" / "a" / "b.png")
    return ["--format", "crops", "--slide-id", "S"]


def _voc_twice(d: Path) -> list[str]:
    d.mkdir()
    _field(d / "f.png")
    xml = f"<annotation><filename>f.png</filename>{_voc_object('a', (10, 10, 30, 30))}</annotation>"
    (d / "f.xml").write_text(xml)
    (d / "g.xml").write_text(xml)
    return []


def _geojson_and_json(d: Path) -> list[str]:
    d.mkdir()
    _field(d / "f.png")
    g = json.dumps([{"type": "Feature", "geometry": {"type": "Point", "coordinates": [20, 20]}}])
    (d / "f.geojson").write_text(g)
    (d / "f.json").write_text(g)
    return ["--format", "geojson"]


@pytest.mark.parametrize("make", [_crops_jpg_png, _crops_tilde, _voc_twice, _geojson_and_json])
def test_two_files_naming_one_key_are_a_key_failure(tmp_path, tiny_weights, make):
    extra = make(tmp_path / "src")
    res = _cli(tmp_path / "src", tmp_path / "st", tiny_weights, *extra)
    assert res.exit_code == 1, res.output
    assert len(_rows(tmp_path / "st", "slide_id", "cell_id")) == 1
    (fail,) = _failures(tmp_path / "st")
    assert fail["stage"] == "key" and "came twice" in fail["reason"]


def test_manifest_labels_that_look_like_numbers_keep_their_text(tmp_path):
    img = _field(tmp_path / "f.png")
    csv = tmp_path / "m.csv"
    csv.write_text("image,slide_id,x,y,label,slide_label\n"
                   + "".join(f"{img},s1,{10 + i},20,{lab},{lab}\n" for i, lab in enumerate(["007", "1.50", "1e3", "NA"])))
    cells, fails = [], []
    for item in ManifestSource(csv):
        (fails.append(item) if hasattr(item, "reason") else cells.extend(item.cells))
    assert not fails and [c.label for c in cells] == ["007", "1.50", "1e3", "NA"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
@pytest.mark.parametrize("name, fmt", [("pipe", None), ("pipe.csv", None), ("pipe.geojson", "geojson"),
                                       ("pipe.xml", "voc")])
def test_fifo_given_as_the_source_is_refused(tmp_path, tiny_weights, name, fmt):
    fifo = tmp_path / name
    os.mkfifo(fifo)
    timer = _unblock_later(fifo)
    res = _cli(fifo, tmp_path / "st", tiny_weights, *(["--format", fmt] if fmt else []))
    timer.cancel()
    assert res.exit_code in {1, 2} and "FIFO" in res.output, res.output
    assert res.exit_code == 2 or "FIFO" in _failures(tmp_path / "st")[0]["reason"]


def test_manifest_of_one_header_line_without_newline_has_no_rows(tmp_path, tiny_weights):
    m = tmp_path / "m.csv"
    m.write_text("image,slide_id,x,y")  # Arrow refuses it: "Empty CSV file"
    res = _cli(m, tmp_path / "st", tiny_weights)
    assert res.exit_code == 0 and "0 cells added" in res.output, res.output
    (tmp_path / "e.csv").write_text("")
    res = _cli(tmp_path / "e.csv", tmp_path / "st", tiny_weights)
    assert res.exit_code == 2 and "no header line" in res.output, res.output


def test_parquet_id_that_is_nan_is_a_failure_not_the_text_nan(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    img = _field(tmp_path / "f.png")
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"image": [str(img)] * 2, "slide_id": [1.0, float("nan")], "x": [20.0, 30.0],
                             "y": [20.0, 30.0]}), path)
    items = list(ManifestSource(path))
    cells = [c for i in items if hasattr(i, "cells") for c in i.cells]
    fails = [i for i in items if hasattr(i, "reason")]
    assert [c.slide_id for c in cells] == ["1.0"]
    assert len(fails) == 1 and fails[0].where == f"{path}:row 2" and "slide_id is nan" in fails[0].reason


def test_manifest_failure_names_its_line_once(tmp_path):
    img = _field(tmp_path / "f.png")
    csv = tmp_path / "m.csv"
    csv.write_text(f"image,slide_id,x,y\n{img},a/b,20,20\n")
    (fail,) = [i for i in ManifestSource(csv) if hasattr(i, "reason")]
    assert fail.where == f"{csv}:line 2" and str(csv) not in fail.reason and "path separator" in fail.reason
