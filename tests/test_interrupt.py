"""Ctrl-C during an ingest: the cells already embedded are committed, the failures met so
far are stored, the lock is released, and a re-run completes to the same keys as a run
that was never interrupted. KeyboardInterrupt is raised from the progress callback."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from conftest import SMALL_FIELDS, TINY, sample_rows, write_manifest
from cytostore import IngestConfig, ingest, open_source
from cytostore.ingest import IngestInterrupted
from cytostore.store import CellStore
from cytostore.store.writer import CellWriter


@pytest.fixture()
def manifest(tmp_path):
    rows = sample_rows(SMALL_FIELDS)
    ghost = dict(rows[0], image=str(tmp_path / "missing.jpg"), slide_id="ghost")  # a failure met early
    return write_manifest([ghost] + rows, tmp_path / "cells.csv")


def _config(weights):
    # commit_rows=48: some cells are committed before the interrupt, some are pending at it.
    return IngestConfig(encoder=TINY, weights=str(weights), device="cpu", workers=0, batch_size=16, commit_rows=48)


def _keys(store):
    return set(map(tuple, CellStore.open(store).frame(["slide_id", "cell_id"]).rows()))


def _interrupt_after(n):
    def progress(cells, images, report):
        if cells >= n:
            raise KeyboardInterrupt
    return progress


def test_interrupt_commits_what_was_embedded_and_rerun_resumes(manifest, tmp_path, tiny_weights, monkeypatch):
    appended: list[tuple[str, str]] = []  # what reached the writer (embedded) before the interrupt
    real_append = CellWriter.append

    def spy(self, rows):
        appended.extend(zip(rows.column("slide_id").to_pylist(), rows.column("cell_id").to_pylist()))
        return real_append(self, rows)

    monkeypatch.setattr(CellWriter, "append", spy)
    store = tmp_path / "store"
    with pytest.raises(IngestInterrupted, match="run the same command again") as info:
        ingest(open_source(manifest), store, _config(tiny_weights), progress=_interrupt_after(100))
    monkeypatch.undo()
    kept = _keys(store)
    assert 0 < len(kept) < 360
    assert kept == set(appended)  # exactly the embedded cells: none dropped, none invented
    assert info.value.report.cells_added == len(kept)
    assert len(kept) % 48 != 0  # the pending rows were committed at the interrupt, not only whole commits
    fails = CellStore.open(store).failures()
    assert fails.num_rows >= 1 and "missing.jpg" in fails.column("where").to_pylist()[0]
    # The lock was released: the re-run starts at once and finishes the job.
    report = ingest(open_source(manifest), store, _config(tiny_weights))
    assert report.cells_skipped == len(kept) and report.cells_added == 360 - len(kept)
    full = tmp_path / "full"
    ingest(open_source(manifest), full, _config(tiny_weights))
    assert _keys(store) == _keys(full) and len(_keys(full)) == 360


def test_cli_says_what_was_kept_and_exits_130(manifest, tmp_path, tiny_weights, monkeypatch):
    import cli.ingest
    from cli.main import app

    real = cli.ingest.ingest

    def interrupted(src, store, config, progress=None):
        return real(src, store, config, progress=_interrupt_after(100))

    monkeypatch.setattr(cli.ingest, "ingest", interrupted)
    store = tmp_path / "store"
    res = CliRunner().invoke(app, ["ingest", str(manifest), "--store", str(store), "--encoder", TINY,
                                   "--weights", str(tiny_weights), "--device", "cpu", "--batch-size", "16"])
    assert res.exit_code == 130, res.output
    kept = len(_keys(store))
    assert f"{kept} cells" in res.output and "resume" in res.output
