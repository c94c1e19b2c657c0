"""The one write path of a cell table: buffered commits by size or time, compaction, cleanup.

Both ingest engines write through ``CellWriter``: the local engine hands it rows, the
Ray engine hands it Lance fragments its workers wrote. Either way a commit is one
atomic Lance commit, made when ``commit_rows`` rows are pending or ``commit_seconds``
have passed since the last one, so a run of 10^8 cells makes ~1,500 commits, not
~1.5M. Every ``compact_every`` commits, and at close, small fragments are merged and
old versions removed, except pinned ones (``cytostore.store.pins``).

The failures table is shared by every cell table of a store; ``append_failures`` and
``delete_failures`` take its own short-lived lock around each write.
"""

from __future__ import annotations

import datetime as dt
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import pyarrow as pa

from cytostore.errors import StoreError
from cytostore.store import layout, schema
from cytostore.store.cells import CELLS_PREFIX, TABLE_ID_KEY, CellStore, conform
from cytostore.store.check import ChecksumLog
from cytostore.store.filters import check_where
from cytostore.store.lock import WriterLock

# Cleanup spares unpinned versions younger than this. Readers never lock: a search,
# a map or a few-shot fit opens the latest version and reads it within one call, and
# the longest read cytostore makes of an unpinned version (a full scan of a 10^8-cell
# table for an index build, ~250 GB) takes well under an hour on a local disk. An hour
# of versions costs little: at one commit per 30 s it is 120 small manifests, plus the
# fragments the last compactions replaced. Artefacts that keep a version longer pin it.
GRACE = dt.timedelta(hours=1)
MAX_ROWS_PER_FILE = 1 << 20  # Lance's default; a commit (<= commit_rows rows) writes one file
FAILURES_LOCK = "failures"  # .locks/failures.lock, held only around each failures write


@dataclass(frozen=True)
class CommitPolicy:
    """When the writer commits, compacts and cleans up."""

    commit_rows: int = 65_536  # commit once this many rows are pending (the buffer never holds more)
    commit_seconds: float = 30.0  # ... or when this long has passed since the last commit
    compact_every: int = 16  # commits between compaction and cleanup passes (and one at close)
    compact_min_fragments: int = 8  # small fragments (< commit_rows / 2 rows) that make a compaction worth it
    grace: dt.timedelta = GRACE  # cleanup spares unpinned versions younger than this

    def __post_init__(self) -> None:
        if self.commit_rows < 1:
            raise StoreError(f"commit_rows must be at least 1, got {self.commit_rows}")
        if self.commit_seconds < 0:
            raise StoreError(f"commit_seconds must be 0 or more, got {self.commit_seconds}")


