"""The cell store: Lance tables of cells and their embeddings, one table per encoder."""

from __future__ import annotations

import functools
import json
import re
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa

from cytostore.errors import StoreError
from cytostore.keys import KeySet, UidSet, key_hashes
from cytostore.store import layout, schema
from cytostore.store.check import missing_file_error, readable
from cytostore.store.filters import check_where
from cytostore.store.layout import MARKER, is_uri as _is_uri

CELLS_PREFIX = "cells."
FAILURES = "failures"
DEFAULT_TABLE = "efficientnet_lite0"
TABLE_ID_KEY = "cytostore.table_id"  # Lance table config key: a uuid4 hex given at creation


def table_name_for(encoder_name: str) -> str:
    """The cell-table name for an encoder name (safe as a folder name)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", encoder_name).strip("_.") or "encoder"


class CellStore:
    """A folder (or object-store prefix) of Lance tables.

    ``cells.<encoder>.lance`` holds one row per cell for one encoder, keyed by
    ``(slide_id, cell_id)`` and by the derived 64-bit ``uid``; ``failures.lance``
    holds what could not be ingested. Readers never take a lock; every write goes
    through ``cytostore.store.writer``.
    """

    def __init__(self, root: str | Path):
        self.root = str(root).rstrip("/")

    # -- opening ---------------------------------------------------------------
    @classmethod
    def open(cls, root: str | Path) -> "CellStore":
        """Opens an existing store; raises StoreError when there is none at ``root``."""
        store = cls(root)
        if not _is_uri(store.root) and not (Path(store.root) / MARKER).is_file():
            raise StoreError(
                f"{store.root} is not a cytostore store (no {MARKER}); create one with `cytostore ingest SOURCE --store {store.root}`"
            )
        return store

    @classmethod
    def create(cls, root: str | Path) -> "CellStore":
        """Opens the store at ``root``, creating it when absent."""
        store = cls(root)
        if not _is_uri(store.root):
            path = Path(store.root)
            if path.exists() and not path.is_dir():
                raise StoreError(f"{path} exists and is not a folder")
            if path.is_dir() and any(path.iterdir()) and not (path / MARKER).is_file():
                raise StoreError(f"{path} is a non-empty folder that is not a cytostore store; pick another --store")
            path.mkdir(parents=True, exist_ok=True)
            if not (path / MARKER).is_file():
                (path / MARKER).write_text(json.dumps({"format": "cytostore", "version": 1,
                                                       "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}))
        return store

    # -- tables ----------------------------------------------------------------
    def _uri(self, name: str) -> str:
        # name is "cells.<table>" or "failures"
        if name.startswith(CELLS_PREFIX):
            return layout.uri(self.root, "cells", name[len(CELLS_PREFIX):])
        return layout.uri(self.root, name)

    def uri(self, kind: str, name: str | None = None) -> str:
        """Where a table or file of ``kind`` (see ``cytostore.store.layout``) lives in this store."""
        return layout.uri(self.root, kind, name)

    def _table_names(self) -> list[str]:
        if _is_uri(self.root):
            # Object stores have no folders: list the ``*.lance`` prefixes through Arrow's file systems.
            from pyarrow import fs as pafs

            filesystem, base = pafs.FileSystem.from_uri(self.root)
            infos = filesystem.get_file_info(pafs.FileSelector(base, recursive=False, allow_not_found=True))
            return sorted(i.base_name[: -len(".lance")] for i in infos
                          if i.base_name.endswith(".lance") and i.type == pafs.FileType.Directory)
        # A folder without _versions holds only uncommitted fragments (a killed first Ray ingest).
        return sorted(p.name[: -len(".lance")] for p in Path(self.root).glob("*.lance") if (p / "_versions").is_dir())

    def names(self, kind: str) -> list[str]:
        """Names of the committed tables of ``kind`` (cells, prototypes, predictions, umap, index)."""
        if _is_uri(self.root):
            pre, suf = layout.kind(kind).pattern.split("{name}")
            full = [t + ".lance" for t in self._table_names()]
            return sorted(n[len(pre):len(n) - len(suf)] for n in full
                          if n.startswith(pre) and n.endswith(suf) and len(n) > len(pre) + len(suf))
        return layout.names(self.root, kind)

    def tables(self) -> list[str]:
        """Names of the encoder tables (``cells.<name>``), without the prefix."""
        return self.names("cells")

    def resolve(self, encoder: str | None = None) -> str:
        """The table name for ``encoder``: the only table, or the named one."""
        names = self.tables()
        if not names:
            raise StoreError(f"store {self.root} holds no cell tables yet; run `cytostore ingest` first")
        if encoder is None:
            if len(names) == 1:
                return names[0]
            if DEFAULT_TABLE in names:
                return DEFAULT_TABLE
            raise StoreError(f"store {self.root} has several encoder tables {names}; pass --encoder NAME")
        name = table_name_for(encoder)
        if name not in names:
            raise StoreError(f"store {self.root} has no table for encoder {encoder!r}; it has {names}")
        return name

    def table_uri(self, table: str) -> str:
        """Where cell table ``table`` lives (a folder or object-store URI)."""
        return self._uri(CELLS_PREFIX + table)

    def _has(self, kind: str, name: str | None = None) -> bool:
        if _is_uri(self.root):
            return layout.relpath(kind, name)[: -len(".lance")] in self._table_names()
        return layout.exists(self.root, kind, name)

    def has(self, kind: str, name: str | None = None) -> bool:
        """Whether a committed table (or the file) of ``kind`` exists."""
        return self._has(kind, name)

    def has_table(self, table: str) -> bool:
        """Whether the cell table ``table`` exists."""
        return table in self.tables()

    def dataset(self, encoder: str | None = None, version: int | None = None):
        """The Lance dataset of an encoder table (optionally at a given version)."""
        import lance

        return lance.dataset(self._uri(CELLS_PREFIX + self.resolve(encoder)), version=version)

    def table_id(self, table: str) -> str | None:
        """The id given to cell table ``table`` at creation (None for tables made before ids existed)."""
        import lance

        if not self.has_table(table):
            raise StoreError(f"store {self.root} has no cell table {table!r}; it has {self.tables()}")
        return lance.dataset(self.table_uri(table)).config().get(TABLE_ID_KEY)

    def provenance(self, encoder: str | None = None) -> dict[str, Any]:
        """The provenance stored with an encoder table."""
        return schema.read_metadata(self.dataset(encoder).schema)

    # -- reading ---------------------------------------------------------------
    def count(self, encoder: str | None = None, where: str | None = None) -> int:
        """Number of cells in a table (matching ``where`` when given)."""
        where = check_where(where) or None
        with readable(self.root):
            return self.dataset(encoder).count_rows(filter=where)

    def cells(self, columns: Sequence[str] | None = None, where: str | None = None,
              encoder: str | None = None) -> pa.Table:
        """Cells as an Arrow table.

        Args:
            columns: columns to read; default all but ``embedding`` and ``thumbnail``.
                Name ``embedding`` to get the vectors.
            where: SQL filter, e.g. ``"label = 'spherocyte' AND slide_id != '12'"``.
            encoder: which encoder table; default the only (or default) one.
        """
        where = check_where(where) or None
        ds = self.dataset(encoder)
        if columns is None:
            columns = [n for n in ds.schema.names if n not in {"embedding", "thumbnail"}]
        missing = [c for c in columns if c not in ds.schema.names]
        if missing:
            raise StoreError(f"no column(s) {missing} in table {self.resolve(encoder)!r}; it has {ds.schema.names}")
        with readable(self.root):
            try:
                return ds.to_table(columns=list(columns), filter=where)
            except Exception as e:
                if where and missing_file_error(e, self.root) is None:  # a bad filter, not a damaged file
                    raise StoreError(f"cannot apply filter {where!r}: {e}") from e
                raise

    def frame(self, columns: Sequence[str] | None = None, where: str | None = None, encoder: str | None = None):
        """Cells as a polars DataFrame (same arguments as ``cells``).

        A float16 ``embedding`` becomes a float32 ``Array`` column (polars has no float16).
        """
        import polars as pl

        table = self.cells(columns=columns, where=where, encoder=encoder)
        if "embedding" in table.column_names:
            typ = table.schema.field("embedding").type
            if typ.value_type == pa.float16():
                i = table.column_names.index("embedding")
                table = table.set_column(i, "embedding", table.column(i).cast(pa.list_(pa.float32(), typ.list_size)))
        return pl.from_arrow(table)

    def embeddings(self, encoder: str | None = None, where: str | None = None,
                   columns: Sequence[str] = ("uid", "slide_id", "cell_id")) -> tuple[np.ndarray, pa.Table]:
        """Embeddings as an (N, dim) numpy array, with the key columns beside them.

        The array is a view on the Arrow buffer (no copy) in the stored dtype.
        """
        table = self.cells(columns=[*columns, "embedding"], where=where, encoder=encoder)
        return embedding_matrix(table.column("embedding")), table.drop_columns(["embedding"])

    def to_torch(self, encoder: str | None = None, where: str | None = None):
        """Embeddings as a torch tensor sharing memory with the Arrow buffer (read-only)."""
        import torch

        arr, keys = self.embeddings(encoder, where)
        import warnings

        with warnings.catch_warnings():  # the buffer is read-only; torch warns but shares it
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(arr), keys

    def stored_uids(self, table: str) -> UidSet:
        """The uids already in a table (8 bytes per cell)."""
        if not self.has_table(table):
            return UidSet()
        import lance

        ds = lance.dataset(self._uri(CELLS_PREFIX + table))
        with readable(self.root):
            col = ds.to_table(columns=["uid"]).column("uid")
        return UidSet(col.to_numpy())

    def stored_keys(self, table: str) -> KeySet:
        """The (uid, key hash) pairs already in a table; see ``_stored_keys``."""
        with readable(self.root):
            return self._stored_keys(table)

    def _stored_keys(self, table: str) -> KeySet:
        """The (uid, key hash) pairs already in a table (16 bytes per cell), to tell a
        stored cell from a uid collision. Rows without a key hash (layout 1) get it
        computed from their slide_id and cell_id."""
        if not self.has_table(table):
            return KeySet()
        import lance

        uri = self._uri(CELLS_PREFIX + table)
        ds = lance.dataset(uri)
        if "key_hash" in ds.schema.names:
            t = ds.to_table(columns=["uid", "key_hash"], filter="key_hash IS NOT NULL")
            uids, keys = [t.column("uid").to_numpy()], [t.column("key_hash").to_numpy()]
            old = ds.to_table(columns=["uid", "slide_id", "cell_id"], filter="key_hash IS NULL")
        else:
            uids, keys = [], []
            old = ds.to_table(columns=["uid", "slide_id", "cell_id"])
        if old.num_rows:
            uids.append(old.column("uid").to_numpy())
            keys.append(key_hashes(old.column("slide_id").to_pylist(), old.column("cell_id").to_pylist()))
        if not uids:
            return KeySet(resolve=functools.partial(stored_key, uri))
        return KeySet(np.concatenate(uids), np.concatenate(keys), resolve=functools.partial(stored_key, uri))

    def failures(self) -> pa.Table:
        """Every recorded ingest failure (empty when none)."""
        import lance

        if not self._has("failures"):
            return schema.arrow_schema("failures").empty_table()
        return lance.dataset(self._uri(FAILURES)).to_table()

    def info(self) -> dict[str, Any]:
        """A summary: cells, slides, tables with their provenance, failures."""
        with readable(self.root):
            return self._info()

    def _info(self) -> dict[str, Any]:
        tables = []
        slides: set[str] = set()
        cells = 0
        for name in self.tables():
            ds = self.dataset(name)
            keys = ds.to_table(columns=["slide_id"])
            table_slides = set(keys.column("slide_id").to_pylist())
            slides |= table_slides
            cells = max(cells, keys.num_rows)
            labels = None
            if "label" in ds.schema.names:
                lab = ds.to_table(columns=["label"]).column("label")
                vc = lab.value_counts().to_pylist()
                labels = {str(d["values"]): int(d["counts"]) for d in vc if d["values"] is not None}
            tables.append({
                "name": name,
                "cells": keys.num_rows,
                "slides": len(table_slides),
                "version": ds.version,
                "fragments": len(ds.get_fragments()),
                "bytes": folder_bytes(self._uri(CELLS_PREFIX + name)),  # the whole folder: honest disk use
                "live_bytes": live_bytes(ds),  # data files of the current version only
                "labels": labels,
                "extra_columns": [n for n in ds.schema.names if n not in schema.column_names("cells")],
                "provenance": schema.read_metadata(ds.schema),
            })
        failures = self.failures()
        return {"store": self.root, "cells": cells, "slides": len(slides), "tables": tables,
                "failures": failures.num_rows}


def stored_key(uri: str, uid: int) -> tuple[str, str] | None:
    """The (slide_id, cell_id) of the first row with ``uid`` in the cell table at ``uri``."""
    import lance

    t = lance.dataset(uri).to_table(columns=["slide_id", "cell_id"], filter=f"uid = {int(uid)}", limit=1)
    return (t.column("slide_id")[0].as_py(), t.column("cell_id")[0].as_py()) if t.num_rows else None


def conform(rows: pa.Table, target: pa.Schema) -> pa.Table:
    """Reorders and casts ``rows`` to ``target``; absent nullable columns become nulls."""
    cols = []
    for f in target:
        if f.name in rows.column_names:
            cols.append(rows.column(f.name).cast(f.type))
        elif f.nullable:
            cols.append(pa.nulls(rows.num_rows, f.type))
        else:
            raise StoreError(f"column {f.name!r} is required by the table but missing from the rows")
    return pa.Table.from_arrays(cols, schema=target)


def embedding_matrix(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """(N, dim) numpy view of a fixed-size-list embedding column (one copy only when chunked)."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if arr.null_count:
        raise StoreError("the embedding column has nulls")
    dim = arr.type.list_size
    flat = arr.values.slice(arr.offset * dim, len(arr) * dim)
    return flat.to_numpy(zero_copy_only=True).reshape(len(arr), dim)


def folder_bytes(uri: str) -> int | None:
    """Bytes of every file under a local folder (data, _versions, _transactions, ...); None for URIs."""
    if _is_uri(uri) or not Path(uri).exists():
        return None
    return sum(p.stat().st_size for p in Path(uri).rglob("*") if p.is_file())


def live_bytes(ds) -> int:
    """Bytes of the data files the current version of a Lance dataset reads (its live fragments)."""
    total = 0
    for frag in ds.get_fragments():
        md = frag.metadata
        for f in md.files:
            size = f.file_size_bytes
            if size is None and not _is_uri(ds.uri):
                size = (Path(ds.uri) / "data" / f.path).stat().st_size
            total += int(size or 0)
    return total
