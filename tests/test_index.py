"""The index as a store-managed artefact: load cache, incremental delta, in-place update, pins, verify."""

from __future__ import annotations

import datetime as dt
import json
import shutil
from pathlib import Path

import lance
import numpy as np
import pyarrow as pa
import pytest
from typer.testing import CliRunner

from cli.main import app
from cytostore import CellStore
from cytostore.errors import StoreError
from cytostore.index import (IndexParams, build_index, clear_cache, load_index, prepare, read_sidecar, stats,
                             update_index, verify_index)
from cytostore.search import knn, run_search, search
from cytostore.store import pins
from cytostore.store.writer import append_rows, delete_rows

runner = CliRunner()
DIM = 32
TABLE = "synthetic"


def _rows(uids: np.ndarray, x: np.ndarray) -> pa.Table:
    from cytostore.store import schema

    n = len(uids)
    prov = {"encoder": {"name": "synthetic", "weights_sha256": "0" * 64}, "embedding_dtype": "float16"}
    target = schema.arrow_schema("cells", dim=x.shape[1], metadata=prov)
    cols = {"uid": pa.array(np.asarray(uids, np.int64)), "slide_id": [f"s{u % 7}" for u in uids],
            "cell_id": [str(u) for u in uids], "x": np.zeros(n), "y": np.zeros(n),
            "crop_size": np.full(n, 64, np.int32), "label": [f"c{u % 3}" for u in uids], "image": ["none"] * n,
            "source_ref": ["synthetic"] * n, "thumbnail": [b""] * n, "run_id": ["t"] * n,
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.astype(np.float16).reshape(-1)), x.shape[1])}
    return pa.table({f.name: (cols[f.name] if f.name in cols else pa.nulls(n, f.type)) for f in target}).cast(target)


def _vecs(n: int, seed: int, dim: int = DIM) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).standard_normal((20, dim))
    return (centres[rng.integers(0, 20, n)] + 0.7 * rng.standard_normal((n, dim))).astype(np.float16)


def _make(path: Path, n: int = 1500, dim: int = DIM, stable: bool = True) -> tuple[CellStore, np.ndarray]:
    """A store with one synthetic table of ``n`` rows (uids 0..n-1): through the writer, or an older-style table."""
    store = CellStore.create(path)
    x = _vecs(n, 0, dim)
    if stable:
        append_rows(store, TABLE, _rows(np.arange(n), x))
    else:  # as an older cytostore wrote it: no stable row ids, no table id
        t = _rows(np.arange(n), x)
        lance.write_dataset(t, store.table_uri(TABLE), schema=t.schema, mode="create")
    return store, x


def _append(store: CellStore, uids: np.ndarray, x: np.ndarray, stable: bool = True) -> None:
    if stable:
        append_rows(store, TABLE, _rows(uids, x))
    else:
        lance.write_dataset(_rows(uids, x), store.table_uri(TABLE), mode="append")


def _delete(store: CellStore, uids, stable: bool = True) -> None:
    where = f"uid IN ({', '.join(str(int(u)) for u in uids)})"
    if stable:
        delete_rows(store, TABLE, where)
    else:
        store.dataset(TABLE).delete(where)


def _knn(path, q: np.ndarray, k: int = 10) -> list[int]:
    return knn(load_index(path), prepare(q[None])[0], k)[1].tolist()


def test_interleaved_searches_and_commits_load_the_index_file_once(tmp_path):
    store, x = _make(tmp_path / "s")
    build_index(store, kind="flat")
    clear_cache()
    before = stats()
    for i in range(6):
        if i:
            new = _vecs(5, 100 + i)
            _append(store, np.arange(10_000 + 10 * i, 10_005 + 10 * i), new)
            t = search(store, vector=new[2], k=3)  # the new row is found (searched exactly)
            assert t.column("uid")[0].as_py() == 10_002 + 10 * i
        else:
            assert search(store, vector=x[7], k=3).column("uid")[0].as_py() == 7
    after = stats()
    assert after["index_loads"] - before["index_loads"] == 1
    assert after["uid_scans"] == before["uid_scans"]  # deltas came from row ids, never a full uid scan
    assert after["delta_scans"] - before["delta_scans"] == 5


