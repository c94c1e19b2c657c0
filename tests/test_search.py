"""Similar-cell search: index build/verify, staleness, filters, bad queries, montage."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from typer.testing import CliRunner

from cli.main import app
from cytostore import CellStore
from cytostore.errors import InputError, ProvenanceError
from cytostore.index import IndexParams, build_index, gpu_available, load_index, prepare, verify_index
from cytostore.search import knn, montage_size, run_search, search
from cytostore.store.writer import append_rows, delete_rows

from conftest import sample_rows, write_manifest

runner = CliRunner()


def _cli(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def _last_json(result) -> dict:
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture
def store(small_store, tmp_path) -> Path:
    """A private copy of the small store with a fresh exact index."""
    path = tmp_path / "store"
    shutil.copytree(small_store, path)
    build_index(path, kind="flat")
    return path


def _vectors(path: Path):
    emb, keys = CellStore.open(path).embeddings(columns=("uid", "slide_id", "cell_id", "label"))
    return prepare(emb), keys


def test_query_cell_is_not_among_its_results_and_scores_are_sorted(store):
    res = _cli("search", "--store", store, "--slide", "chula-1", "--cell", "594_95", "-k", "25", "--json")
    assert res.exit_code == 0, res.output
    out = _last_json(res)
    rows = out["results"]
    assert len(rows) == 25 and [r["rank"] for r in rows] == list(range(1, 26))
    assert ("chula-1", "594_95") not in {(r["slide_id"], r["cell_id"]) for r in rows}
    scores = [r["score"] for r in rows]
    assert scores == sorted(scores, reverse=True)
    assert out["query"]["slide_id"] == "chula-1" and out["query"]["label"] == "normal"
    # The exact answer, by brute force over the stored vectors.
    x, keys = _vectors(store)
    q = x[(np.array(keys.column("slide_id").to_pylist()) == "chula-1") & (np.array(keys.column("cell_id").to_pylist()) == "594_95")][0]
    s = x @ q
    best = np.argsort(-s)[1:26]
    assert [r["uid"] for r in rows] == keys.column("uid").to_numpy()[best].tolist()


def test_vector_of_a_stored_cell_finds_that_cell_first(store, tmp_path):
    x, keys = _vectors(store)
    emb, _ = CellStore.open(store).embeddings()
    np.save(tmp_path / "q.npy", np.asarray(emb[17], dtype=np.float32)[None])
    res = _cli("search", "--store", store, "--vector", tmp_path / "q.npy", "-k", "3", "--json")
    assert res.exit_code == 0, res.output
    top = _last_json(res)["results"][0]
    assert top["uid"] == keys.column("uid")[17].as_py()
    assert top["score"] == pytest.approx(1.0, abs=1e-5)
    # The Python API and the store method agree, and return Arrow.
    t = search(CellStore.open(store), vector=emb[17], k=3)
    assert isinstance(t, pa.Table) and t.column("uid")[0].as_py() == top["uid"]
    assert json.loads(t.schema.metadata[b"cytostore.search"])["query"]["mode"] == "vector"


def test_append_makes_the_index_stale_but_search_finds_the_new_cells(store, tmp_path):
    from cytostore import IngestConfig, ingest, open_source

    assert _cli("index", "verify", "--store", store).exit_code == 0
    extra = write_manifest(sample_rows(["chula-473"]), tmp_path / "extra.csv")
    report = ingest(open_source(extra), store, IngestConfig(batch_size=32))
    assert report.cells_added == 9
    res = _cli("index", "verify", "--store", store, "--json")
    assert res.exit_code == 1
    rep = _last_json(res)
    assert rep["added"] == 9 and rep["deleted"] == 0 and not rep["fresh"] and "index build" in rep["fix"]
    emb, keys = CellStore.open(store).embeddings(where="slide_id = 'chula-473'")
    for i in range(len(emb)):
        t = search(store, vector=emb[i], k=5)
        assert t.column("uid")[0].as_py() == keys.column("uid")[i].as_py()
    t = search(store, "chula-473", keys.column("cell_id")[0].as_py(), k=8)  # a new cell as the query
    assert keys.column("uid")[0].as_py() not in t.column("uid").to_pylist() and t.num_rows == 8
    assert _cli("index", "build", "--store", store).exit_code == 0
    assert _cli("index", "verify", "--store", store).exit_code == 0


def test_deleted_cells_are_never_returned(store):
    s = CellStore.open(store)
    emb, keys = s.embeddings(where="slide_id = 'chula-27'")
    gone = keys.column("cell_id").to_pylist()[:20]
    gone_uids = set(keys.column("uid").to_pylist()[:20])
    n = delete_rows(s, s.resolve(), "slide_id = 'chula-27' AND cell_id IN (" + ", ".join(f"'{c}'" for c in gone) + ")")
    assert n == 20
    rep = verify_index(store)
    assert not rep["fresh"] and rep["deleted"] == 20 and rep["added"] == 0
    assert _cli("index", "verify", "--store", store).exit_code == 1
    left = s.count()
    t = search(store, vector=emb[0], k=left)  # the whole ranking, led by a deleted cell's vector
    assert t.num_rows == left and not gone_uids & set(t.column("uid").to_pylist())
    t = search(store, vector=emb[0], k=10)
    assert t.num_rows == 10 and not gone_uids & set(t.column("uid").to_pylist())


def test_where_returns_k_matching_cells_and_only_them(store):
    x, keys = _vectors(store)
    labels = np.array(keys.column("label").to_pylist())
    where = "label = 'target_cell' AND slide_id != 'chula-1'"
    match = (labels == "target_cell") & (np.array(keys.column("slide_id").to_pylist()) != "chula-1")
    assert match.sum() > 12
    res = _cli("search", "--store", store, "--slide", "chula-1", "--cell", "594_95", "-k", "12", "--where", where, "--json")
    assert res.exit_code == 0, res.output
    rows = _last_json(res)["results"]
    assert len(rows) == 12 and all(r["label"] == "target_cell" and r["slide_id"] != "chula-1" for r in rows)
    q = search(store, vector=x[0], k=int(match.sum()) + 50, where=where)
    assert q.num_rows == match.sum()  # fewer match than asked: all of them, no others
    bad = _cli("search", "--store", store, "--slide", "chula-1", "--cell", "594_95", "--where", "nonsense ==")
    assert bad.exit_code == 2 and "--where" in bad.output


def test_exclude_same_slide_still_returns_k(store):
    res = _cli("search", "--store", store, "--slide", "chula-27", "--cell",
               CellStore.open(store).cells(["cell_id"], where="slide_id = 'chula-27'").column("cell_id")[0].as_py(),
               "-k", "15", "--exclude-same-slide", "--json")
    assert res.exit_code == 0, res.output
    rows = _last_json(res)["results"]
    assert len(rows) == 15 and all(r["slide_id"] != "chula-27" for r in rows)


def test_bad_queries_give_clear_errors_and_exit_code_2(store, tmp_path):
    res = _cli("search", "--store", store, "--slide", "chula-1", "--cell", "no-such-cell")
    assert res.exit_code == 2 and "no cell 'no-such-cell'" in res.output
    np.save(tmp_path / "short.npy", np.ones(7, np.float32))
    res = _cli("search", "--store", store, "--vector", tmp_path / "short.npy")
    assert res.exit_code == 2 and "dimension 1280" in res.output
    np.save(tmp_path / "nan.npy", np.full(1280, np.nan, np.float32))
    res = _cli("search", "--store", store, "--vector", tmp_path / "nan.npy")
    assert res.exit_code == 2 and "NaN" in res.output
    (tmp_path / "junk.png").write_bytes(b"not an image")
    res = _cli("search", "--store", store, "--image", tmp_path / "junk.png")
    assert res.exit_code == 2 and "junk.png" in res.output and "not a readable image" in res.output
    res = _cli("search", "--store", store, "--slide", "chula-1")
    assert res.exit_code == 2 and "--cell" in res.output
    res = _cli("search", "--store", store, "--vector", tmp_path / "short.npy", "--exclude-same-slide")
    assert res.exit_code == 2


def test_image_query_on_a_stored_cell_excludes_that_cell(store):
    from conftest import SAMPLE

    cell = search(store, "chula-1", "594_95", k=3)
    res = run_search(store, image=SAMPLE / "fields" / "1.jpg", x=594, y=95, k=3)
    assert res.query["matched_cell"] == {"slide_id": "chula-1", "cell_id": "594_95"}
    assert ("chula-1", "594_95") not in {(r["slide_id"], r["cell_id"]) for r in res.table.to_pylist()}
    assert res.table.column("uid")[0].as_py() == cell.column("uid")[0].as_py()
    assert res.table.column("score")[0].as_py() == pytest.approx(cell.column("score")[0].as_py(), abs=0.01)


def test_index_from_another_encoder_is_refused(store):
    side = store / "indexes" / "efficientnet_lite0" / "sidecar.json"
    meta = json.loads(side.read_text())
    meta["encoder"]["weights_sha256"] = "0" * 64
    side.write_text(json.dumps(meta))
    with pytest.raises(ProvenanceError, match="index build"):
        search(store, "chula-1", "594_95")
    res = _cli("index", "verify", "--store", store, "--json")
    assert res.exit_code == 1 and _last_json(res)["provenance_changed"]


def test_montage_png_has_the_expected_size(store, tmp_path):
    from PIL import Image

    out = tmp_path / "m.png"
    res = _cli("search", "--store", store, "--slide", "chula-1", "--cell", "594_95", "-k", "7", "--montage", out)
    assert res.exit_code == 0, res.output
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == montage_size(8)


def _synthetic_store(path: Path, n: int = 3000, dim: int = 48, seed: int = 0) -> np.ndarray:
    """A store whose table holds clustered random vectors (no images needed)."""
    from cytostore.store import schema

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((30, dim))
    x = (centres[rng.integers(0, 30, n)] + 0.6 * rng.standard_normal((n, dim))).astype(np.float16)
    prov = {"encoder": {"name": "synthetic", "weights_sha256": "0" * 64}, "embedding_dtype": "float16"}
    target = schema.arrow_schema("cells", dim=dim, metadata=prov)
    cols = {"uid": pa.array(np.arange(n, dtype=np.int64) * 7919 + 11), "slide_id": [f"s{i % 40}" for i in range(n)],
            "cell_id": [str(i) for i in range(n)], "x": np.zeros(n), "y": np.zeros(n), "crop_size": np.full(n, 64, np.int32),
            "label": [f"c{i % 5}" for i in range(n)], "image": ["none"] * n, "source_ref": ["synthetic"] * n,
            "thumbnail": [b""] * n, "run_id": ["t"] * n,
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), dim)}
    rows = pa.table({f.name: (cols[f.name] if f.name in cols else pa.nulls(n, f.type)) for f in target}).cast(target)
    append_rows(CellStore.create(path), "synthetic", rows)
    return x


@pytest.mark.parametrize("kind", ["ivf-pq", "hnsw"])
def test_approximate_kinds_reach_recall_090_against_exact(tmp_path, kind, monkeypatch):
    import cytostore.search as search_mod

    x = _synthetic_store(tmp_path / "syn")
    q = prepare(x[:60])
    exact = load_index(tmp_path / "syn")  # no index yet: every row is searched exactly
    assert exact.index is None
    truth = [set(knn(exact, v, 10)[1].tolist()) for v in q]
    side = build_index(tmp_path / "syn", kind=kind, params=IndexParams(pq_m=16, train_size=3000, tune_queries=100))
    assert side["kind"] == kind and side["rows"] == 3000
    bound = load_index(tmp_path / "syn")
    got = [set(knn(bound, v, 10)[1].tolist()) for v in q]
    recall = np.mean([len(a & b) / 10 for a, b in zip(truth, got)])
    assert recall >= 0.9
    # A filter through the index's IDSelector (not the exact subset path) returns only matching cells.
    monkeypatch.setattr(search_mod, "EXACT_SUBSET", 0)
    t = search(tmp_path / "syn", vector=x[5], k=10, where="label = 'c2'")
    assert t.num_rows == 10 and set(t.column("label").to_pylist()) == {"c2"}


def test_device_cuda_without_gpu_faiss_falls_back_with_a_note(store):
    if gpu_available():
        pytest.skip("faiss sees a GPU here")
    side = build_index(store, kind="flat", device="cuda")
    assert side["device"] == "cpu" and any("GPU" in n for n in side["notes"])
    res = run_search(store, "chula-1", "594_95", k=5, device="cuda")
    assert any("faiss-gpu" in n for n in res.notes)
    assert [r["uid"] for r in res.to_dict()["results"]] == search(store, "chula-1", "594_95", k=5).column("uid").to_pylist()


@pytest.mark.gpu
def test_gpu_build_matches_cpu(store):
    if not gpu_available():
        pytest.skip("this faiss build has no GPU support")
    cpu = search(store, "chula-1", "594_95", k=10).column("uid").to_pylist()
    side = build_index(store, kind="flat", device="cuda")
    assert side["device"] == "cuda"
    assert search(store, "chula-1", "594_95", k=10).column("uid").to_pylist() == cpu
    # Searched on the GPU: an unfiltered query through the GPU copy gives the CPU's answer.
    bound = load_index(store, device="cuda")
    assert bound.gpu is not None and bound.info["device"] == "cuda"
    assert search(store, "chula-1", "594_95", k=10, device="cuda").column("uid").to_pylist() == cpu


def test_unknown_kind_and_k_are_input_errors(store):
    with pytest.raises(InputError, match="kind"):
        build_index(store, kind="lsh")
    with pytest.raises(InputError, match="-k"):
        search(store, "chula-1", "594_95", k=0)
