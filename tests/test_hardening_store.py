"""Hardening of the store and query side: filters, finiteness, query vectors, MIL classes,
damaged files, schema changes, checksums (`store check`) and injected faults."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cli.main import app
from cytostore import CellStore
from cytostore.errors import InputError
from cytostore.store.filters import MAX_FILTER_CHARS, MAX_FILTER_TERMS, check_where

runner = CliRunner()
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture()
def store_copy(small_store, tmp_path) -> Path:
    """A writable copy of the small store (360 real cells, default encoder)."""
    path = tmp_path / "store"
    shutil.copytree(small_store, path)
    return path


# -- filters -------------------------------------------------------------------------
@pytest.mark.parametrize("bad, says", [
    ("1=1; DROP TABLE cells", "';'"),
    ("slide_id = 'chula-1') OR (1=1", "without its '('"),
    ("(slide_id = 'chula-1'", "never closed"),
    ("slide_id = 'chula-1", "never closes"),
    ("slide_id = 'chula-1' -- AND label = 'x'", "comment"),
])
def test_a_malformed_where_is_refused_everywhere_with_exit_2(store_copy, tmp_path, bad, says):
    vec = tmp_path / "q.npy"
    np.save(vec, np.ones(1280, np.float32))
    for args in (["search", "--store", str(store_copy), "--vector", str(vec), "--where", bad, "--json"],
                 ["store", "delete", "--store", str(store_copy), "--where", bad, "--json"]):
        res = runner.invoke(app, args)
        assert res.exit_code == 2, (args[0], res.output)
        assert says in res.output
    with pytest.raises(InputError, match=re.escape(says)):
        CellStore.open(store_copy).cells(columns=["uid"], where=bad)
    assert CellStore.open(store_copy).count() == 360  # nothing deleted


def test_quotes_keep_their_text_and_valid_filters_pass(store_copy):
    ok = "slide_id = 'chula-1' AND (label != 'a;b' OR label = 'it''s (x')"
    assert check_where(ok) == ok
    assert CellStore.open(store_copy).count(where="slide_id IN ('chula-1', 'chula-27')") > 0


def test_too_many_terms_or_characters_are_refused(store_copy):
    many = " OR ".join(f"uid = {i}" for i in range(MAX_FILTER_TERMS + 1))
    with pytest.raises(InputError, match="IN"):
        CellStore.open(store_copy).count(where=many)
    with pytest.raises(InputError, match="characters"):
        check_where("uid IN (" + ",".join(["1"] * MAX_FILTER_CHARS) + ")")
    check_where(" OR ".join(f"uid = {i}" for i in range(MAX_FILTER_TERMS)))  # at the limit: fine


def test_100000_or_terms_do_not_crash_the_process(store_copy, tmp_path):
    # Before the validator Lance's planner segfaulted on this filter (exit -11).
    code = ("import sys, numpy as np; from cytostore.search import run_search\n"
            "from cytostore.errors import InputError\n"
            "w = ' OR '.join(f\"slide_id = '{i}'\" for i in range(100000))\n"
            "try:\n  run_search(sys.argv[1], vector=np.ones(1280, np.float32), where=w)\n"
            "except InputError as e:\n  print('refused:', str(e)[:60]); sys.exit(2)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(store_copy)], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-500:])
    assert "refused" in proc.stdout
