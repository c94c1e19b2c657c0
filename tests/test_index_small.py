"""IVF-PQ on small tables: refused up front with what to use instead (no FAISS k-means
warning per PQ sub-quantizer); from the minimum on it trains without warnings."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from cli.main import app
from conftest import SAMPLE, SMALL_FIELDS, TINY, sample_rows, write_manifest
from cytostore import IngestConfig, ingest, open_source
from cytostore.index import IndexParams, build_index
from cytostore.index.faiss import IVFPQ_MIN_ROWS


def _store(path, manifest, weights):
    report = ingest(open_source(manifest), path, IngestConfig(encoder=TINY, weights=str(weights), device="cpu"))
    return path, report.cells_added


def test_ivfpq_on_a_small_table_exits_2_and_says_why(tmp_path, tiny_weights, capfd):
    store, n = _store(tmp_path / "small", write_manifest(sample_rows(SMALL_FIELDS), tmp_path / "m.csv"), tiny_weights)
    assert n < IVFPQ_MIN_ROWS
    capfd.readouterr()
    res = CliRunner().invoke(app, ["index", "build", "--store", str(store), "--kind", "ivf-pq"])
    assert res.exit_code == 2
    assert f"at least {IVFPQ_MIN_ROWS} cells" in res.output and f"has {n} cells" in res.output
    assert "--kind flat" in res.output
    assert "WARNING" not in capfd.readouterr().err
    assert build_index(store, kind="auto")["kind"] == "flat"
    # auto with a lowered exact threshold still does not pick a kind it cannot train
    assert build_index(store, kind="auto", params=IndexParams(exact_max=10))["kind"] == "flat"


def test_ivfpq_from_the_minimum_trains_without_faiss_warnings(tmp_path, tiny_weights, capfd):
    store, n = _store(tmp_path / "sample", SAMPLE / "manifest.csv", tiny_weights)
    assert n >= IVFPQ_MIN_ROWS
    capfd.readouterr()
    side = build_index(store, kind="ivf-pq", params=IndexParams(tune_queries=50))
    assert side["kind"] == "ivf-pq"
    assert "WARNING" not in capfd.readouterr().err
    with pytest.raises(Exception, match="training sample is 500"):
        build_index(store, kind="ivf-pq", params=IndexParams(train_size=500))
