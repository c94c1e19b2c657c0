"""Property-based tests of bad inputs (Hypothesis), CI-sized: every source format read by the
library, then run through the real `cytostore ingest` (tiny encoder), and the CLI options.

Invariants (tests/fuzz_strategies.py): no traceback (exit 0/1/2, never 3), nothing lost
(each input cell stored or recorded as a failure), no silent change, no store damage.
benchmarks/fuzz_inputs.py runs the same strategies with many more examples.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from typer.testing import CliRunner

from cli.main import app

import fuzz_strategies as fz
from conftest import TINY

runner = CliRunner()
# Reading a source is fast: many examples. A real ingest takes ~0.5 s: fewer.
READ = settings(max_examples=30, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
INGEST = settings(READ, max_examples=4)


@pytest.fixture(scope="module")
def template(tmp_path_factory, tiny_weights) -> Path:
    return fz.make_template(tmp_path_factory.mktemp("fuzz-template"), tiny_weights, TINY)


def _ingest(case: fz.Case, store: Path, weights: Path, options: list[str] = ()):
    res = runner.invoke(app, ["ingest", str(case.source), "--store", str(store), "--encoder", TINY, "--weights",
                              str(weights), "--device", "cpu", "--quiet", *case.args, *options])
    return res.exit_code, res.output + (repr(res.exception) if res.exit_code not in {0, 1, 2} else "")


@pytest.mark.parametrize("fmt", sorted(fz.SOURCES))
def test_reading_any_source_loses_and_changes_nothing(fmt):
    @READ
    @given(plan=fz.SOURCES[fmt])
    def run(plan):
        with tempfile.TemporaryDirectory() as d:
            fz.check_source(fz.write_case(plan, Path(d)))

    run()


@pytest.mark.parametrize("fmt", sorted(fz.SOURCES))
def test_ingesting_any_source_keeps_the_invariants(fmt, template, tiny_weights):
    @INGEST
    @given(plan=fz.SOURCES[fmt])
    def run(plan):
        with tempfile.TemporaryDirectory() as d:
            case = fz.write_case(plan, Path(d) / "in")
            store = fz.fresh_store(template, Path(d) / "store")
            before = fz.snapshot(store)
            code, out = _ingest(case, store, tiny_weights)
            fz.check_ingest(case, store, before, code, out)

    run()


def test_ingest_options_in_and_out_of_range(template, tiny_weights):
    @INGEST
    @given(options=fz.ingest_options(), plan=fz.manifests())
    def run(options, plan):
        with tempfile.TemporaryDirectory() as d:
            case = fz.write_case(plan, Path(d) / "in")
            store = fz.fresh_store(template, Path(d) / "store")
            before = fz.snapshot(store)
            code, out = _ingest(case, store, tiny_weights, options)
            fz.check_ingest(case, store, before, code, out)

    run()


def test_filters_and_k_of_search_never_crash(template, tmp_path):
    store = fz.fresh_store(template, tmp_path / "store")
    before = fz.snapshot(store)

    @READ
    @given(where=fz.where_texts)
    def run(where):
        res = runner.invoke(app, ["search", "--store", str(store), "--slide", fz.BASE_SLIDE, "--cell", "20_20",
                                  "-k", "3", "--where", where, "--json"])
        assert res.exit_code in {0, 2}, (where, res.output[-1000:], repr(res.exception))
        assert "internal error" not in res.output

    run()
    assert fz.snapshot(store) == before
    shutil.rmtree(store)
