"""Slide-level MIL: masking, grouped folds, provenance, errors, repeatability, CLI end to end.

Bags come from small generated stores (cytostore.mil.synthetic): no encoder runs,
so the file stays fast; scoring against stored slide labels also runs on real Chula
cells (one ingest of two fields, module-scoped).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cli.main import app
from cytostore.errors import InputError, ProvenanceError
from cytostore.mil import BagSet, TrainConfig, make_folds, predict, train_mil
from cytostore.mil.cv import inner_split
from cytostore.mil.labels import SlideLabels, check_cross_validatable
from cytostore.mil.synthetic import write_synthetic_store
from cytostore.store import CellStore

CLASSES = ["neg", "a", "b"]
FAST = TrainConfig(epochs=6, patience=3, max_cells=64, device="cpu", hidden=32, attn_dim=16)
runner = CliRunner()


def _slides(n: int = 18, seed: int = 1) -> dict[str, tuple[str, int]]:
    rng = np.random.default_rng(seed)
    return {f"s{i:02d}": (CLASSES[i % 3], int(rng.integers(20, 90))) for i in range(n)}


def _write_labels(path: Path, slides: dict, patients: bool = True, extra: list[tuple[str, str]] = ()) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["slide_id", "label", "patient_id"])
        for i, (s, (lab, _)) in enumerate(slides.items()):
            w.writerow([s, lab, f"p{i // 2}" if patients else f"q{i}"])
        for s, lab in extra:
            w.writerow([s, lab, f"x-{s}"])
    return path


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    """A generated store of 18 slides (3 classes, patients of 2 slides) and its labels file."""
    root = tmp_path_factory.mktemp("mil")
    slides = _slides()
    write_synthetic_store(root / "store", slides, CLASSES, dim=16)
    return {"root": root, "store": root / "store", "labels": _write_labels(root / "labels.csv", slides),
            "slides": slides}


@pytest.fixture(scope="module")
def trained(syn):
    """A small ABMIL model directory trained through the CLI, with its JSON report."""
    out = syn["root"] / "model"
    res = runner.invoke(app, ["mil", "train", "--store", str(syn["store"]), "--labels", str(syn["labels"]),
                              "--out", str(out), "--folds", "3", "--epochs", "6", "--max-cells", "64",
                              "--device", "cpu", "--json"])
    assert res.exit_code == 0, res.output
    return out, json.loads(res.stdout.strip().splitlines()[-1])


# -- models -------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["abmil", "mean"])
@pytest.mark.parametrize("norm", ["standardize", "layernorm"])
def test_padding_with_junk_equals_unpadded(kind, norm):
    import torch

    from cytostore.mil.models import ModelConfig, build_model, pad_bags

    torch.manual_seed(0)
    model = build_model(ModelConfig(kind=kind, in_dim=12, n_classes=3, hidden=16, attn_dim=8, input_norm=norm))
    model.set_input_stats(torch.randn(12), torch.rand(12) + 0.5)
    model.eval()
    bags = [torch.randn(n, 12) for n in (5, 11, 1)]
    for fill in (1e4, float("nan"), float("inf")):
        x, mask = pad_bags(bags, fill=fill)
        with torch.no_grad():
            logits, attn = model(x, mask)
            for i, b in enumerate(bags):
                ref_logits, ref_attn = model(b.unsqueeze(0), torch.ones(1, len(b), dtype=torch.bool))
                torch.testing.assert_close(logits[i], ref_logits[0], atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(attn[i, : len(b)], ref_attn[0], atol=1e-6, rtol=1e-5)
                assert torch.all(attn[i, len(b):] == 0)
                assert torch.isclose(attn[i].sum(), torch.tensor(1.0))


def test_chunked_float16_inference_equals_whole(monkeypatch):
    import torch

    from cytostore.mil import models

    torch.manual_seed(0)
    model = models.build_model(models.ModelConfig(kind="abmil", in_dim=12, n_classes=2, hidden=16, attn_dim=8)).eval()
    bags = [torch.randn(n, 12).half() for n in (23, 7)]
    x32, mask = models.pad_bags(bags)
    ref_logits, ref_attn = model(x32, mask)  # autograd on: one pass over all cells
    monkeypatch.setattr(models, "INFER_CHUNK", 4)
    x16, mask16 = models.pad_bags(bags, dtype=None)
    assert x16.dtype == torch.float16
    with torch.inference_mode():
        logits, attn = model(x16, mask16)  # no autograd: 4-cell chunks
    torch.testing.assert_close(logits, ref_logits.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attn, ref_attn.detach(), atol=1e-6, rtol=1e-5)


# -- folds --------------------------------------------------------------------
def _grouped_labels(n: int = 40, seed: int = 0) -> SlideLabels:
    rng = np.random.default_rng(seed)
    ids = [f"s{i}" for i in range(n)]
    patients = [f"p{int(rng.integers(0, 14))}" for _ in ids]
    # A patient's slides share a diagnosis, as in real cohorts.
    by_patient = {p: CLASSES[int(p[1:]) % 3] for p in set(patients)}
    return SlideLabels(tuple(ids), tuple(by_patient[p] for p in patients), tuple(patients), ("",) * n, "test")


@pytest.mark.parametrize("k", [3, 5])
def test_folds_never_split_a_patient(k):
    labels = _grouped_labels()
    folds = make_folds(labels, k, seed=7)
    assert len(folds) == k
    tests = [set(te.tolist()) for _, te in folds]
    assert sorted(i for t in tests for i in t) == list(range(len(labels.slide_ids)))  # each slide tested once
    pat = np.array(labels.patients)
    for tr, te in folds:
        assert not set(pat[tr]) & set(pat[te])
        inner_tr, val = inner_split(labels, tr, 0.25, seed=3)
        assert sorted(np.concatenate([inner_tr, val]).tolist()) == sorted(tr.tolist())
        assert not set(pat[inner_tr]) & set(pat[val])


def test_single_slide_class_is_refused():
    labels = SlideLabels(("a1", "a2", "b1"), ("a", "a", "b"), ("a1", "a2", "b1"), ("", "", ""), "x.csv")
    with pytest.raises(InputError, match="single slide .*'b1'.* cannot be cross-validated"):
        check_cross_validatable(labels, 2)


def test_single_slide_class_cli(syn, tmp_path):
    slides = dict(list(syn["slides"].items())[:9])
    slides["s17"] = ("lonely", 0)
    labels = _write_labels(tmp_path / "l.csv", slides)
    res = runner.invoke(app, ["mil", "train", "--store", str(syn["store"]), "--labels", str(labels),
                              "--out", str(tmp_path / "m"), "--folds", "2"])
    assert res.exit_code == 2
    assert "class 'lonely' has a single slide" in res.output and "cross-validated" in res.output


def test_labels_naming_absent_slides_exit_2(syn, tmp_path):
    labels = _write_labels(tmp_path / "l.csv", syn["slides"], extra=[("ghost-1", "a"), ("ghost-2", "neg")])
    res = runner.invoke(app, ["mil", "train", "--store", str(syn["store"]), "--labels", str(labels),
                              "--out", str(tmp_path / "m")])
    assert res.exit_code == 2
    assert "2 slide(s) not in" in res.output and "'ghost-1'" in res.output and "'ghost-2'" in res.output
    assert not (tmp_path / "m").exists()


# -- bags ---------------------------------------------------------------------
def test_streamed_bags_equal_cached(syn):
    store = CellStore.open(syn["store"])
    ids = list(syn["slides"])[:5]
    cached = BagSet(store, "synthetic", ids)
    streamed = BagSet(store, "synthetic", ids, cache_bytes=0)
    assert cached.cached and not streamed.cached
    for a, b in zip(cached, streamed):
        assert a.slide_id == b.slide_id and len(a.uids) == syn["slides"][a.slide_id][1]
        np.testing.assert_array_equal(a.uids, b.uids)
        np.testing.assert_array_equal(a.features, b.features)


# -- training -----------------------------------------------------------------
def test_same_seed_same_metrics_streamed_or_cached(syn, tmp_path):
    r1 = train_mil(syn["store"], syn["labels"], tmp_path / "m1", FAST, folds=3)
    r2 = train_mil(syn["store"], syn["labels"], tmp_path / "m2", TrainConfig(**{**FAST.to_dict(), "cache_bytes": 0}),
                   folds=3)
    assert r1.cached and not r2.cached
    assert r1.folds == r2.folds and r1.oof == r2.oof
    w1 = (tmp_path / "m1" / "model.safetensors").read_bytes()
    assert w1 == (tmp_path / "m2" / "model.safetensors").read_bytes()


def test_labels_from_store_column(syn, tmp_path):
    rep = train_mil(syn["store"], "slide_label", tmp_path / "m", TrainConfig(**{**FAST.to_dict(), "model": "mean"}),
                    folds=3)
    assert rep.classes == sorted(CLASSES) and sum(rep.counts.values()) == len(syn["slides"])
    assert json.loads((tmp_path / "m" / "config.json").read_text())["labels"]["source"] == "slide_label"


# -- CLI end to end -----------------------------------------------------------
def test_train_json_report(trained):
    out, report = trained
    for key in ("accuracy", "balanced_accuracy", "auc", "accuracy_std", "balanced_accuracy_std", "auc_std",
                "majority_rate", "folds"):
        assert key in report
    assert len(report["folds"]) == 3 and report["majority_rate"] == pytest.approx(1 / 3)
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["kind"] == "abmil" and config["classes"] == sorted(CLASSES)
    assert config["features"]["table"] == "synthetic" and config["features"]["encoder"]["weights_sha256"] == "0" * 64
    assert json.loads((out / "metrics.json").read_text())["folds"] == report["folds"]


def test_predict_and_explain_cli(syn, trained, tmp_path):
    out, _ = trained
    res = runner.invoke(app, ["mil", "predict", "--store", str(syn["store"]), "--model", str(out),
                              "--out", str(tmp_path / "p.csv"), "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout.strip().splitlines()[-1])
    assert d["slides"] == len(syn["slides"])
    for row in d["predictions"]:
        assert row["label"] in CLASSES and row["n_cells"] == syn["slides"][row["slide_id"]][1]
        assert sum(row["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
    assert (tmp_path / "p.csv").read_text().startswith('"slide_id","label","n_cells","p_a"')
    res = runner.invoke(app, ["mil", "predict", "--store", str(syn["store"]), "--model", str(out),
                              "--where", "slide_id IN ('s01', 's02')", "--json"])
    assert [r["slide_id"] for r in json.loads(res.stdout.strip().splitlines()[-1])["predictions"]] == ["s01", "s02"]

    png = tmp_path / "top.png"
    res = runner.invoke(app, ["mil", "explain", "--store", str(syn["store"]), "--model", str(out), "--slide", "s01",
                              "--top", "5", "--montage", str(png), "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout.strip().splitlines()[-1])
    assert d["n_cells"] == syn["slides"]["s01"][1] and len(d["top"]) == 5
    assert set(d["top"][0]) == {"uid", "cell_id", "attention", "x", "y"}
    att = [c["attention"] for c in d["top"]]
    assert att == sorted(att, reverse=True)
    from PIL import Image

    with Image.open(png) as im:
        assert im.size[0] == 5 * 96


def test_unknown_model_dir_exit_2(syn, tmp_path):
    res = runner.invoke(app, ["mil", "predict", "--store", str(syn["store"]), "--model", str(tmp_path / "nope")])
    assert res.exit_code == 2 and "not a MIL model directory" in res.output


def test_predict_refuses_other_encoder(syn, trained, tmp_path):
    out, _ = trained
    # Same table name, features made with other weights.
    write_synthetic_store(tmp_path / "other", dict(list(syn["slides"].items())[:3]), CLASSES, dim=16,
                          weights_sha256="1" * 64)
    with pytest.raises(ProvenanceError, match="weights_sha256: model trained on '0{64}', table has '1{64}'"):
        predict(tmp_path / "other", out)
    # A second table of another encoder in the training store, chosen explicitly.
    store = tmp_path / "two"
    write_synthetic_store(store, dict(list(syn["slides"].items())[:3]), CLASSES, dim=16)
    write_synthetic_store(store, dict(list(syn["slides"].items())[:3]), CLASSES, dim=16, table="other",
                          encoder="efficientnet_lite0", weights_sha256="2" * 64)
    res = runner.invoke(app, ["mil", "predict", "--store", str(store), "--model", str(out), "--table", "other"])
    assert res.exit_code == 2
    assert "encoder.name: model trained on 'synthetic', table has 'efficientnet_lite0'" in res.output
    assert predict(store, out).table == "synthetic"  # default: the table the model was trained on


@pytest.mark.gpu
def test_train_and_predict_on_cuda(syn, tmp_path):
    cfg = TrainConfig(**{**FAST.to_dict(), "device": "cuda"})
    rep = train_mil(syn["store"], syn["labels"], tmp_path / "m", cfg, folds=3)
    assert len(rep.folds) == 3
    preds = predict(syn["store"], tmp_path / "m", device="cuda")
    np.testing.assert_allclose(preds.proba.sum(1), 1.0, atol=1e-4)


def test_split_test_rows_are_held_out(syn, tmp_path):
    path = tmp_path / "l.csv"
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["slide_id", "label", "split"])
        for i, (s, (lab, _)) in enumerate(syn["slides"].items()):
            w.writerow([s, lab, "test" if i >= 15 else "train"])
    rep = train_mil(syn["store"], path, tmp_path / "m", FAST, folds=3)
    assert sum(rep.counts.values()) == 15 and rep.test["n"] == 3
    assert {r["slide_id"] for r in rep.oof} == set(list(syn["slides"])[:15])


# -- scoring against the store's slide labels, on real cells ---------------------------------
REAL_FIELDS = ("chula-1", "chula-27")


@pytest.fixture(scope="module")
def real_split(tmp_path_factory, small_store):
    """Two real Chula fields cut into 4 slides each (slide_label = the field), and a model
    trained on 2 slides of each field."""
    from cytostore import IngestConfig, ingest, open_source
    from conftest import sample_rows, write_manifest

    root = tmp_path_factory.mktemp("mil-real")
    rows = []
    for field in REAL_FIELDS:
        cells = sample_rows([field])
        for i, r in enumerate(cells):
            rows.append({**r, "slide_id": f"{field}-{i % 4}", "slide_label": field})
    report = ingest(open_source(write_manifest(rows, root / "cells.csv")), root / "store", IngestConfig(batch_size=32))
    assert report.cells_failed == 0
    train = [f"{f}-{k}" for f in REAL_FIELDS for k in (0, 1)]
    labels = root / "train.csv"
    with open(labels, "w", newline="") as fh:
        csv.writer(fh).writerows([["slide_id", "label"], *[[s_, s_.rsplit("-", 1)[0]] for s_ in train]])
    train_mil(root / "store", labels, root / "model", FAST, folds=2)
    return {"store": root / "store", "model": root / "model", "train": set(train), "small": small_store}


def test_mil_predict_scores_held_out_slides(real_split, tmp_path):
    res = runner.invoke(app, ["mil", "predict", "--store", str(real_split["store"]), "--model",
                              str(real_split["model"]), "--device", "cpu", "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout.strip().splitlines()[-1])
    sc = d["score"]
    held = [r for r in d["predictions"] if r["slide_id"] not in real_split["train"]]
    assert d["slides"] == 8 and sc["labelled_slides"] == 8 and sc["training_excluded"] == 4 and sc["n"] == len(held) == 4
    truth = [r["slide_id"].rsplit("-", 1)[0] for r in held]
    assert sc["accuracy"] == pytest.approx(np.mean([r["label"] == t for r, t in zip(held, truth)]), abs=1e-4)
    assert np.array(sc["confusion"]["matrix"]).sum() == 4 and sc["confusion"]["rows"] == sorted(set(truth))
    res = runner.invoke(app, ["mil", "predict", "--store", str(real_split["store"]), "--model",
                              str(real_split["model"]), "--device", "cpu"])
    assert "against the stored labels of 4 slides (4 slides the model was trained on excluded)" in res.output

    # A store without slide labels: no score.
    res = runner.invoke(app, ["mil", "predict", "--store", str(real_split["small"]), "--model",
                              str(real_split["model"]), "--device", "cpu", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout.strip().splitlines()[-1])["score"] is None


def test_attention_montage_captions_name_cell_and_label(real_split, tmp_path):
    from PIL import Image

    from cytostore.maps.captions import caption_font, line_height
    from cytostore.mil import explain, montage

    e = explain(real_split["store"], real_split["model"], "chula-27-2", device="cpu")
    png = montage(real_split["store"], e, tmp_path / "top.png", top=8, columns=4)
    with Image.open(png) as im:
        w, h = im.size
    assert w == 4 * 96
    lines = (h // 2) - 96  # two rows of tiles, each with its caption
    assert lines >= 3 * line_height(caption_font(10))  # rank/attention, cell id, label


def test_overlay_coloured_by_attention(real_split, tmp_path):
    from cytostore.mil import explain

    e = explain(real_split["store"], real_split["model"], "chula-27-2", device="cpu")
    att = e.cells.column("attention").to_numpy()
    out = tmp_path / "att.png"
    res = runner.invoke(app, ["overlay", "--store", str(real_split["store"]), "--slide", "chula-27-2", "--out", str(out),
                              "--attention", str(real_split["model"]), "--json"])
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout.strip().splitlines()[-1])
    assert r["color_by"] == "attention" and r["cells"] == e.cells.num_rows
    assert r["legend"]["min"] == pytest.approx(float(att.min())) and r["legend"]["max"] == pytest.approx(float(att.max()))
    assert r["legend"]["mil_label"] == e.label and out.stat().st_size > 0