def test_delta_finds_appended_deleted_and_changed_rows_without_a_uid_scan(tmp_path):
    store, x = _make(tmp_path / "s")
    build_index(store, kind="flat")
    _append(store, np.arange(5000, 5005), _vecs(5, 1))
    _delete(store, [3, 4, 5])
    _delete(store, [10, 11])  # re-ingested under the same keys with other content
    _append(store, np.array([10, 11]), _vecs(2, 2))
    store.dataset(TABLE).optimize.compact_files()  # row ids survive compaction
    before = stats()
    bound = load_index(store)
    assert stats()["uid_scans"] == before["uid_scans"] and bound.mode == "rowids"
    assert sorted(bound.added.tolist()) == [10, 11, *range(5000, 5005)]
    assert sorted(bound.changed.tolist()) == [10, 11]
    assert sorted(bound.deleted.tolist()) == [3, 4, 5, 10, 11]
    rep = verify_index(store)
    assert (rep["added"], rep["deleted"], rep["changed"], rep["fresh"]) == (5, 3, 2, False)
    assert "index update" in rep["update"]


def test_nothing_deleted_means_no_row_id_scan(tmp_path):
    store, _ = _make(tmp_path / "s")
    build_index(store, kind="flat")
    _append(store, np.arange(7000, 7010), _vecs(10, 3))
    before = stats()
    load_index(store)
    assert stats()["rowid_scans"] == before["rowid_scans"]  # counts matched: no scan for deletions


def test_changed_cell_is_not_returned_with_its_old_vector(tmp_path):
    store, x = _make(tmp_path / "s")
    build_index(store, kind="flat")
    other = -x[42].astype(np.float32)  # the cell's new content: far from its old vector
    _delete(store, [42])
    _append(store, np.array([42]), other[None])
    res = run_search(store, vector=x[42], k=20)
    got = dict(zip(res.table.column("uid").to_pylist(), res.table.column("score").to_pylist()))
    assert 42 not in got  # its old vector (score 1.0) is gone; the new one is far
    t = search(store, vector=other, k=1)
    assert t.column("uid")[0].as_py() == 42 and t.column("score")[0].as_py() == pytest.approx(1.0, abs=1e-3)
    # The same through Lance's in-place update (same row id, newer row version).
    build_index(store, kind="flat")
    ds = store.dataset(TABLE)
    ds.update({"label": "'relabelled'"}, where="uid = 50")
    assert 50 in load_index(store).changed.tolist()


@pytest.mark.parametrize("with_id", [True, False])
def test_recreated_table_at_the_same_version_is_stale(tmp_path, with_id):
    path = tmp_path / "s"
    store, x = _make(path, 600, stable=with_id)
    build_index(store, kind="flat")
    version = store.dataset(TABLE).version
    shutil.rmtree(store.table_uri(TABLE))
    other = _vecs(600, 7)
    if with_id:
        append_rows(store, TABLE, _rows(np.arange(600), other))
    else:
        t = _rows(np.arange(600), other)
        lance.write_dataset(t, store.table_uri(TABLE), schema=t.schema, mode="create")
    assert store.dataset(TABLE).version == version
    rep = verify_index(store)
    assert not rep["fresh"] and rep["recreated"] and "recreated" in " ".join(rep["problems"])
    res = run_search(store, vector=other[9], k=1)  # the old index is not used: exact over the new table
    assert res.table.column("uid")[0].as_py() == 9 and res.index["kind"] == "none"
    assert any("recreated" in n for n in res.notes)


