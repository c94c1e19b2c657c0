"""Progress on standard error: lines off a terminal (fake clock), final counts, --quiet."""

from __future__ import annotations

import io
import re

from typer.testing import CliRunner

import cli.common
from cli.common import Progress, progress_callback
from cli.main import app
from conftest import sample_rows, write_manifest

runner = CliRunner()


class FakeClock:
    """Seconds that move only when a test says so."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _progress(**kw) -> tuple[Progress, io.StringIO, FakeClock]:
    out, clock = io.StringIO(), FakeClock()
    return Progress("ingest", "cells", clock=clock, stream=out, **kw), out, clock


def test_off_terminal_one_line_per_period_with_counts_and_rate():
    p, out, clock = _progress(total=100)
    for done in range(1, 41):
        clock.now += 1.0  # one item a second: lines at 10, 20, 30 and 40 s
        p.update(done, added=done - 1)
    lines = out.getvalue().splitlines()
    assert len(lines) == 4
    assert lines[0] == "ingest: 10/100 cells, added 9, 1.0 cells/s"
    assert lines[-1] == "ingest: 40/100 cells, added 39, 1.0 cells/s"


def test_final_line_has_final_counts_not_the_last_refresh():
    p, out, clock = _progress(total=31, every=10)
    clock.now += 10
    p.update(31, added=24)  # refreshed before the last commit
    clock.now += 1
    p.close(added=31)  # the report's final figures
    last = out.getvalue().splitlines()[-1]
    assert last.startswith("ingest: done, 31/31 cells, added 31,")
    p.close(added=99)  # closing twice prints nothing more
    assert out.getvalue().splitlines()[-1] == last


def test_quiet_prints_nothing():
    p, out, clock = _progress(total=5, quiet=True)
    for done in range(1, 6):
        clock.now += 100
        p.update(done)
    p.close()
    assert out.getvalue() == ""
    assert progress_callback("export", "slides", quiet=True) is None


def test_terminal_bar_ends_on_final_counts():
    p, out, clock = _progress(total=31, tty=True)
    p.update(30, added=24)
    p.close(done=31, added=31)
    text = out.getvalue()
    assert "31/31" in text and "added 31" in text.rsplit("\r", 1)[-1]


def test_unknown_total_and_callback_closes_at_total(monkeypatch, capsys):
    p, out, clock = _progress()
    clock.now += 20
    p.update(7)
    assert out.getvalue() == "ingest: 7 cells, 0.3 cells/s\n"
    monkeypatch.setattr(cli.common, "REPORT_EVERY_S", 1e9)
    call = progress_callback("export h5", "slides", quiet=False)
    for done in range(1, 4):
        call(done, 3, f"slide-{done}")
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("export h5: done, 3/3 slides, at slide-3,")


def _ingest(tmp_path, *extra):
    tmp_path.mkdir(exist_ok=True)
    manifest = write_manifest(sample_rows(["chula-1"]), tmp_path / "cells.csv")
    return runner.invoke(app, ["ingest", str(manifest), "--store", str(tmp_path / "store"), "--batch-size", "16",
                               "--commit-rows", "20", *extra])


def test_ingest_progress_off_terminal_and_quiet(tmp_path, monkeypatch):
    monkeypatch.setattr(cli.common, "REPORT_EVERY_S", 0.0)  # a line after every work item
    r = _ingest(tmp_path)
    assert r.exit_code == 0, r.output
    lines = [ln for ln in r.output.splitlines() if ln.startswith("ingest: ")]
    n = int(re.search(r"(\d+) cells added", r.output).group(1))
    assert n > 20 and len(lines) >= 2
    assert lines[-1].startswith(f"ingest: done, {n}/{n} cells, added {n}, skipped 0, failed 0,")
    added = [int(re.search(r"added (\d+)", ln).group(1)) for ln in lines]
    assert added == sorted(added)  # counts only grow

    r = _ingest(tmp_path / "again", "--quiet")
    assert r.exit_code == 0, r.output
    assert not [ln for ln in r.output.splitlines() if ln.startswith("ingest: ")]
    assert "cells added" in r.output
