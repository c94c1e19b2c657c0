"""The one write path of a cell table (cytostore.store.writer) and the store upkeep commands."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import threading
import time
from pathlib import Path

import lance
import numpy as np
import pyarrow as pa
import pytest
from typer.testing import CliRunner

from cli.main import app
from cytostore import CellStore, IngestConfig, ingest, open_source
from cytostore.store import pins, schema
from cytostore.store.writer import CellWriter, CommitPolicy, append_failures, delete_rows

runner = CliRunner()
DIM = 8
TABLE = "t"


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def rows(start: int, n: int) -> pa.Table:
    """n cells with uids start..start+n-1, in the real cells layout."""
    target = schema.arrow_schema("cells", dim=DIM, metadata={"encoder": {"name": "test"}})
    ids = np.arange(start, start + n)
    emb = np.tile(ids[:, None], (1, DIM)).astype(np.float16)
    cols = {
        "uid": pa.array(ids, pa.int64()), "slide_id": pa.array([f"s{i % 3}" for i in ids]),
        "cell_id": pa.array([f"c{i}" for i in ids]), "x": pa.array(ids.astype(float)), "y": pa.array(ids.astype(float)),
        "crop_size": pa.array(np.full(n, 64, np.int32)), "image": pa.array(["img.png"] * n),
        "source_ref": pa.array(["test"] * n), "thumbnail": pa.array([b"\xff\xd8"] * n, pa.binary()),
        "run_id": pa.array(["r"] * n),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), DIM),
    }
    return pa.Table.from_pydict({f.name: cols.get(f.name, pa.nulls(n, f.type)) for f in target}, schema=target)


def versions(uri: str) -> list[int]:
    return [v["version"] for v in lance.dataset(uri).versions()]


def test_commits_by_size_with_a_bounded_buffer(tmp_path):
    store = CellStore.create(tmp_path / "s")
    w = CellWriter(store, TABLE, CommitPolicy(commit_rows=100, commit_seconds=1e9), clock=FakeClock())
    for k in range(9):  # 9 x 30 rows: commits at 100 and 200, 70 left for close
        w.append(rows(30 * k, 30))
        assert w.pending_rows <= 100
    assert w.commits == 2 and store.count(TABLE) == 200
    w.close()
    assert w.commits == 3 and store.count(TABLE) == 270
    ds = store.dataset(TABLE)
    assert ds.has_stable_row_ids
    tid = store.table_id(TABLE)
    assert tid is not None and len(tid) == 32 and int(tid, 16) >= 0
    uids = np.sort(store.cells(columns=["uid"]).column("uid").to_numpy())
    assert np.array_equal(uids, np.arange(270))
    assert w.lock is None
    CellWriter(store, TABLE).release()  # released at close: a second writer gets the lock


def test_an_interrupt_right_after_a_commit_never_commits_the_rows_twice(tmp_path, monkeypatch):
    store = CellStore.create(tmp_path / "s")
    w = CellWriter(store, TABLE, CommitPolicy(commit_rows=50, commit_seconds=1e9), clock=FakeClock())
    real_write = lance.write_dataset
    fired = []

    def write_then_interrupt(*args, **kwargs):
        out = real_write(*args, **kwargs)
        if kwargs.get("mode") == "append" and not fired:
            fired.append(True)
            raise KeyboardInterrupt  # Ctrl-C lands after Lance committed, before the writer moved on
        return out

    monkeypatch.setattr(lance, "write_dataset", write_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        w.append(rows(0, 60))  # 60 >= 50: commits inside append
    w.flush()  # what an interrupted ingest does next: commit what is still pending
    w.append(rows(60, 5))  # and the writer still works afterwards
    w.close()
    uids = store.cells(columns=["uid"]).column("uid").to_numpy()
    assert len(uids) == len(np.unique(uids)), "rows committed twice"
    # The committed 50 are kept; rows the interrupt caught before their commit are simply not
    # stored (a re-run embeds them again), never stored twice.
    assert set(range(50)) | set(range(60, 65)) <= set(uids.tolist()) <= set(range(65))


def test_commits_by_time_with_an_injected_clock(tmp_path):
    store = CellStore.create(tmp_path / "s")
    clock = FakeClock()
    w = CellWriter(store, TABLE, CommitPolicy(commit_rows=10**6, commit_seconds=30), clock=clock)
    w.append(rows(0, 5))
    clock.t = 29.9
    w.append(rows(5, 5))
    assert w.commits == 0 and not store.has_table(TABLE)
    clock.t = 30.0
    w.append(rows(10, 5))
    assert w.commits == 1 and store.count(TABLE) == 15 and w.pending_rows == 0
    clock.t = 45.0
    w.append(rows(15, 5))
    w.tick()
    assert w.commits == 1  # 15 s since the last commit
    clock.t = 60.0
    w.tick()
    assert w.commits == 2 and store.count(TABLE) == 20
    w.close()


def test_compaction_and_cleanup_keep_pinned_versions_readable(tmp_path):
    store = CellStore.create(tmp_path / "s")
    policy = CommitPolicy(commit_rows=100, compact_every=4, compact_min_fragments=3, grace=dt.timedelta(0))
    w = CellWriter(store, TABLE, policy, clock=FakeClock())
    for k in range(3):  # three small commits (as time-based ones are), three fragments
        w.append(rows(10 * k, 10))
        w.flush()
    uri = store.table_uri(TABLE)
    pinned = lance.dataset(uri).version
    pins.pin(uri, "index", pinned)
    rowids = {u: r for u, r in zip(*_uid_rowid(uri))}
    for k in range(3, 8):  # the 4th commit compacts and cleans up, so does the 8th
        w.append(rows(10 * k, 10))
        w.flush()
    w.close()
    ds = lance.dataset(uri)
    assert len(ds.get_fragments()) == 1 and ds.count_rows() == 80
    old = lance.dataset(uri, version=pinned)
    assert old.count_rows() == 30
    assert np.array_equal(np.sort(old.to_table(columns=["uid"]).column("uid").to_numpy()), np.arange(30))
    kept = versions(uri)
    assert pinned in kept and len(kept) == 2  # the pinned one and the latest; every other one removed
    # Stable row ids: a cell keeps its _rowid through compaction, new rows get larger ones.
    uids, rids = _uid_rowid(uri)
    now = dict(zip(uids, rids))
    assert all(now[u] == r for u, r in rowids.items())
    assert min(now[u] for u in range(30, 80)) > max(rowids.values())


def test_full_commits_are_not_rewritten(tmp_path):
    store = CellStore.create(tmp_path / "s")
    w = CellWriter(store, TABLE, CommitPolicy(commit_rows=10, compact_every=2, compact_min_fragments=2),
                   clock=FakeClock())
    w.append(rows(0, 45))  # four full fragments and a remainder
    w.close()
    sizes = sorted(f.metadata.physical_rows for f in store.dataset(TABLE).get_fragments())
    assert sizes == [5, 10, 10, 10, 10]


def _uid_rowid(uri: str) -> tuple[list[int], list[int]]:
    t = lance.dataset(uri).to_table(columns=["uid"], with_row_id=True)
    return t.column("uid").to_pylist(), t.column("_rowid").to_pylist()


def test_two_writers_of_the_failures_table_lose_nothing(tmp_path):
    root = tmp_path / "s"
    CellStore.create(root)
    sch = schema.arrow_schema("failures")
    n = 25
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def write(table: str) -> None:
        store = CellStore.open(root)  # each "ingest" has its own store object
        try:
            start.wait()
            for i in range(n):
                append_failures(store, pa.Table.from_pylist([{
                    "table": table, "where": f"{table}/{i}", "stage": "read", "reason": "missing",
                    "run_id": table, "time": dt.datetime.now(dt.timezone.utc)}], schema=sch))
        except BaseException as e:  # collected, then raised in the test thread
            errors.append(e)

    threads = [threading.Thread(target=write, args=(t,)) for t in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    got = CellStore.open(root).failures()
    assert sorted(got.column("where").to_pylist()) == sorted(f"{t}/{i}" for t in "ab" for i in range(n))


def test_abort_after_commit_n_then_rerun_equals_an_uninterrupted_run(small_store, small_manifest, tmp_path,
                                                                     monkeypatch):
    import cytostore.store.writer as writer_mod

    real = writer_mod.CellWriter._commit_pending
    made = {"n": 0}

    def commit_then_fail(self):
        n = real(self)
        if n:
            made["n"] += 1
            if made["n"] == 3:
                raise RuntimeError("injected fault after commit 3")
        return n

    path = tmp_path / "store"
    config = IngestConfig(batch_size=32, commit_rows=40)
    monkeypatch.setattr(writer_mod.CellWriter, "_commit_pending", commit_then_fail)
    with pytest.raises(RuntimeError, match="after commit 3"):
        ingest(open_source(small_manifest), path, config)
    monkeypatch.setattr(writer_mod.CellWriter, "_commit_pending", real)
    assert CellStore.open(path).count() == 120
    report = ingest(open_source(small_manifest), path, config)  # the lock was released by the abort
    assert report.cells_skipped == 120 and report.cells_added == 240
    got, ref = CellStore.open(path), CellStore.open(small_store)
    (ea, ka), (eb, kb) = got.embeddings(), ref.embeddings()
    oa, ob = np.argsort(ka.column("uid").to_numpy()), np.argsort(kb.column("uid").to_numpy())
    assert np.array_equal(ka.column("uid").to_numpy()[oa], kb.column("uid").to_numpy()[ob])
    assert np.array_equal(np.asarray(ea)[oa], np.asarray(eb)[ob])  # bit-identical
    assert got.table_id(got.resolve()) is not None


def _cli(*args: str):
    res = runner.invoke(app, list(args))
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.fixture()
def busy_store(small_store, tmp_path) -> Path:
    """A copy of the small store whose cell table went through several commits (4 fragments)."""
    path = tmp_path / "store"
    shutil.copytree(small_store, path)
    s = CellStore.open(path)
    table = s.resolve()
    moved = s.dataset(table).to_table(filter="slide_id = 'chula-1'")
    assert delete_rows(s, table, "slide_id = 'chula-1'") == moved.num_rows
    w = CellWriter(s, table, CommitPolicy(commit_rows=40))
    w.append(moved)  # three commits of 40, 40 and 37 rows
    w.flush()
    w.release()  # no compaction at close: the fragments stay for optimize
    return path


def test_store_optimize_compacts_cleans_up_and_keeps_pins(busy_store):
    s = CellStore.open(busy_store)
    uri = s.table_uri(s.resolve())
    pinned = lance.dataset(uri).version - 1  # a version with chula-1 partly re-appended
    rows_then = lance.dataset(uri, version=pinned).count_rows()
    pins.pin(uri, "index", pinned)
    out = _cli("store", "optimize", "--store", str(busy_store), "--grace-minutes", "0", "--json")
    t = out["tables"][0]
    assert t["before"]["fragments"] >= 3 and t["after"]["fragments"] == 1
    assert t["after"]["versions"] == 2 < t["before"]["versions"]  # the pinned one and the latest
    assert t["after"]["versions_bytes"] < t["before"]["versions_bytes"]
    assert t["pins"] == {"index": pinned}
    assert lance.dataset(uri, version=pinned).count_rows() == rows_then < s.count()
    listed = _cli("store", "pins", "--store", str(busy_store), "--json")["pins"]
    assert {"kind": "cells", "name": s.resolve(), "version": pinned, "holder": "index"} in listed
    pins.unpin(uri, "index")  # now the pinned version's fragments may go too
    again = _cli("store", "optimize", "--store", str(busy_store), "--grace-minutes", "0", "--json")["tables"][0]
    assert again["after"]["versions"] == 1 and again["after"]["folder_bytes"] < t["after"]["folder_bytes"]
    assert s.count() == 360
    info = s.info()["tables"][0]
    assert 0 < info["live_bytes"] <= info["bytes"]


def test_store_gc_removes_old_orphan_fragments_and_keeps_young_ones(busy_store):
    from lance.fragment import write_fragments

    s = CellStore.open(busy_store)
    uri = s.table_uri(s.resolve())
    data = Path(uri) / "data"
    before = set(os.listdir(data))
    sample = s.dataset().to_table(filter="slide_id = 'chula-27'").slice(0, 5)
    write_fragments(sample, uri, schema=s.dataset().schema)  # a killed Ray run's uncommitted fragment
    old = set(os.listdir(data)) - before
    past = time.time() - 2 * 3600
    for f in old:
        os.utime(data / f, (past, past))
    write_fragments(sample, uri, schema=s.dataset().schema)  # one still being written, maybe
    young = set(os.listdir(data)) - before - old
    out = _cli("store", "gc", "--store", str(busy_store), "--json")
    cells = [t for t in out["tables"] if t["kind"] == "cells"][0]
    assert cells["orphan_files_removed"] == len(old) == 1 and cells["orphan_files_kept"] == 1
    left = set(os.listdir(data))
    assert not (old & left) and young <= left
    assert s.count() == 360 and cells["bytes_freed"] > 0


def test_store_delete_by_slide_names_stale_artefacts(busy_store):
    s = CellStore.open(busy_store)
    n27 = s.count(where="slide_id = 'chula-27'")
    res = runner.invoke(app, ["index", "build", "--store", str(busy_store)])
    assert res.exit_code == 0, res.output
    out = _cli("store", "delete", "--store", str(busy_store), "--slide", "chula-27", "--dry-run", "--json")
    assert out["cells"] == n27 > 0 and s.count() == 360
    assert [a["kind"] for a in out["tables"][0]["stale"]] == ["index"]
    out = _cli("store", "delete", "--store", str(busy_store), "--slide", "chula-27", "--json")
    t = out["tables"][0]
    assert t["cells"] == n27 and s.count() == 360 - n27 and s.count(where="slide_id = 'chula-27'") == 0
    assert t["version"] == s.dataset().version
    assert t["stale"][0]["kind"] == "index" and t["stale"][0]["built_from_version"] < t["version"]
    out = _cli("store", "delete", "--store", str(busy_store), "--where", "slide_id = 'chula-255' AND x < 0", "--json")
    assert out["cells"] == 0 and s.count() == 360 - n27
    res = runner.invoke(app, ["store", "delete", "--store", str(busy_store)])
    assert res.exit_code == 2 and "--slide" in res.stderr


def test_a_failed_append_after_new_columns_leaves_the_schema_unchanged(tmp_path, monkeypatch):
    import errno

    store = CellStore.create(tmp_path / "s")
    with CellWriter(store, TABLE) as w:
        w.append(rows(0, 10))
    before = store.dataset(TABLE).schema
    extra = rows(10, 5)
    extra = extra.append_column("stain", pa.array(["he"] * 5))
    real = lance.write_dataset

    def full_disk(data, uri, *args, mode="create", **kwargs):
        if mode == "append":  # injected after the schema evolution point
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(data, uri, *args, mode=mode, **kwargs)

    monkeypatch.setattr(lance, "write_dataset", full_disk)
    w = CellWriter(store, TABLE)
    with pytest.raises(OSError, match="No space"):
        with w:
            w.append(extra)
            w.flush()
    monkeypatch.setattr(lance, "write_dataset", real)
    assert store.dataset(TABLE).schema == before  # the new column was rolled back with the failed append
    assert store.count(TABLE) == 10
    with CellWriter(store, TABLE) as w2:  # the table stays writable, with and without the new column
        w2.append(rows(20, 3))
        w2.append(extra)
    got = store.cells(columns=["uid", "stain"])
    assert got.num_rows == 18 and got.column("stain").to_pylist().count("he") == 5
    with pytest.raises(Exception, match="non-empty"):
        CellWriter(store, TABLE).prepare(pa.schema([*store.dataset(TABLE).schema, pa.field("", pa.string())]))
