"""Cell keys: the key hash, the key set, and uid collisions recorded as failures (forced with a 4-bit uid)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import cytostore.keys as keys
from cli.main import app
from cytostore import CellStore, IngestConfig, ingest, open_source
from cytostore.keys import (COLLISION, DUPLICATE, NEW, RUN_COLLISION, STORED, KeySet, UidSet, cell_key_hash,
                            cell_uid, key_hashes)

from conftest import TINY, sample_rows, write_manifest

runner = CliRunner()


def test_key_hash_is_stable_and_independent_of_the_uid(monkeypatch):
    assert cell_key_hash("s", "1_2") == cell_key_hash("s", "1_2") != cell_key_hash("s", "1_3")
    pairs = [(f"s{i}", f"{j}") for i in range(40) for j in range(40)]
    hashes = key_hashes([s for s, _ in pairs], [c for _, c in pairs])
    assert hashes.dtype == np.int64 and len(set(hashes.tolist())) == len(pairs) and (hashes < 0).any()
    uids = np.array([cell_uid(s, c) for s, c in pairs], dtype=np.uint64)
    assert not np.array_equal(hashes.view(np.uint64) & np.uint64(2**63 - 1), uids)
    monkeypatch.setattr(keys, "UID_BITS", 4)
    small = {cell_uid(s, c) for s, c in pairs}
    assert small <= set(range(16)) and len(small) == 16
    assert len(set(key_hashes([s for s, _ in pairs], [c for _, c in pairs]).tolist())) == len(pairs)


def test_key_set_verdicts():
    ks = KeySet(np.array([5, 3, 9]), np.array([50, 30, 90]))
    got = ks.classify(np.array([3, 3, 4, 4, 4, 9, 7]), np.array([30, 31, 40, 40, 41, 90, 70]))
    assert got.tolist() == [STORED, COLLISION, NEW, DUPLICATE, RUN_COLLISION, STORED, NEW]
    # The new cells were claimed: later calls see them.
    assert ks.classify(np.array([4, 4, 7, 8]), np.array([40, 41, 70, 80])).tolist() == [DUPLICATE, RUN_COLLISION,
                                                                                      DUPLICATE, NEW]
    assert ks.contains(np.array([4, 8, 1, 5])).tolist() == [True, True, False, True]
    assert ks.classify(np.array([1]), np.array([10]), claim=False).tolist() == [NEW]
    assert ks.classify(np.array([1]), np.array([10])).tolist() == [NEW]
    # A layout-1 table may hold one uid under two keys (written before collisions were checked).
    two = KeySet(np.array([2, 2]), np.array([20, 21]))
    assert two.classify(np.array([2, 2, 2]), np.array([21, 20, 22])).tolist() == [STORED, STORED, COLLISION]
    assert UidSet(np.array([1, 2])).classify(np.array([1, 3])).tolist() == [STORED, NEW]


def test_key_set_matches_a_dict_over_many_claims():
    rng = np.random.default_rng(0)
    su = rng.integers(0, 500, 300)
    sk = su * 7  # one key per stored uid
    ks = KeySet(su, sk)
    ref_stored = dict(zip(su.tolist(), sk.tolist()))
    ref_run: dict[int, int] = {}
    for _ in range(200):
        n = int(rng.integers(1, 20))
        u = rng.integers(0, 1000, n)
        k = np.where(rng.random(n) < 0.5, u * 7, u * 7 + 1)
        got = ks.classify(u, k).tolist()
        want = []
        for a, b in zip(u.tolist(), k.tolist()):
            if a in ref_stored:
                want.append(STORED if ref_stored[a] == b else COLLISION)
            elif a in ref_run:
                want.append(DUPLICATE if ref_run[a] == b else RUN_COLLISION)
            else:
                ref_run[a] = b
                want.append(NEW)
        assert got == want
    assert len(ks) == len(su) + len(ref_run)
    assert len(ks._run) <= 2 * int(np.log2(len(ref_run)) + 1)  # levels stay logarithmic


# -- collisions end to end, with a 4-bit uid ----------------------------------------
@pytest.fixture
def tiny_uids(monkeypatch):
    """uids of 4 bits (16 values): a manifest of a few dozen cells collides many times."""
    monkeypatch.setattr(keys, "UID_BITS", 4)


def _config(weights: Path) -> IngestConfig:
    # workers=0: the cells are planned in this process, where the 4-bit uid applies.
    return IngestConfig(encoder=TINY, weights=str(weights), device="cpu", batch_size=16, workers=0)


def _first_holders(rows: list[dict]) -> tuple[dict[int, str], list[str]]:
    holders: dict[int, str] = {}
    losers = []
    for r in rows:
        cid = f"{r['x']}_{r['y']}"
        uid = cell_uid(r["slide_id"], cid)
        if uid in holders:
            losers.append(cid)
        else:
            holders[uid] = cid
    return holders, losers


def test_uid_collisions_are_failures_not_skips(tiny_uids, tiny_weights, tmp_path):
    rows = sample_rows(["chula-27"])[:40]
    holders, losers = _first_holders(rows)
    assert len(holders) <= 16 and len(losers) >= 24
    store = tmp_path / "store"
    report = ingest(open_source(write_manifest(rows, tmp_path / "a.csv")), store, _config(tiny_weights))
    # Two cells of one run with one uid: the first is written, the second is a failure.
    assert (report.cells_added, report.cells_skipped, report.cells_failed) == (len(holders), 0, len(losers))
    s = CellStore.open(store)
    cells = s.cells(columns=["uid", "cell_id"])
    assert sorted(cells.column("cell_id").to_pylist()) == sorted(holders.values())
    assert len(set(cells.column("uid").to_pylist())) == cells.num_rows
    fails = s.failures().to_pylist()
    assert sorted(f["cell_id"] for f in fails) == sorted(losers)
    for f in fails:
        uid = cell_uid("chula-27", f["cell_id"])
        assert f["stage"] == "key" and f["slide_id"] == "chula-27"
        assert f"key (slide_id='chula-27', cell_id={f['cell_id']!r}) has uid {uid}" in f["reason"]
        assert f"already held by key (slide_id='chula-27', cell_id={holders[uid]!r})" in f["reason"]
        assert "rename one of the cell ids" in f["reason"]
    # The table's uids are unique, so it can be indexed and searched.
    assert runner.invoke(app, ["index", "build", "--store", str(store), "--kind", "flat"]).exit_code == 0
    some = holders[min(holders)]
    res = runner.invoke(app, ["search", "--store", str(store), "--slide", "chula-27", "--cell", some, "-k", "3",
                              "--json"])
    assert res.exit_code == 0, res.output

    # A re-run: stored cells are skipped, colliding ones fail again (recorded once), nothing is added.
    again = ingest(open_source(write_manifest(rows, tmp_path / "a.csv")), store, _config(tiny_weights))
    assert (again.cells_added, again.cells_skipped, again.cells_failed) == (0, len(holders), len(losers))
    assert CellStore.open(store).failures().num_rows == len(losers)


def test_collision_with_a_stored_cell_names_both_keys(tiny_uids, tiny_weights, tmp_path):
    rows = sample_rows(["chula-27"])
    first, _ = _first_holders(rows[:40])
    store = tmp_path / "store"
    ingest(open_source(write_manifest(rows[:40], tmp_path / "a.csv")), store, _config(tiny_weights))
    later = [r for r in rows[40:] if cell_uid("chula-27", f"{r['x']}_{r['y']}") in first][:5]
    assert len(later) == 5
    report = ingest(open_source(write_manifest(later, tmp_path / "b.csv")), store, _config(tiny_weights))
    assert (report.cells_added, report.cells_skipped, report.cells_failed) == (0, 0, 5)
    s = CellStore.open(store)
    assert s.count() == len(first)
    reasons = {f["cell_id"]: f["reason"] for f in s.failures().to_pylist() if f["where"].startswith(str(tmp_path / "b"))}
    for r in later:
        cid = f"{r['x']}_{r['y']}"
        holder = first[cell_uid("chula-27", cid)]
        assert f"already held by key (slide_id='chula-27', cell_id={holder!r})" in reasons[cid]


def test_old_tables_get_key_hashes_from_their_keys(tmp_path):
    from conftest import REPO

    path = tmp_path / "store"
    shutil.copytree(REPO / "tests" / "data" / "store-v1", path)
    s = CellStore.open(path)
    ks = s.stored_keys("efficientnet_lite0")
    t = s.cells(columns=["uid", "slide_id", "cell_id"])
    kh = key_hashes(t.column("slide_id").to_pylist(), t.column("cell_id").to_pylist())
    assert (ks.classify(t.column("uid").to_numpy(), kh, claim=False) == STORED).all()
    assert (ks.classify(t.column("uid").to_numpy(), kh + 1, claim=False) == COLLISION).all()
    assert ks.stored_key(t.column("uid")[0].as_py()) == ("chula-1", t.column("cell_id")[0].as_py())
    assert json.loads(json.dumps(s.provenance()))["schema_version"] == 1
