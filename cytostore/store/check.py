"""Checksums of stored data files, `cytostore store check`, and typed errors for damaged data.

Lance keeps no checksum of its data files, so a flipped bit or a truncated file is
read back silently (or fails deep inside Lance). The store writer records, after each
commit and compaction, the size and sha256 of every data file the table's
new version references and that was not recorded yet, with the fragment's row count
and slide ids, in ``checksums.<table>.jsonl`` (one JSON line per file, append-only;
the writer lock makes it single-writer). ``verify`` reads every live data file back
and compares; a file the log does not name (a table written before checksums
existed, or a run killed between its commit and the log line) is reported as
unverified, never as damage.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Callable, Iterator

from cytostore.errors import StoreError
from cytostore.store import layout

CHUNK = 1 << 20  # bytes read per hash update
_UNREADABLE = re.compile(r"LanceError\(IO\)|failed to fill whole buffer|[Cc]orrupt|footer|unexpected end of file")
_MISSING = re.compile(r"(?:Not found|No such file or directory|not found)[^\n]*?([^\s,'\"]+\.lance/data/[^\s,'\"]+)")


def digest(path: Path) -> str:
    """sha256 of a file in 1 MiB chunks (hashlib's sha256 runs on SHA CPU extensions: ~2x blake2b here)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


class ChecksumLog:
    """The checksum log of one cell table (``layout`` kind ``checksums``), as the writer keeps it."""

    def __init__(self, root: str, table: str):
        self.path = Path(layout.uri(root, "checksums", table))
        self.table_uri = layout.uri(root, "cells", table)
        self.recorded = set(read_log(self.path))

    def record(self, ds) -> int:
        """Appends a line for each data file of ``ds`` (a Lance dataset of this table) not yet recorded;
        returns how many files were hashed."""
        lines = []
        for frag in ds.get_fragments():
            new = [f.path for f in frag.metadata.files if f.path not in self.recorded]
            if not new:
                continue
            slides = _fragment_slides(frag)
            for name in new:
                path = Path(self.table_uri) / "data" / name
                lines.append({"file": name, "bytes": path.stat().st_size, "sha256": digest(path),
                              "fragment": int(frag.fragment_id), "rows": int(frag.metadata.physical_rows),
                              "slides": slides, "version": int(ds.version)})
        if lines:
            with open(self.path, "a") as fh:
                fh.write("".join(json.dumps(line) + "\n" for line in lines))
                fh.flush()
            self.recorded.update(line["file"] for line in lines)
        return len(lines)


def read_log(path: Path) -> dict[str, dict[str, Any]]:
    """The recorded lines of a checksum log by file name (a torn last line is skipped)."""
    out: dict[str, dict[str, Any]] = {}
    if not path.is_file():
        return out
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line cut short by a kill: that file counts as unverified
        if isinstance(rec, dict) and "file" in rec:
            out[rec["file"]] = rec
    return out


def _fragment_slides(frag) -> list[str] | None:
    import pyarrow.compute as pc

    try:
        col = frag.to_table(columns=["slide_id"]).column("slide_id")
    except (OSError, ValueError, KeyError):
        return None
    return sorted(str(s) for s in pc.unique(col).to_pylist() if s is not None)


def verify(store, table: str | None = None) -> dict[str, Any]:
    """Reads every live data file of the cell table(s) back and compares it with its checksum.

    Args:
        store: a CellStore.
        table: one cell table; default every one.

    Returns:
        Per table: files verified, unverified (no checksum recorded) and damaged (missing,
        another size, another digest), with the rows and slides each damaged file holds
        and what to do; ``damaged`` totals them.
    """
    import lance

    if layout.is_uri(store.root):
        raise StoreError(f"store check reads local files; {store.root} is an object-store URI: "
                         "use the object store's own integrity checks")
    names = [table] if table else store.tables()
    if table and table not in store.tables():
        raise StoreError(f"store {store.root} has no cell table {table!r}; it has {store.tables()}")
    out = []
    for name in names:
        uri = store.table_uri(name)
        log = read_log(Path(store.uri("checksums", name)))
        entry: dict[str, Any] = {"table": name, "files": 0, "verified": 0, "unverified": 0, "damaged": []}
        try:
            ds = lance.dataset(uri)
            frags = ds.get_fragments()
        except (OSError, ValueError, RuntimeError) as e:  # the version manifest itself is unreadable
            entry["damaged"].append({"file": "_versions", "problem": f"the table cannot be opened: {e}",
                                     "rows": None, "slides": None})
            out.append(entry)
            continue
        for frag in frags:
            for f in frag.metadata.files:
                entry["files"] += 1
                problem = _check_file(Path(uri) / "data" / f.path, log.get(f.path))
                if problem is None:
                    entry["verified"] += 1
                elif problem == "unverified":
                    entry["unverified"] += 1
                else:
                    rec = log.get(f.path, {})
                    slides = rec.get("slides") if rec else _fragment_slides(frag)
                    entry["damaged"].append({"file": f"data/{f.path}", "problem": problem,
                                             "fragment": int(frag.fragment_id),
                                             "rows": int(frag.metadata.physical_rows), "slides": slides})
        if entry["unverified"]:
            entry["note"] = (f"{entry['unverified']} data file(s) have no recorded checksum (written before "
                             "checksums existed, or by a run stopped between its commit and the record); "
                             "they were not verified")
        if entry["damaged"]:
            entry["fix"] = fix_text(store.root, name, entry["damaged"])
        out.append(entry)
    return {"store": store.root, "tables": out, "damaged": sum(len(t["damaged"]) for t in out),
            "unverified": sum(t["unverified"] for t in out), "verified": sum(t["verified"] for t in out)}


def _check_file(path: Path, rec: dict[str, Any] | None) -> str | None:
    if not path.is_file():
        return "missing"
    if rec is None:
        return "unverified"
    size = path.stat().st_size
    if size != rec.get("bytes"):
        return f"{size} bytes, {rec.get('bytes')} recorded (truncated or replaced)"
    if digest(path) != rec.get("sha256"):
        return "content differs from the recorded sha256 (the file is corrupted)"
    return None


def fix_text(root: str, table: str, damaged: list[dict[str, Any]]) -> str:
    """What to do about damaged files: restore them, or drop their rows and ingest those slides again."""
    slides = sorted({s for d in damaged for s in (d.get("slides") or [])})
    shown = " ".join(f"--slide {s}" for s in slides[:10]) + (" ..." if len(slides) > 10 else "")
    return (f"restore the file(s) under {layout.uri(root, 'cells', table)}/ from a backup; or drop the damaged "
            f"fragments with `cytostore store check --store {root} --table {table} --drop-damaged` and run the "
            f"same ingest again (it re-embeds only the cells that are gone: {len(slides)} slide(s) "
            f"{shown or 'unknown'})")


def drop_damaged(store, table: str, fragment_ids: list[int]) -> int:
    """Removes whole fragments (without reading them) in one commit; returns the rows removed.

    The caller holds the table's writer lock.
    """
    import lance

    uri = store.table_uri(table)
    ds = lance.dataset(uri)
    gone = [f for f in ds.get_fragments() if f.fragment_id in set(fragment_ids)]
    if not gone:
        return 0
    op = lance.LanceOperation.Delete(updated_fragments=[], deleted_fragment_ids=[f.fragment_id for f in gone],
                                     predicate="false")
    lance.LanceDataset.commit(uri, op, read_version=ds.version)
    return sum(int(f.metadata.physical_rows) for f in gone)


def missing_file_error(exc: BaseException, root: str | None = None) -> StoreError | None:
    """A StoreError naming the data file behind a Lance "not found" error, or None for other errors."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        m = _MISSING.search(str(exc))
        if m:
            path = m.group(1)
            if not path.startswith("/") and Path("/" + path).parent.is_dir():
                path = "/" + path  # Lance names local files without the leading slash
            table = re.search(r"cells\.([^/]+)\.lance/data", path)
            name = table.group(1) if table else None
            root = root or (path.split("/cells.")[0] if "/cells." in path else "STORE")
            return StoreError(f"data file {path} of {'cell table ' + repr(name) if name else 'a table'} is missing: "
                              f"the store is damaged. Run `cytostore store check --store {root}` to list every "
                              "damaged file and the slides it holds, then restore the files from a backup or drop "
                              "them (`store check --drop-damaged`) and ingest those slides again")
        if _UNREADABLE.search(str(exc)) and "os error" not in str(exc):
            where = f" --store {root}" if root else ""
            return StoreError(f"a data file of the store could not be read ({str(exc)[:160]}): the store is damaged. "
                              f"Run `cytostore store check{where}` to name the damaged files and the slides they "
                              "hold, then restore them from a backup or drop them (`store check --drop-damaged`) "
                              "and ingest those slides again")
        exc = exc.__cause__ or exc.__context__
    return None


def names_missing_files(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator: a Lance "data file not found" error inside ``fn`` becomes a StoreError saying what to do."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        store = args[0] if args else kwargs.get("store", kwargs.get("store_path"))
        root = store.root if hasattr(store, "table_uri") else store  # a CellStore, or its path
        with readable(str(root) if root is not None else None):
            return fn(*args, **kwargs)
    return wrapper


@contextlib.contextmanager
def readable(root: str | None) -> Iterator[None]:
    """Turns a Lance "data file not found" error raised inside the block into a StoreError saying what to do."""
    try:
        yield
    except (OSError, ValueError, RuntimeError) as e:  # Lance/Arrow raise these for a missing file
        err = missing_file_error(e, root)
        if err is None:
            raise
        raise err from e
