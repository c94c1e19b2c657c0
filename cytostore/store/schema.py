"""Table layouts, read from the versioned definitions in ``schemas/``.

Every Arrow schema cytostore writes is derived here from those JSON files, so
the layout is defined once.

The definitions stay hand-written JSON rather than LanceDB ``LanceModel`` classes:
a cell table's embedding width and dtype are chosen per table at run time (by the
encoder and ``--float32``), extra manifest columns are appended per source, each
layout carries a version and per-column docs that non-Python tools (DuckDB users,
the docs) read as they are, and the files ship as package data with no import.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import pyarrow as pa

from cytostore.errors import StoreError

METADATA_KEY = b"cytostore"

_SCALARS = {
    "int32": pa.int32(),
    "int64": pa.int64(),
    "float32": pa.float32(),
    "float64": pa.float64(),
    "string": pa.string(),
    "binary": pa.binary(),
    "bool": pa.bool_(),
    "timestamp[us, UTC]": pa.timestamp("us", tz="UTC"),
}
EMBEDDING_DTYPES = {"float16": pa.float16(), "float32": pa.float32()}


def _schema_dir() -> Path:
    # Installed wheels carry the definitions as package data; a source checkout
    # (editable install, tests) reads them from the top-level schemas/ folder.
    packaged = resources.files("cytostore") / "schemas"
    if packaged.is_dir():
        return Path(str(packaged))
    return Path(__file__).resolve().parents[2] / "schemas"


@lru_cache(maxsize=None)
def definition(name: str) -> dict[str, Any]:
    """Returns the JSON definition of table layout ``name`` (e.g. ``"cells"``)."""
    path = _schema_dir() / f"{name}.json"
    if not path.is_file():
        raise StoreError(f"no table layout named {name!r} in {path.parent}")
    return json.loads(path.read_text())


def version(name: str) -> int:
    """Returns the layout version of table ``name``."""
    return int(definition(name)["version"])


def arrow_schema(
    name: str,
    *,
    dim: int | None = None,
    embedding_dtype: str = "float16",
    extra: pa.Schema | None = None,
    metadata: dict[str, Any] | None = None,
) -> pa.Schema:
    """Builds the Arrow schema of layout ``name``.

    Args:
        name: layout name, a file in ``schemas/``.
        dim: embedding dimension, for layouts with an ``embedding`` column.
        embedding_dtype: ``float16`` or ``float32``.
        extra: extra columns appended after the defined ones (kept manifest columns).
        metadata: JSON-serialisable provenance stored under the ``cytostore`` key.
    """
    fields = []
    for col in definition(name)["columns"]:
        if col["type"] == "embedding":
            if dim is None or dim <= 0:
                raise StoreError(f"layout {name!r} needs a positive embedding dimension, got {dim}")
            if embedding_dtype not in EMBEDDING_DTYPES:
                raise StoreError(
                    f"embedding dtype must be one of {sorted(EMBEDDING_DTYPES)}, got {embedding_dtype!r}"
                )
            typ = pa.list_(EMBEDDING_DTYPES[embedding_dtype], dim)
        else:
            typ = _SCALARS[col["type"]]
        fields.append(pa.field(col["name"], typ, nullable=col["nullable"]))
    names = {f.name for f in fields}
    for f in extra or []:
        if f.name in names:
            raise StoreError(f"extra column {f.name!r} clashes with a {name} column; rename it")
        fields.append(f.with_nullable(True))
    md = {METADATA_KEY: json.dumps(metadata, sort_keys=True).encode()} if metadata else None
    return pa.schema(fields, metadata=md)


def column_names(name: str) -> list[str]:
    """Names of the defined columns of layout ``name`` (without extras)."""
    return [c["name"] for c in definition(name)["columns"]]


def read_metadata(schema: pa.Schema) -> dict[str, Any]:
    """Returns the provenance stored in an Arrow schema (empty when none)."""
    raw = (schema.metadata or {}).get(METADATA_KEY)
    return json.loads(raw) if raw else {}


def write_metadata(uri: str, metadata: dict[str, Any], name: str = "cells") -> None:
    """Brings the Lance table at ``uri`` up to layout ``name`` and writes ``metadata`` (its record).

    Defined scalar columns the table lacks (those a later layout added) are
    added as nullable, null in the older rows; readers fill what they need
    (e.g. ``key_hash`` from ``slide_id`` and ``cell_id``). Call it under the
    table's writer lock.
    """
    import lance

    ds = lance.dataset(uri)
    missing = [pa.field(c["name"], _SCALARS[c["type"]], nullable=True) for c in definition(name)["columns"]
               if c["type"] != "embedding" and c["name"] not in ds.schema.names]
    if missing:
        ds.add_columns(missing)
        ds = lance.dataset(uri)
    ds.update_schema_metadata({METADATA_KEY.decode(): json.dumps(metadata, sort_keys=True)})
