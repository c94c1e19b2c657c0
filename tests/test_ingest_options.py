"""Ingest options that change what a cell row holds: --features, --tta, --stain, --morphometrics,
the per-cell content hash, and `cytostore harmonise` (derived tables). Tiny encoder, real cells."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from conftest import TINY, sample_rows, write_manifest

from cytostore import IngestConfig, ingest, open_source
from cytostore.errors import InputError, ProvenanceError
from cytostore.store import CellStore

FIELDS = ["chula-1", "chula-27", "chula-255"]


def _crop(side: int = 64) -> np.ndarray:
    """A real red-cell crop from the first field of the sample."""
    from PIL import Image

    rows = sample_rows(["chula-1"])
    img = np.asarray(Image.open(rows[0]["image"]).convert("RGB"))
    h, w = img.shape[:2]
    x, y = next((int(float(r["x"])), int(float(r["y"]))) for r in rows
                if side // 2 <= float(r["x"]) < w - side // 2 and side // 2 <= float(r["y"]) < h - side // 2)
    return np.ascontiguousarray(img[y - side // 2:y + side // 2, x - side // 2:x + side // 2])


def _ingest(manifest, store, weights, **kw):
    kw.setdefault("runtime", "torch")
    return ingest(open_source(manifest), store, IngestConfig(encoder=TINY, weights=str(weights), batch_size=32, **kw))


def _emb(store: CellStore, table: str) -> tuple[list, np.ndarray]:
    t = store.dataset(table).to_table(columns=["uid", "slide_id", "embedding"]).sort_by("uid")
    emb = np.asarray(t.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False),
                     dtype=np.float64).reshape(t.num_rows, -1)
    return t.column("uid").to_pylist(), t.column("slide_id").to_pylist(), emb


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return write_manifest(sample_rows(FIELDS), tmp_path_factory.mktemp("opts") / "cells.csv")


@pytest.fixture(scope="module")
def plain_store(tmp_path_factory, manifest, tiny_weights):
    """Three real fields (360 cells) embedded by the tiny encoder, no options (read-only for tests)."""
    path = tmp_path_factory.mktemp("opts-store") / "store"
    report = _ingest(manifest, path, tiny_weights, table="plain")
    assert report.cells_added == 360 and report.cells_failed == 0
    return path


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.mark.parametrize("runtime", ["torch", "onnx"])
def test_tta8_embeds_rotated_and_mirrored_cells_the_same(tiny_weights, runtime):
    from cytostore.embed import Embedder
    from cytostore.encoders import create_encoder
    from cytostore.encoders.features import with_options

    if runtime == "onnx":
        pytest.importorskip("onnxruntime")
    crop = _crop(160)
    views = np.stack([crop, np.rot90(crop, 1), np.rot90(crop, 2), np.rot90(crop, 3), crop[:, ::-1],
                      np.rot90(crop[:, ::-1], 1), crop[::-1]]).copy()
    plain = Embedder(create_encoder(TINY, tiny_weights), "cpu", batch_size=8, runtime="torch")(views)
    assert _cosines(plain[:1], plain[1:]).min() < 0.999  # the backbone alone is not invariant
    tta = Embedder(with_options(create_encoder(TINY, tiny_weights), tta=8), "cpu", batch_size=8, runtime=runtime)
    out = tta(views)
    assert _cosines(out[:1], out[1:]).min() > 0.9999
    rot4 = Embedder(with_options(create_encoder(TINY, tiny_weights), tta=4), "cpu", batch_size=8,
                    runtime="torch")(views[:4])
    assert _cosines(rot4[:1], rot4[1:]).min() > 0.9999


def test_multilayer_dim_identity_and_refusals(tmp_path, manifest, tiny_weights, plain_store):
    import torch

    from cytostore.encoders import create_encoder
    from cytostore.encoders.features import with_options

    enc = create_encoder(TINY, tiny_weights)
    wrapped = with_options(enc, features="multilayer")
    b = enc.model
    with torch.inference_mode():  # channels of each stage output, by running the stages
        x = b.bn1(b.conv_stem(torch.zeros(1, 3, 64, 64)))
        widths = []
        for stage in b.blocks:
            x = stage(x)
            widths.append(x.shape[1])
    assert wrapped.dim == enc.dim + sum(widths[-5:]) and wrapped.dim > enc.dim
    assert wrapped.weights_sha256 == enc.weights_sha256 and wrapped.arch == enc.arch + "+multilayer"
    assert wrapped.model(torch.rand(3, 3, 160, 160)).shape == (3, wrapped.dim)

    store = tmp_path / "store"
    shutil.copytree(plain_store, store)
    few = write_manifest(sample_rows(["chula-1"])[:40], tmp_path / "few.csv")
    report = _ingest(few, store, tiny_weights, features="multilayer", tta=4)
    assert report.table == "test_efficientnet_multilayer_tta4" and report.cells_added == 40
    s = CellStore.open(store)
    ident = s.provenance(report.table)["identity"]["encoder"]
    assert ident["arch"] == f"{enc.arch}+multilayer+tta4" and ident["dim"] == wrapped.dim
    assert s.provenance(report.table)["cell_options"]["features"]["tta"] == 4
    # Rows made with other options never join a table: TTA rows into the plain table, and back.
    with pytest.raises(ProvenanceError, match="arch"):
        _ingest(few, store, tiny_weights, tta=4, table="plain")
    with pytest.raises(ProvenanceError, match="arch"):
        _ingest(few, store, tiny_weights, table=report.table)
    assert s.count("plain") == 360 and s.count(report.table) == 40
    with pytest.raises(InputError, match="tta"):
        _ingest(few, store, tiny_weights, tta=3, table="other")


@pytest.mark.parametrize("runtime", ["torch", "onnx"])
def test_zoom2_adds_the_enlarged_centre_as_a_second_scale(tmp_path, tiny_weights, runtime):
    import torch

    from cytostore.embed import Embedder
    from cytostore.encoders import create_encoder
    from cytostore.encoders.features import with_options

    if runtime == "onnx":
        pytest.importorskip("onnxruntime")
    enc = create_encoder(TINY, tiny_weights)
    zoomed = with_options(enc, zoom=2, tta=8)
    assert zoomed.dim == 2 * enc.dim and zoomed.arch == enc.arch + "+tta8+zoom2"
    crop = _crop(160)
    views = np.stack([crop, np.rot90(crop, 1), crop[:, ::-1]]).copy()
    out = Embedder(zoomed, "cpu", batch_size=4, runtime=runtime)(views)
    assert out.shape == (3, 2 * enc.dim)
    assert _cosines(out[:1], out[1:]).min() > 0.9999  # the centre is centred: still invariant
    # The second half is the backbone's embedding of the central half enlarged, the first the crop's.
    x = torch.rand(2, 3, 64, 64)
    plain = with_options(enc, zoom=2)
    with torch.inference_mode():
        both = plain.model(x)
        centre = torch.nn.functional.interpolate(x[:, :, 16:48, 16:48], size=(64, 64), mode="bilinear",
                                                 align_corners=False)
        assert torch.allclose(both[:, :enc.dim], enc.model(x), atol=1e-5)
        assert torch.allclose(both[:, enc.dim:], enc.model(centre), atol=1e-5)
    with pytest.raises(InputError, match="zoom"):
        IngestConfig(zoom=3)


def test_option_values_are_checked_before_the_store_is_touched(tmp_path):
    from cytostore import stain
    from cytostore.encoders import features

    for kw in ({"features": "pooled"}, {"tta": 2}, {"stain": "vahadane"}):
        with pytest.raises(InputError):
            IngestConfig(**kw)
    for f in features.FEATURES:
        for t in features.TTA:
            IngestConfig(features=f, tta=t)
    for m in stain.METHODS:
        IngestConfig(stain=m)


def test_morphometrics_of_a_disk_of_known_radius():
    from cytostore.morphometrics import COLUMNS, measure

    yy, xx = np.indices((96, 96))
    for r in (12, 20, 30):
        img = np.full((96, 96, 3), 230, np.uint8)
        d2 = (yy - 48) ** 2 + (xx - 47) ** 2
        img[d2 <= r * r] = (190, 110, 120)
        img[d2 <= (0.3 * r) ** 2] = (220, 190, 195)  # a pale centre: filled, and measured as pallor
        m = measure(img)
        assert set(m) == set(COLUMNS)
        assert abs(m["morph_area"] - np.pi * r * r) / (np.pi * r * r) < 0.05
        assert abs(m["morph_equivalent_diameter"] - 2 * r) / (2 * r) < 0.05
        assert m["morph_eccentricity"] < 0.2 and m["morph_solidity"] > 0.9 and m["morph_border"] == 0
        assert m["morph_pallor"] > 0.1
        assert abs(m["morph_red_mean"] - 190 / 255) < 0.05
    assert all(v is None for v in measure(np.full((64, 64, 3), 230, np.uint8)).values())  # no cell


def test_reinhard_maps_lab_statistics_to_the_reference():
    from cytostore.stain import fit, lab_stats, normalise

    crop = _crop(80)
    other = np.clip(crop.astype(int) * [0.8, 1.0, 1.15] + [30, -10, 0], 0, 255).astype(np.uint8)
    ref = fit("reinhard", [other])
    before = lab_stats(crop)
    (out,) = normalise([crop], ref)
    mean, std = lab_stats(out)
    assert np.abs(mean - ref["lab_mean"]).max() < 1.5 < np.abs(before[0] - ref["lab_mean"]).max()
    assert np.allclose(std, ref["lab_std"], rtol=0.1, atol=0.5)
    assert out.shape == crop.shape and out.dtype == np.uint8
    mac = fit("macenko", [other])
    (m_out,) = normalise([crop], mac)
    assert m_out.shape == crop.shape and not np.array_equal(m_out, crop)


def test_stain_and_morphometrics_at_ingest(tmp_path, tiny_weights, plain_store):
    from PIL import Image

    from cytostore.morphometrics import COLUMNS

    store = tmp_path / "store"
    shutil.copytree(plain_store, store)
    few = write_manifest(sample_rows(["chula-27"])[:30], tmp_path / "few.csv")
    report = _ingest(few, store, tiny_weights, stain="reinhard", morphometrics=True)
    assert report.table == "test_efficientnet_reinhard" and report.cells_added == 30
    s = CellStore.open(store)
    prov = s.provenance(report.table)
    ref = prov["identity"]["stain"]
    assert ref["method"] == "reinhard" and len(ref["lab_mean"]) == 3
    assert prov["identity"]["preprocessing"]["crop_rule"].startswith("1+stain:reinhard:")
    assert prov["cell_options"]["stain"]["source"]["table"] == "plain" and prov["identity"]["morphometrics"] == 1
    cells = s.dataset(report.table).to_table(columns=list(COLUMNS)).to_pandas()
    assert cells["morph_area"].notna().mean() > 0.9 and cells["morph_area"].median() > 100
    # A re-run reproduces the reference (the table keeps its own) and adds nothing.
    again = _ingest(few, store, tiny_weights, stain="reinhard", morphometrics=True)
    assert again.cells_added == 0 and again.cells_skipped == 30
    # Plain rows, or another reference, never join it.
    with pytest.raises(ProvenanceError, match="crop_rule"):
        _ingest(few, store, tiny_weights, table=report.table)
    image = tmp_path / "ref.png"
    Image.fromarray(_crop(64)).save(image)
    with pytest.raises(ProvenanceError, match="crop_rule"):
        _ingest(few, store, tiny_weights, stain="reinhard", stain_reference=str(image), table=report.table)
    # Plain tables get null morphometrics.
    plain = s.dataset("plain").to_table(columns=["morph_area"]).column("morph_area")
    assert plain.null_count == plain.length()


def test_content_hash_equal_for_byte_identical_crops(tmp_path, tiny_weights):
    from cytostore.evaluate.run import EvalConfig, find_duplicates

    rows = sample_rows(["chula-1", "chula-27"])
    copy = tmp_path / "copy.jpg"
    shutil.copyfile(rows[0]["image"], copy)  # the same bytes under another path and slide id
    dup = [dict(r, image=str(copy), slide_id="chula-1-copy") for r in rows if r["slide_id"] == "chula-1"]
    manifest = write_manifest(rows + dup, tmp_path / "m.csv")
    _ingest(manifest, tmp_path / "store", tiny_weights, table="t")
    s = CellStore.open(tmp_path / "store")
    t = s.dataset("t").to_table(columns=["uid", "slide_id", "cell_id", "label", "content_hash", "image_hash"])
    df = t.to_pandas()
    a = df[df.slide_id == "chula-1"].set_index("cell_id")
    b = df[df.slide_id == "chula-1-copy"].set_index("cell_id").loc[a.index]
    assert (a.content_hash.values == b.content_hash.values).all() and a.content_hash.notna().all()
    assert a.image_hash.nunique() == 1 and (a.image_hash.values == b.image_hash.values).all()
    other = df[df.slide_id == "chula-27"]
    assert not set(other.content_hash) & set(a.content_hash) and other.image_hash.iloc[0] != a.image_hash.iloc[0]
    assert df.content_hash.nunique() == len(a) + len(other)
    # evaluate's duplicate rule reads the stored hashes: the copy merges with its original.
    lab = df[df.label.notna()]
    cells = {"uid": lab.uid.to_numpy(), "label": lab.label.to_numpy(), "group": lab.slide_id.to_numpy()}
    order = np.argsort(cells["uid"])
    cells = {k: v[order] for k, v in cells.items()}
    dedup = find_duplicates(s, "t", cells, EvalConfig(hash_images=False))
    assert dedup.report["cell_hash"].startswith("content_hash")
    assert dedup.report["groups_before"] == 3 and dedup.report["groups_after"] == 2


def test_harmonise_centres_slides_and_keeps_keys(tmp_path, plain_store):
    from typer.testing import CliRunner

    from cli.main import app

    store = tmp_path / "store"
    shutil.copytree(plain_store, store)
    res = CliRunner().invoke(app, ["harmonise", "--store", str(store), "--table", "plain", "--out", "plain_centred",
                                   "--json"])
    assert res.exit_code == 0, res.output
    s = CellStore.open(store)
    uids, slides, before = _emb(s, "plain")
    uids2, slides2, after = _emb(s, "plain_centred")
    assert uids == uids2 and slides == slides2
    slides = np.asarray(slides)
    means = np.stack([after[slides == g].mean(0) for g in sorted(set(slides))])
    spread_before = np.stack([before[slides == g].mean(0) for g in sorted(set(slides))]).std(0).max()
    assert means.std(0).max() < 0.01 * spread_before + 1e-3  # every slide's mean is the global mean
    assert np.allclose(after.mean(0), before.mean(0), atol=1e-2)
    a = s.dataset("plain").to_table(columns=["uid", "label", "thumbnail"]).sort_by("uid")
    b = s.dataset("plain_centred").to_table(columns=["uid", "label", "thumbnail"]).sort_by("uid")
    assert a.equals(b)
    prov = s.provenance("plain_centred")
    assert prov["derived"]["from"] == "plain" and prov["derived"]["method"] == "centre"
    assert prov["derived"]["from_version"] == s.dataset("plain").version
    assert prov["identity"]["encoder"]["arch"].endswith("+harmonise:centre")
    # The name is taken; morphometrics-only needs morph columns, which a plain table lacks.
    assert CliRunner().invoke(app, ["harmonise", "--store", str(store), "--table", "plain", "--out",
                                    "plain_centred"]).exit_code == 2
    assert CliRunner().invoke(app, ["harmonise", "--store", str(store), "--table", "plain", "--out", "m",
                                    "--method", "none", "--morphometrics", "only"]).exit_code == 2


def test_harmony_reduces_the_slide_signal(tmp_path, plain_store):
    pytest.importorskip("harmonypy")
    from cytostore.harmonise import harmonise

    store = tmp_path / "store"
    shutil.copytree(plain_store, store)
    s = CellStore.open(store)
    out = harmonise(s, "plain", "plain_harmony", method="harmony")
    assert out["rows"] == 360 and out["dim"] == s.provenance("plain")["identity"]["encoder"]["dim"]
    _, slides, before = _emb(s, "plain")
    _, _, after = _emb(s, "plain_harmony")
    slides = np.asarray(slides)

    def between(e):  # spread of the slide means relative to the spread of the cells
        return np.stack([e[slides == g].mean(0) for g in set(slides)]).var(0).sum() / e.var(0).sum()

    assert between(after) < between(before)
