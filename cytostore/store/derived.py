"""Writes of derived tables (prototypes, predictions, umap): each write is a whole new
version of the table, committed at once under the table's writer lock.

Cell tables are appended through the store writer instead; these tables are small
next to them (no embeddings of every cell, or a few vectors) and are always
rewritten whole, so a killed write leaves the previous version as it was.
"""

from __future__ import annotations

from typing import Callable, Union

import pyarrow as pa

from cytostore.store import layout
from cytostore.store.lock import WriterLock

Data = Union[pa.Table, pa.RecordBatchReader]
LOCK_WAIT_S = 600.0  # a second writer of the same derived table waits this long, then stops


def write_version(root: str, kind: str, name: str, schema: pa.Schema,
                  make: Callable[[int | None], Data]) -> int:
    """Writes table ``kind``/``name`` of store ``root`` as a new version; returns the version.

    Args:
        root: the store root.
        kind: a derived table kind of ``cytostore.store.layout`` (prototypes, predictions, umap).
        name: the set or cell-table name.
        schema: the Arrow schema (with its metadata) of the new version.
        make: called under the lock with the current version (None when the table does not
            exist yet); returns the rows of the new version (a table, or a reader that may
            stream from the current version's files).
    """
    import lance

    uri = layout.uri(root, kind, name)
    lock = None if layout.is_uri(root) else WriterLock(root, f"{kind}.{name}").acquire(wait=True, timeout_s=LOCK_WAIT_S)
    try:
        current = lance.dataset(uri).version if _exists(root, kind, name) else None
        data = make(current)
        mode = "create" if current is None else "overwrite"
        return int(lance.write_dataset(data, uri, schema=schema, mode=mode).version)
    finally:
        if lock is not None:
            lock.release()


def _exists(root: str, kind: str, name: str) -> bool:
    if layout.is_uri(root):
        import lance

        try:
            lance.dataset(layout.uri(root, kind, name))
            return True
        except (ValueError, OSError):
            return False
    return layout.exists(root, kind, name)
