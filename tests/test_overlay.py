"""`cytostore overlay`: stored detections drawn on the real field (or whole-slide) image."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cli.main import app
from cytostore import CellStore
from cytostore.maps.overlay import LEGEND_W

runner = CliRunner()


def _json(res) -> dict:
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout.strip().splitlines()[-1])


def _ring_hits(png: Path, cells: list[dict], colours: dict, r: dict) -> float:
    """Share of cells whose circle shows their colour at one of its four cardinal points (+-2 px)."""
    a = np.asarray(Image.open(png).convert("RGB")).astype(int)
    ox, oy = (r["read"]["region"][:2] if r["read"]["kind"] == "slide" else (0, 0))
    s = r["scale"]
    hits = 0
    for c in cells:
        col = np.array(colours[c["name"]])
        rad = max(2.0, 0.35 * c["crop_size"] * s)
        cx, cy = (c["x"] - ox) * s, (c["y"] - oy) * s
        found = False
        for px, py in ((cx + rad, cy), (cx - rad, cy), (cx, cy + rad), (cx, cy - rad)):
            x, y = int(round(px)), int(round(py))
            win = a[max(0, y - 2):y + 3, max(0, x - 2):min(x + 3, a.shape[1] - LEGEND_W)]
            found |= bool((np.abs(win - col).sum(axis=-1) == 0).any())
        hits += found
    return hits / len(cells)


def test_overlay_field_by_label_and_prediction(small_store, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(small_store, store)
    s = CellStore.open(store)
    cells = s.cells(columns=["uid", "x", "y", "crop_size", "label", "image"], where="slide_id = 'chula-27'").to_pylist()
    out = tmp_path / "label.png"
    r = _json(runner.invoke(app, ["overlay", "--store", str(store), "--slide", "chula-27", "--out", str(out), "--json"]))
    assert r["cells"] == len(cells) and r["cells_outside_image"] == 0 and r["color_by"] == "label"
    assert r["image"] == cells[0]["image"] and r["read"]["kind"] == "image"
    assert r["legend"]["classes"] == dict(Counter(c["label"] for c in cells).most_common())
    with Image.open(cells[0]["image"]) as field, Image.open(out) as im:
        assert im.size == (field.width + LEGEND_W, field.height)  # a 640x480 field is drawn whole, unscaled
    colours = r["legend"]["colors"]
    assert _ring_hits(out, [{**c, "name": c["label"]} for c in cells], colours, r) >= 0.9

    # Coloured by a few-shot prediction set instead.
    from cytostore.fewshot import fit, predict, read_predictions
    from test_fewshot import _support_file

    sup, _ = _support_file(tmp_path / "support.csv", store)
    fit(store, sup, "rbc")
    predict(store, "rbc")
    pred = {p["uid"]: p["prediction"] for p in read_predictions(store, "rbc", where="slide_id = 'chula-27'").to_pylist()}
    out = tmp_path / "pred.png"
    r = _json(runner.invoke(app, ["overlay", "--store", str(store), "--slide", "chula-27", "--out", str(out),
                                  "--predictions", "rbc", "--json"]))
    assert r["color_by"] == "prediction:rbc" and r["legend"]["classes"] == dict(Counter(pred.values()).most_common())
    assert _ring_hits(out, [{**c, "name": pred[c["uid"]]} for c in cells], r["legend"]["colors"], r) >= 0.9


def test_overlay_errors(small_store, tmp_path):
    res = runner.invoke(app, ["overlay", "--store", str(small_store), "--slide", "nope", "--out", str(tmp_path / "o.png")])
    assert res.exit_code == 2 and "nope" in res.output and "cytostore slides" in res.output
    res = runner.invoke(app, ["overlay", "--store", str(small_store), "--slide", "chula-1", "--out",
                              str(tmp_path / "o.png"), "--predictions", "missing"])
    assert res.exit_code == 2 and "missing" in res.output
    res = runner.invoke(app, ["overlay", "--store", str(small_store), "--slide", "chula-1", "--out",
                              str(tmp_path / "o.png"), "--predictions", "x", "--attention", str(tmp_path)])
    assert res.exit_code == 2 and "not both" in res.output
    assert not (tmp_path / "o.png").exists()


def test_overlay_whole_slide_reads_a_pyramid_level(tmp_path):
    """A real field written as a 3-level tiled TIFF (x4), read through OpenSlide at a level > 0."""
    tifffile = pytest.importorskip("tifffile")
    openslide = pytest.importorskip("openslide")
    from cytostore import IngestConfig, ingest, open_source
    from cytostore.imaging import CropPolicy
    from conftest import sample_rows, write_manifest

    rows = sample_rows(["chula-1"])
    with Image.open(rows[0]["image"]) as im:
        big = np.asarray(im.convert("RGB").resize((im.width * 4, im.height * 4), Image.BICUBIC))
    wsi = tmp_path / "chula-1.tiff"
    with tifffile.TiffWriter(wsi) as tw:
        tw.write(big, tile=(256, 256), photometric="rgb", compression="zlib")
        for k in (2, 4):
            tw.write(np.ascontiguousarray(big[::k, ::k]), tile=(256, 256), photometric="rgb", compression="zlib",
                     subfiletype=1)
    assert openslide.OpenSlide(str(wsi)).level_count == 3
    cells = [{**r, "image": str(wsi), "x": float(r["x"]) * 4, "y": float(r["y"]) * 4} for r in rows[:12]]
    manifest = write_manifest(cells, tmp_path / "cells.csv")
    assert ingest(open_source(manifest), tmp_path / "store", IngestConfig(batch_size=16, crop=CropPolicy(crop_size=128))).cells_failed == 0
    out = tmp_path / "wsi.png"
    r = _json(runner.invoke(app, ["overlay", "--store", str(tmp_path / "store"), "--slide", "chula-1", "--out",
                                  str(out), "--max-side", "600", "--json"]))
    read = r["read"]
    assert read["kind"] == "slide" and read["level"] >= 1 and max(read["size"]) <= 600
    x0, y0, x1, y1 = read["region"]
    assert all(x0 <= c["x"] < x1 and y0 <= c["y"] < y1 for c in cells)  # the region holds the cells, not the slide
    stored = CellStore.open(tmp_path / "store").cells(columns=["x", "y", "crop_size", "label"]).to_pylist()
    assert r["cells"] == 12 and r["cells_outside_image"] == 0
    assert _ring_hits(out, [{**c, "name": c["label"]} for c in stored], r["legend"]["colors"], r) >= 0.9
