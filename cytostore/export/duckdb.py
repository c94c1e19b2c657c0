"""The store as DuckDB views, so that plain SQL runs over it.

DuckDB cannot read Arrow's float16 (``Unsupported Internal Arrow Type e``), the
default type of the ``embedding`` column, even in a query that does not name it.
``connect`` therefore shows each cell table through a view that leaves the
embedding out (or, with ``embeddings=True``, widens it to float32: ``FLOAT[dim]``)
and always leaves the JPEG thumbnails out. The views read the Lance tables
lazily, batch by batch, with DuckDB's column projection and filters pushed down to
Lance: nothing is copied into memory up front, and each view reads the table
version that was current when ``connect`` was called (call it again to see later
writes).

Views: ``cells`` (the default cell table) and ``cells_<table>`` for every cell table,
``predictions_<name>``, ``prototypes_<name>``, ``umap_<table>`` and ``failures``.
Names holding ``-`` or ``.`` need double quotes in SQL: ``"predictions_rbc-v2"``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa

from cytostore.errors import StoreError
from cytostore.export._common import HEAVY, as_store, need
from cytostore.store import CellStore


def _view_class():
    from lance.dataset import LanceDataset

    class LanceView(LanceDataset):
        """A Lance table as DuckDB sees it: some columns left out, float16 widened to float32.

        DuckDB scans any ``pyarrow.dataset.Dataset`` through its ``schema`` and
        ``scanner(columns, filter)``; a LanceDataset is one, so this subclass only
        narrows the schema and converts the batches.
        """

        def _setup(self, keep: list[str], widen: set[str]) -> "LanceView":
            full = super().schema
            fields = []
            for name in keep:
                f = full.field(name)
                if name in widen:
                    f = pa.field(name, _widened(f.type), f.nullable)
                fields.append(f)
            self._view_schema = pa.schema(fields)
            self._widen = widen
            return self

        @property
        def schema(self) -> pa.Schema:
            return self._view_schema

        def scanner(self, columns=None, filter=None, **kwargs):  # noqa: A002 - the pyarrow name
            import pyarrow.dataset as pds

            cols = list(self._view_schema.names if columns is None else columns)
            # A count(*) asks for no column; Lance needs one to count rows.
            read = cols or [self._view_schema.names[0]]
            inner = super().scanner(columns=read, filter=filter, batch_size=kwargs.get("batch_size"))
            if not (set(cols) & self._widen) and cols:
                return inner
            out_schema = pa.schema([self._view_schema.field(c) for c in cols])

            def batches() -> Iterator[pa.RecordBatch]:
                for b in inner.to_batches():
                    if not cols:
                        yield pa.RecordBatch.from_struct_array(pa.array([{}] * b.num_rows, pa.struct([])))
                        continue
                    yield pa.RecordBatch.from_arrays(
                        [b.column(c).cast(out_schema.field(c).type) if c in self._widen else b.column(c)
                         for c in cols], schema=out_schema)

            return pds.Scanner.from_batches(batches(), schema=out_schema)

    return LanceView


def _widened(t: pa.DataType) -> pa.DataType:
    """``t`` with float16 replaced by float32 (scalars and lists of them)."""
    if pa.types.is_float16(t):
        return pa.float32()
    if pa.types.is_fixed_size_list(t):
        return pa.list_(_widened(t.value_type), t.list_size)
    if pa.types.is_list(t):
        return pa.list_(_widened(t.value_type))
    if pa.types.is_large_list(t):
        return pa.large_list(_widened(t.value_type))
    return t


def _has_float16(t: pa.DataType) -> bool:
    if pa.types.is_float16(t):
        return True
    if pa.types.is_list(t) or pa.types.is_fixed_size_list(t) or pa.types.is_large_list(t):
        return _has_float16(t.value_type)
    return False


def _view(cls, uri: str, version: int, leave_out: set[str]):
    import lance

    ds = lance.dataset(uri, version=version)
    keep = [f.name for f in ds.schema if f.name not in leave_out]
    # Every float16 column DuckDB would be shown (the embedding, a float16 extra column) is widened.
    widen = {n for n in keep if _has_float16(ds.schema.field(n).type)}
    return cls(uri, version=version)._setup(keep, widen)


def connect(store: CellStore | str | Path, embeddings: bool = False, database: str = ":memory:"):
    """A DuckDB connection on which every table of ``store`` is a view.

    Args:
        store: the store (or its path).
        embeddings: also show the ``embedding`` column, as ``FLOAT[dim]`` (float32);
            left out by default, which keeps every scan light.
        database: the DuckDB database the views live in (default in memory).

    Returns:
        A ``duckdb.DuckDBPyConnection``; ``views(con)`` lists what it holds.

    Raises:
        InputError: the duckdb package is missing.
        StoreError: no store at that path.
    """
    import lance

    duckdb = need("duckdb", "the DuckDB view")
    s = as_store(store)
    cls = _view_class()
    con = duckdb.connect(database)
    leave_out = set(HEAVY) - ({"embedding"} if embeddings else set())
    for table in s.tables():
        ds = s.dataset(table)
        con.register(f"cells_{table}", _view(cls, s.table_uri(table), ds.version, leave_out))
    try:
        default = s.resolve(None) if s.tables() else None
    except StoreError:
        default = None  # several tables and none is the default: only cells_<table>
    if default is not None:
        con.execute(f'CREATE OR REPLACE TEMP VIEW cells AS SELECT * FROM "cells_{default}"')
    for kind in ("predictions", "prototypes", "umap"):
        for name in s.names(kind):
            uri = s.uri(kind, name)
            con.register(f"{kind}_{name}", _view(cls, uri, lance.dataset(uri).version, set()))
    if s.has("failures"):
        uri = s.uri("failures")
        con.register("failures", _view(cls, uri, lance.dataset(uri).version, set()))
    return con


def views(con) -> list[dict[str, Any]]:
    """The views of a connection made by ``connect``: name and columns."""
    rows = con.execute("SELECT table_name, column_name FROM information_schema.columns "
                       "ORDER BY table_name, ordinal_position").fetchall()
    out: dict[str, list[str]] = {}
    for name, col in rows:
        out.setdefault(name, []).append(col)
    return [{"name": k, "columns": v} for k, v in out.items()]
