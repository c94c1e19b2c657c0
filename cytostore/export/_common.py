"""Pieces the exporters share: opening a store, choosing slides, writing files whole."""

from __future__ import annotations

import os
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Sequence

import pyarrow as pa
import pyarrow.compute as pc

from cytostore.errors import InputError, StoreError
from cytostore.store import CellStore

Progress = Callable[[int, int, str], None]  # (done, total, what) after each slide or batch

# Columns that are not per-cell values a table tool can show (the vector, the JPEG).
HEAVY = ("embedding", "thumbnail")


def as_store(store: CellStore | str | Path) -> CellStore:
    """A CellStore from a store or a path (a missing store raises StoreError)."""
    return store if isinstance(store, CellStore) else CellStore.open(store)


def need(module: str, what: str):
    """Imports an optional package, or says which extra installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise InputError(f"{what} needs the {module!r} package: pip install 'cytostore[export]'") from e


def sql_str(value: str) -> str:
    """``value`` as a single-quoted SQL string literal."""
    return "'" + str(value).replace("'", "''") + "'"


def slide_filter(slide_ids: Sequence[str]) -> str:
    """SQL filter matching the cells of ``slide_ids``."""
    return f"slide_id IN ({', '.join(sql_str(s) for s in slide_ids)})"


def stored_slides(store: CellStore, table: str) -> list[str]:
    """Every slide id of cell table ``table``, sorted."""
    col = store.dataset(table).to_table(columns=["slide_id"]).column("slide_id")
    return sorted(str(s) for s in pc.unique(col).to_pylist())


def choose_slides(store: CellStore, table: str, slides: Sequence[str] | None) -> list[str]:
    """The slides to export: the ones asked for (each must be stored) or all of them.

    Raises:
        InputError: a slide asked for has no cell in the table (the message names it).
    """
    have = stored_slides(store, table)
    if not slides:
        if not have:
            raise StoreError(f"table {table!r} of {store.root} holds no cells")
        return have
    present = set(have)
    missing = [s for s in dict.fromkeys(slides) if s not in present]
    if missing:
        raise InputError(f"slide(s) {missing} have no cell in table {table!r} of {store.root}; list the slides "
                         f"with `cytostore slides --store {store.root}`")
    return list(dict.fromkeys(slides))


def safe_file_stem(slide_id: str) -> str:
    """``slide_id`` when it can name a file (ingest validates ids; this guards old stores)."""
    if not slide_id or "/" in slide_id or "\\" in slide_id or slide_id in {".", ".."} or "\x00" in slide_id:
        raise StoreError(f"slide id {slide_id!r} cannot name a file; re-ingest it under a valid id")
    return slide_id


@contextmanager
def written_whole(path: Path, mode: str = "w") -> Iterator:
    """Writes to a temporary file beside ``path`` and moves it into place only when the block
    ends without an error: a killed export never leaves a half-written file under the name.

    ``mode`` "w"/"wb" yields an open file; "path" yields the temporary path for a library
    that opens the file itself (h5py, anndata). The file gets the usual permissions (umask).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.part")
    try:
        if mode == "path":
            yield tmp
        else:
            with open(tmp, mode, encoding=None if "b" in mode else "utf-8") as fh:
                yield fh
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
