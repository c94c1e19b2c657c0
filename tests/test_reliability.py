"""Resume and the single-writer lock, on real cells and the real encoder.

Crash safety is tested by injected faults, not timed kills: abort after commit N
(tests/test_writer.py in-process, tests/test_hardening_store.py as an abrupt process
exit), disk full and read-only (tests/test_hardening_store.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cli.main import app
from cytostore import CellStore, IngestConfig, StoreLockedError, ingest, open_source
from cytostore.store.lock import WriterLock

runner = CliRunner()
REPO = Path(__file__).resolve().parent.parent


def _by_uid(path: Path) -> tuple[np.ndarray, np.ndarray]:
    emb, keys = CellStore.open(path).embeddings()
    order = np.argsort(keys.column("uid").to_numpy())
    return keys.column("uid").to_numpy()[order], np.asarray(emb)[order]


def test_second_writer_is_refused_while_readers_go_on(small_store, small_manifest, tmp_path):
    import shutil

    path = tmp_path / "store"
    shutil.copytree(small_store, path)
    lock = WriterLock(path, "cells.efficientnet_lite0").acquire()
    try:
        with pytest.raises(StoreLockedError, match="being written by another process"):
            ingest(open_source(small_manifest), path, IngestConfig(batch_size=32))
        res = runner.invoke(app, ["ingest", str(small_manifest), "--store", str(path)])
        assert res.exit_code == 2 and "--wait" in res.stderr
        # Readers never take the lock.
        assert CellStore.open(path).count() == 360
        assert runner.invoke(app, ["info", "--store", str(path)]).exit_code == 0
    finally:
        lock.release()
    report = ingest(open_source(small_manifest), path, IngestConfig(batch_size=32))
    assert report.cells_skipped == 360


def test_lock_is_released_when_its_holder_is_killed(tmp_path):
    code = ("import sys,time; sys.path.insert(0, %r); from cytostore.store.lock import WriterLock; "
            "held = WriterLock(%r, 't').acquire(); print('held', flush=True); time.sleep(60)") % (str(REPO), str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    with pytest.raises(StoreLockedError):
        WriterLock(tmp_path, "t").acquire()
    proc.kill()
    proc.wait()
    WriterLock(tmp_path, "t").acquire(wait=True, timeout_s=10).release()


def test_worker_processes_give_the_same_cells_and_embeddings(small_store, tmp_path):
    from conftest import sample_rows, write_manifest

    rows = sample_rows(["chula-1"])
    manifest = write_manifest(rows, tmp_path / "m.csv")
    report = ingest(open_source(manifest), tmp_path / "s", IngestConfig(batch_size=32, workers=2))
    assert report.cells_added == len(rows) == 117 and report.cells_failed == 0
    got_uid, got = _by_uid(tmp_path / "s")
    ref = CellStore.open(small_store)
    emb, keys = ref.embeddings(where="slide_id = 'chula-1'")
    order = np.argsort(keys.column("uid").to_numpy())
    assert np.array_equal(got_uid, keys.column("uid").to_numpy()[order])
    assert np.array_equal(got, np.asarray(emb)[order])


def test_cli_wait_reaches_the_writer_lock(small_store, small_manifest, tmp_path, monkeypatch):
    import shutil

    path = tmp_path / "store"
    shutil.copytree(small_store, path)
    seen = []
    real = WriterLock.acquire

    def recording(self, wait=False, *args, **kwargs):
        if self.path.stem.startswith("cells."):
            seen.append(wait)
        return real(self, wait, *args, **kwargs)

    monkeypatch.setattr(WriterLock, "acquire", recording)
    res = runner.invoke(app, ["ingest", str(small_manifest), "--store", str(path), "--wait", "--json"])
    assert res.exit_code == 0, res.output
    assert seen == [True]