def test_update_then_search_equals_a_fresh_build_flat(tmp_path):
    store, x = _make(tmp_path / "s")
    build_index(store, kind="flat")
    _append(store, np.arange(8000, 8100), _vecs(100, 4))
    _delete(store, list(range(100, 120)))
    _delete(store, [200, 201])
    _append(store, np.array([200, 201]), _vecs(2, 5))
    out = update_index(store)
    assert out["action"] == "updated" and out["added"] == 102 and out["removed"] == 22 and out["changed"] == 2
    assert verify_index(store)["fresh"]
    bound = load_index(store)
    assert len(bound.added) == 0 and len(bound.deleted) == 0 and bound.index.ntotal == 1580
    fresh = tmp_path / "fresh"
    shutil.copytree(store.root, fresh)
    build_index(fresh, kind="flat")
    qs = np.concatenate([x[:20], _vecs(10, 4)])
    for q in qs:
        assert _knn(store.root, q) == _knn(fresh, q)
    assert update_index(store)["action"] == "none"


def test_update_ivfpq_keeps_recall(tmp_path):
    store, x = _make(tmp_path / "s", 3000, dim=48)
    build_index(store, kind="ivf-pq", params=IndexParams(pq_m=16, train_size=3000, tune_queries=100))
    new = _vecs(300, 6, dim=48)
    _append(store, np.arange(20_000, 20_300), new)
    _delete(store, list(range(50)))
    out = update_index(store)
    assert out["action"] == "updated" and out["added"] == 300 and out["removed"] == 50
    bound = load_index(store)
    assert len(bound.added) == 0 and len(bound.deleted) == 0
    allx = prepare(np.concatenate([x[50:], new]))
    alluid = np.concatenate([np.arange(50, 3000), np.arange(20_000, 20_300)])
    qs = prepare(np.concatenate([x[50:90], new[:40]]))
    truth = [set(alluid[np.argsort(-(allx @ q))[:10]].tolist()) for q in qs]
    got = [set(knn(bound, q, 10)[1].tolist()) for q in qs]
    assert np.mean([len(a & b) / 10 for a, b in zip(truth, got)]) >= 0.9


def test_update_past_the_threshold_says_rebuild(tmp_path):
    store, _ = _make(tmp_path / "s", 500)
    build_index(store, kind="flat")
    _append(store, np.arange(9000, 9200), _vecs(200, 8))  # 40% of the rows
    res = runner.invoke(app, ["index", "update", "--store", store.root])
    assert res.exit_code == 1 and "rebuild" in res.output and "index build" in res.output
    assert read_sidecar(store)["rows"] == 500  # nothing written
    assert len(load_index(store).added) == 200  # search still covers the new rows exactly


def test_hnsw_update_adds_rows_and_keeps_filtering_deleted(tmp_path):
    store, x = _make(tmp_path / "s", 800)
    build_index(store, kind="hnsw", params=IndexParams(tune_queries=50))
    new = _vecs(20, 9)
    _append(store, np.arange(9500, 9520), new)
    _delete(store, [1, 2])
    out = update_index(store)
    assert out["action"] == "updated" and out["added"] == 20 and out["removed"] == 0 and out["kept_filtered"] == 2
    bound = load_index(store)
    assert len(bound.added) == 0 and sorted(bound.deleted.tolist()) == [1, 2]
    assert 1 not in search(store, vector=x[1], k=5).column("uid").to_pylist()
    rep = verify_index(store)
    assert rep["fresh"] and "HNSW graph" in rep["note"]


def test_pinned_index_version_survives_cleanup(tmp_path):
    store, x = _make(tmp_path / "s")
    side = build_index(store, kind="flat")
    uri = store.table_uri(TABLE)
    assert pins.pins(uri)["index"] == side["table_version"]
    for i in range(3):
        _append(store, np.arange(30_000 + 10 * i, 30_010 + 10 * i), _vecs(10, 20 + i))
    lance.dataset(uri).optimize.compact_files()
    lance.dataset(uri).cleanup_old_versions(older_than=dt.timedelta(0), error_if_tagged_old_versions=False)
    versions = [v["version"] for v in lance.dataset(uri).versions()]
    assert side["table_version"] in versions and len(versions) < side["table_version"] + 4
    assert lance.dataset(uri, version=side["table_version"]).count_rows() == 1500
    rep = verify_index(store)
    assert not rep["recreated"] and rep["added"] == 30 and rep["deleted"] == 0
    assert update_index(store)["action"] == "updated"
    assert pins.pins(uri)["index"] == store.dataset(TABLE).version  # the pin moved with the update