class CellWriter:
    """The writer of one cell table, holding that table's writer lock until ``close``.

    Args:
        store: the store.
        table: cell-table name (without the ``cells.`` prefix).
        policy: when to commit, compact and clean up.
        wait: wait for another writer of the table instead of raising StoreLockedError.
        clock: seconds, monotonic (tests pass a fake one).
    """

    def __init__(self, store: CellStore, table: str, policy: CommitPolicy = CommitPolicy(), *,
                 wait: bool = False, clock: Callable[[], float] = time.monotonic):
        self.store, self.table, self.policy, self.clock = store, layout.check_name(table, "table"), policy, clock
        self.uri = store.table_uri(table)
        self.lock = None if layout.is_uri(store.root) else WriterLock(store.root, CELLS_PREFIX + table).acquire(wait=wait)
        self.schema: pa.Schema | None = None  # what rows are written as: the table's schema once it exists
        self.commits = 0  # commits made by this writer
        self.rows_committed = 0
        self._rows: list[pa.Table] = []
        self._fragments: list[Any] = []
        self._pending = 0
        self._last_commit = clock()
        self._hooks: list[Callable[[int], None]] = []
        self._evolved_from: int | None = None  # version before columns were added, until rows follow them
        # Checksums of the data files each commit adds (`cytostore store check`); local stores only.
        self.checksums = None if layout.is_uri(store.root) else ChecksumLog(store.root, self.table)
        if self.exists():
            self.schema = self._dataset().schema
            self._adopt_unnamed()

    # -- state -------------------------------------------------------------------
    def exists(self) -> bool:
        """Whether the table has been committed at least once."""
        return self.store.has_table(self.table)

    @property
    def pending_rows(self) -> int:
        """Rows (or fragment rows) buffered and not yet committed."""
        return self._pending

    def on_commit(self, hook: Callable[[int], None]) -> None:
        """Calls ``hook(rows)`` after each commit (and at each flush, with 0 when nothing was pending)."""
        self._hooks.append(hook)

    def _dataset(self):
        import lance

        return lance.dataset(self.uri)

    def _adopt_unnamed(self) -> None:
        # A table this writer created but whose id was not yet written (killed between the two
        # commits) is still empty: give it its id now. Tables written before ids existed keep None.
        ds = self._dataset()
        if TABLE_ID_KEY not in ds.config() and ds.count_rows() == 0:
            ds.update_config({TABLE_ID_KEY: uuid.uuid4().hex})

    # -- schema ------------------------------------------------------------------
    def prepare(self, target: pa.Schema) -> pa.Schema:
        """Declares the rows' schema; returns the schema to write them in.

        An existing table gains the columns of ``target`` it lacks (nullable, null in
        older rows); a new table is created with ``target`` at the first commit.
        """
        if not self.exists():
            self.schema = target
            return target
        ds = self._dataset()
        new_cols = [f for f in target if f.name not in ds.schema.names]
        if new_cols:
            bad = [f.name for f in new_cols if not isinstance(f.name, str) or not f.name.strip()]
            if bad or len({f.name for f in new_cols}) != len(new_cols):
                raise StoreError(f"cannot add columns {[f.name for f in new_cols]} to table {self.table!r}: "
                                 "column names must be non-empty and distinct; rename them in the input")
            self._commit_pending()
            ds = self._dataset()  # the version that commit made (a stale handle would conflict)
            # Lance cannot add columns and rows in one commit: the new (nullable, all-null) columns
            # are committed first, and that version is rolled back if the rows' append then fails
            # (``_commit_pending``, ``abort``), so a failed append never leaves the schema changed.
            self._evolved_from = int(ds.version)
            ds.add_columns([f.with_nullable(True) for f in new_cols])
            ds = self._dataset()
        self.schema = ds.schema
        return self.schema

    def _roll_back_schema(self) -> None:
        """Restores the version before the last column addition when no row has been appended since."""
        import lance

        if self._evolved_from is None:
            return
        version, self._evolved_from = self._evolved_from, None
        lance.dataset(self.uri, version=version).restore()
        self.schema = self._dataset().schema

    # -- writing -----------------------------------------------------------------
    def append(self, rows: pa.Table) -> None:
        """Buffers rows; commits whenever ``commit_rows`` are pending or ``commit_seconds`` passed."""
        if self.schema is None or any(n not in self.schema.names for n in rows.column_names):
            self.prepare(rows.schema if self.schema is None else _union(self.schema, rows.schema))
        if self._fragments:
            self._commit_pending()
        rows = conform(rows, self.schema)
        while rows.num_rows:
            room = self.policy.commit_rows - self._pending
            self._rows.append(rows.slice(0, room))
            self._pending += min(room, rows.num_rows)
            rows = rows.slice(room)
            if self._pending >= self.policy.commit_rows:
                self.flush()
        self._maybe_commit_on_time()

    def add_fragments(self, fragments: Iterable[Any], rows: int) -> None:
        """Buffers Lance fragments written elsewhere (Ray workers) holding ``rows`` rows, in ``self.schema``."""
        if self.schema is None:
            raise StoreError(f"call prepare(schema) before adding fragments to table {self.table!r}")
        if self._rows:
            self._commit_pending()
        self._fragments.extend(fragments)
        self._pending += int(rows)
        if self._pending >= self.policy.commit_rows:
            self.flush()
        self._maybe_commit_on_time()

    def tick(self) -> None:
        """Commits when the time policy says so (for callers between appends)."""
        self._maybe_commit_on_time()

    def flush(self) -> int:
        """Commits every pending row now; returns how many rows that was."""
        n = self._commit_pending()
        for hook in self._hooks:
            hook(n)
        return n

    def close(self) -> None:
        """Commits the rest, compacts, cleans up old versions and releases the lock."""
        try:
            self.flush()
            if self.exists():
                self.maintain(force=True)
        finally:
            self.release()

    def abort(self) -> None:
        """Drops the uncommitted rows, undoes a column addition no row followed, and releases the lock."""
        self._rows.clear()
        self._fragments.clear()
        self._pending = 0
        try:
            if self.lock is not None or layout.is_uri(self.store.root):
                self._roll_back_schema()
        finally:
            self.release()

    def release(self) -> None:
        """Releases the writer lock (nothing more can be written)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def __enter__(self) -> "CellWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def delete(self, where: str) -> int:
        """Deletes the rows matching ``where`` in one commit; returns how many."""
        check_where(where)
        if not where:
            raise StoreError(f"an empty filter would delete every row of table {self.table!r}; give a condition")
        self._commit_pending()
        if not self.exists():
            return 0
        ds = self._dataset()
        try:
            n = ds.count_rows(filter=where)
        except Exception as e:  # Lance raises plain ValueError/OSError on a bad filter
            raise StoreError(f"cannot apply filter {where!r} to table {self.table!r}: {e}") from e
        if n:
            ds.delete(where)
        return n

    # -- commits -----------------------------------------------------------------
    def _maybe_commit_on_time(self) -> None:
        if self._pending and self.clock() - self._last_commit >= self.policy.commit_seconds:
            self.flush()

    def _commit_pending(self) -> int:
        import lance

        # The buffers are emptied before the commit, not after: an interrupt (Ctrl-C) landing
        # between Lance's commit and the clean-up would otherwise make the next flush commit
        # the same rows again. Rows lost by an interrupt before the commit are simply not
        # stored, and a re-run embeds them.
        n, rows, fragments = self._pending, self._rows, self._fragments
        self._rows, self._fragments, self._pending = [], [], 0
        try:
            if rows:
                self._create_if_absent()
                data = pa.concat_tables(rows) if len(rows) > 1 else rows[0]
                lance.write_dataset(data, self.uri, mode="append", max_rows_per_file=MAX_ROWS_PER_FILE)
            elif fragments:
                self._create_if_absent()
                lance.LanceDataset.commit(self.uri, lance.LanceOperation.Append(list(fragments)),
                                          read_version=self._dataset().version)
        except BaseException:
            self._roll_back_schema()
            raise
        if n:
            self._evolved_from = None
            self.record_checksums()
        self._last_commit = self.clock()
        if n:
            self.commits += 1
            self.rows_committed += n
            if self.commits % self.policy.compact_every == 0:
                self.maintain()
        return n

    def _create_if_absent(self) -> None:
        import lance

        if self.exists():
            return
        # Created empty, then named, then appended to: a table is never without its id
        # once it holds a row. Stable row ids: ``_rowid`` grows with appends and survives
        # compaction, which the index's incremental delta relies on.
        ds = lance.write_dataset(self.schema.empty_table(), self.uri, schema=self.schema, mode="create",
                                 enable_stable_row_ids=True)
        ds.update_config({TABLE_ID_KEY: uuid.uuid4().hex})

    def record_checksums(self) -> int:
        """Records the checksums of the data files not yet recorded (after a commit or compaction)."""
        return self.checksums.record(self._dataset()) if self.checksums is not None else 0

    # -- upkeep ------------------------------------------------------------------
    def maintain(self, force: bool = False) -> dict[str, Any]:
        """Compacts when enough small fragments piled up, then removes old unpinned versions.

        A full commit's fragment (``commit_rows`` rows, ~240 MB at 1280-d) is left as it is:
        rewriting it buys nothing and would keep a second copy on disk for the grace period.
        Small fragments (time-based commits, the rest of a run) are merged into full ones.
        """
        min_fragments = 2 if force else self.policy.compact_min_fragments
        out = {"compacted": compact(self.uri, self.policy.commit_rows, min_fragments)}
        if out["compacted"]:
            self.record_checksums()
        out["cleanup"] = cleanup(self.uri, self.policy.grace)
        return out


def append_rows(store: CellStore, table: str, rows: pa.Table) -> None:
    """Appends ``rows`` to cell table ``table`` in one commit (a writer opened and closed around them)."""
    with CellWriter(store, table, CommitPolicy(commit_rows=max(rows.num_rows, 1))) as w:
        w.append(rows)


def delete_rows(store: CellStore, table: str, where: str) -> int:
    """Deletes the rows of cell table ``table`` matching ``where`` under its writer lock; returns how many."""
    w = CellWriter(store, table)
    try:
        return w.delete(where)
    finally:
        w.release()


def compact(uri: str, target_rows: int = CommitPolicy.commit_rows, min_fragments: int | None = 2) -> bool:
    """Merges fragments of fewer than ``target_rows / 2`` rows of the Lance table at ``uri`` into
    fragments of ``target_rows`` rows, when there are at least ``min_fragments`` of them
    (``None``: let Lance decide, which also rewrites fragments with many deleted rows)."""
    import lance

    ds = lance.dataset(uri)
    if min_fragments is not None:
        small = [f for f in ds.get_fragments() if f.metadata.physical_rows < target_rows // 2]
        if len(small) < max(min_fragments, 2):
            return False
    metrics = ds.optimize.compact_files(target_rows_per_fragment=target_rows)
    return bool(metrics.fragments_removed)


def cleanup(uri: str, grace: dt.timedelta = GRACE) -> dict[str, int]:
    """Removes the versions of the Lance table at ``uri`` older than ``grace``, keeping pinned (tagged) ones."""
    import lance

    stats = lance.dataset(uri).cleanup_old_versions(older_than=grace, error_if_tagged_old_versions=False)
    return {"bytes_removed": int(stats.bytes_removed), "old_versions": int(stats.old_versions)}


def _union(a: pa.Schema, b: pa.Schema) -> pa.Schema:
    return pa.schema(list(a) + [f for f in b if f.name not in a.names], metadata=a.metadata)


# -- the failures table ----------------------------------------------------------
def _failures_lock(store: CellStore) -> WriterLock | None:
    if layout.is_uri(store.root):
        return None
    # Short-lived and waited for: two ingests into two tables share this table.
    return WriterLock(store.root, FAILURES_LOCK).acquire(wait=True, poll_s=0.005, timeout_s=600)


def append_failures(store: CellStore, rows: pa.Table) -> None:
    """Appends failure rows under the failures lock (creating the table on first use)."""
    import lance

    if rows.num_rows == 0:
        return
    rows = conform(rows, schema.arrow_schema("failures"))
    lock = _failures_lock(store)
    try:
        uri = store.uri("failures")
        if store.has("failures"):
            lance.write_dataset(rows, uri, mode="append")
        else:
            lance.write_dataset(rows, uri, schema=rows.schema, mode="create", enable_stable_row_ids=True)
    finally:
        if lock is not None:
            lock.release()


def delete_failures(store: CellStore, where: str) -> None:
    """Deletes the failure rows matching ``where`` under the failures lock."""
    import lance

    lock = _failures_lock(store)
    try:
        if store.has("failures"):
            lance.dataset(store.uri("failures")).delete(where)
    finally:
        if lock is not None:
            lock.release()
