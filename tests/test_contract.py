"""The command-line contract (exit codes, --debug, --version) and the store's ownership of its layout."""

from __future__ import annotations

import errno
import re
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from cli.main import app
from cytostore.store import CellStore, layout

REPO = Path(__file__).resolve().parent.parent
runner = CliRunner()


def test_unexpected_error_exits_3_with_traceback_only_behind_debug(small_store, monkeypatch):
    def broken(self):
        raise RuntimeError("injected fault")

    monkeypatch.setattr(CellStore, "info", broken)
    res = runner.invoke(app, ["info", "--store", str(small_store)])
    assert res.exit_code == 3, res.output
    assert "internal error: RuntimeError: injected fault" in res.output
    assert "--debug" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["--debug", "info", "--store", str(small_store)])
    assert res.exit_code == 3
    assert "Traceback" in res.output and "injected fault" in res.output


def test_disk_full_exits_2_and_says_how_to_fix(small_store, monkeypatch):
    def full(self):
        raise OSError(errno.ENOSPC, "No space left on device", str(small_store))

    monkeypatch.setattr(CellStore, "info", full)
    res = runner.invoke(app, ["info", "--store", str(small_store)])
    assert res.exit_code == 2, res.output
    assert "disk is full" in res.output and "kept" in res.output


def test_usage_error_exits_2_not_3(tmp_path):
    res = runner.invoke(app, ["info", "--store", str(tmp_path / "nowhere")])
    assert res.exit_code == 2
    assert "not a cytostore store" in res.output


def test_version():
    from cytostore import __version__

    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output.strip() == f"cytostore {__version__}"


def test_store_package_imports_no_higher_layer():
    import ast

    allowed = ("cytostore.store", "cytostore.errors", "cytostore.keys")
    bad = []
    for path in sorted((REPO / "cytostore" / "store").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            bad += [f"{path.name}: {n}" for n in names
                    if (n == "cytostore" or n.startswith(("cytostore.", "cli"))) and not n.startswith(allowed)]
    assert not bad, f"cytostore/store imports higher layers: {bad}"


def test_every_path_under_a_store_is_declared_and_documented(small_store):
    readme = (REPO / "README.md").read_text()
    for k in layout.KINDS.values():
        shown = k.pattern.replace("{name}", "<name>")
        assert shown in readme, f"README's 'The store' does not list {shown}"
    # Everything the ingest wrote is one of the declared kinds.
    patterns = [re.compile("^" + re.escape(k.pattern).replace(re.escape("{name}"), "[^/]+") + "$")
                for k in layout.KINDS.values()]
    nested = {"indexes", ".locks"}
    top = [p.name if p.name not in nested else f"{p.name}/{c.name}"
           for p in Path(small_store).iterdir() for c in ([p] if p.name not in nested else p.iterdir())]
    for name in top:
        assert any(rx.match(name) for rx in patterns), f"{name} under the store is not declared in layout.KINDS"


def test_layout_refuses_names_that_escape_the_store(tmp_path):
    import pytest

    from cytostore.errors import StoreError

    for bad in ["../x", "a/b", "", ".hidden", "x" * 101]:
        with pytest.raises(StoreError):
            layout.uri(str(tmp_path), "predictions", bad)


def test_cells_as_polars_and_store_opened_by_uri(small_store):
    import numpy as np
    import polars as pl

    s = CellStore.open(small_store)
    df = s.frame(columns=["uid", "slide_id", "label", "embedding"], where="slide_id = 'chula-1'")
    emb, keys = s.embeddings(where="slide_id = 'chula-1'")
    assert isinstance(df, pl.DataFrame) and df.height == len(emb)
    assert df["uid"].to_list() == keys.column("uid").to_pylist()
    assert np.allclose(df["embedding"].to_numpy(), emb.astype(np.float32))
    # The object-store code path (listing through Arrow's file systems), on a file:// URI.
    by_uri = CellStore.open(Path(small_store).resolve().as_uri())
    assert by_uri.tables() == s.tables() and by_uri.count() == s.count()