@pytest.mark.parametrize("damage", ["truncate", "garbage", "delete"])
def test_verify_reports_a_broken_index_file_and_search_raises_store_error(tmp_path, damage):
    store, x = _make(tmp_path / "s", 400)
    build_index(store, kind="flat")
    search(store, vector=x[0], k=2)  # loaded and cached before the damage
    f = Path(store.uri("index", TABLE)) / "index.faiss"
    size = f.stat().st_size
    if damage == "truncate":
        with open(f, "r+b") as fh:
            fh.truncate(size // 2)
    elif damage == "garbage":
        f.write_bytes(np.random.default_rng(0).bytes(size))
    else:
        f.unlink()
    res = runner.invoke(app, ["index", "verify", "--store", store.root, "--json"])
    assert res.exit_code == 1
    rep = json.loads(res.stdout.strip().splitlines()[-1])
    assert rep["broken"] and not rep["fresh"] and "index build" in rep["fix"]
    with pytest.raises(StoreError, match="index build"):
        search(store, vector=x[0], k=2)
    res = runner.invoke(app, ["search", "--store", store.root, "--vector", str(_save(tmp_path, x[0]))])
    assert res.exit_code == 2 and "index build" in res.output


def _save(tmp_path: Path, v: np.ndarray) -> Path:
    np.save(tmp_path / "q.npy", v.astype(np.float32))
    return tmp_path / "q.npy"


def test_table_without_stable_row_ids_falls_back_to_uid_comparison(tmp_path):
    store, x = _make(tmp_path / "s", 600, stable=False)
    side = build_index(store, kind="flat")
    assert side["max_rowid"] is None and any("stable row ids" in n for n in side["notes"])
    _append(store, np.arange(4000, 4010), _vecs(10, 11), stable=False)
    _delete(store, [5, 6], stable=False)
    before = stats()
    bound = load_index(store)
    assert bound.mode == "offsets" and stats()["uid_scans"] == before["uid_scans"] + 1
    assert sorted(bound.added.tolist()) == list(range(4000, 4010)) and sorted(bound.deleted.tolist()) == [5, 6]
    assert search(store, vector=_vecs(10, 11)[3], k=1).column("uid")[0].as_py() == 4003
    assert 5 not in search(store, vector=x[5], k=5).column("uid").to_pylist()
    out = update_index(store)
    assert out["action"] == "updated" and out["added"] == 10 and out["removed"] == 2
    assert verify_index(store)["fresh"]


def test_search_results_as_polars(tmp_path):
    import polars as pl

    store, x = _make(tmp_path / "s", 300)
    df = search(store, vector=x[3], k=4, as_polars=True)
    assert isinstance(df, pl.DataFrame) and df.height == 4 and df["uid"][0] == 3
    res = run_search(store, vector=x[3], k=4)
    assert res.to_polars()["uid"].to_list() == res.table.column("uid").to_pylist()


def test_an_index_written_before_row_ids_still_loads_and_searches(tmp_path):
    store, x = _make(tmp_path / "s", 400)
    build_index(store, kind="flat")
    folder = Path(store.uri("index", TABLE))
    side = json.loads((folder / "sidecar.json").read_text())
    for key in ("build_id", "table_id", "table_fingerprint", "max_rowid", "index_bytes", "index_sha256"):
        side.pop(key)
    side["format_version"], side["files"] = 1, {"index": "index.faiss", "uids": "uids.npy"}
    (folder / "sidecar.json").write_text(json.dumps(side))
    (folder / "rowids.npy").unlink()
    _append(store, np.arange(6000, 6003), _vecs(3, 12))
    res = run_search(store, vector=_vecs(3, 12)[1], k=1)
    assert res.table.column("uid")[0].as_py() == 6001 and res.index["located_by"] == "offsets"
    assert any("predates" in n for n in res.notes)
    assert verify_index(store)["added"] == 3
