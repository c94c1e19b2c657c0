"""Bags of cell embeddings, one per slide, read straight from a cell table.

Memory policy: when every bag together fits under ``cache_bytes`` (default 2 GiB
of stored float16 values), the bags are read once in a single scan and kept in
RAM; otherwise each bag is read from Lance when it is needed (``slide_id = '...'``
filter), so memory stays bounded by the largest bag. Cells within a bag are
always ordered by ``uid``, so both paths give the same bags, bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from cytostore.errors import StoreError
from cytostore.store import CellStore, embedding_matrix
from cytostore.store.filters import check_where

DEFAULT_CACHE_BYTES = 2 * 1024**3  # bags are cached in RAM when their stored bytes fit under this
READ_BATCH = 8192  # rows per Lance batch when a bag is streamed


def sql_quote(value: str) -> str:
    """A SQL string literal (single quotes doubled)."""
    return "'" + str(value).replace("'", "''") + "'"


def slides_filter(slide_ids: Sequence[str], where: str | None = None) -> str:
    """A Lance filter selecting ``slide_ids`` (and ``where`` when given)."""
    if len(slide_ids) == 1:
        expr = f"slide_id = {sql_quote(slide_ids[0])}"
    else:
        expr = "slide_id IN (" + ", ".join(sql_quote(s) for s in slide_ids) + ")"
    return f"({expr}) AND ({where})" if where else expr


@dataclass(frozen=True)
class Bag:
    """The cells of one slide."""

    slide_id: str  # the slide
    features: np.ndarray  # (n, dim) stored embeddings (float16 by default), rows ordered by uid
    uids: np.ndarray  # (n,) int64 cell uids, ascending


def sample_indices(n: int, max_cells: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted positions of at most ``max_cells`` of ``n`` cells, drawn without replacement."""
    if max_cells <= 0 or n <= max_cells:
        return np.arange(n)
    return np.sort(rng.choice(n, size=max_cells, replace=False))


class BagSet:
    """The bags of a list of slides, cached in RAM or streamed from the store.

    Args:
        store: the cell store.
        table: cell-table name.
        slide_ids: slides to serve, in this order.
        where: optional SQL filter on cells; a bag is the matching cells of its slide.
        cache_bytes: cache every bag in RAM when their stored size fits under this;
            0 always streams.
    """

    def __init__(self, store: CellStore, table: str, slide_ids: Sequence[str], where: str | None = None,
                 cache_bytes: int = DEFAULT_CACHE_BYTES):
        self.slide_ids = list(slide_ids)
        self.where = check_where(where) or None
        self._ds = store.dataset(table)  # one version for the whole run
        self.table = table
        emb_type = self._ds.schema.field("embedding").type
        self.dim = int(emb_type.list_size)
        itemsize = np.dtype(emb_type.value_type.to_pandas_dtype()).itemsize
        self.sizes = self._count() if self.slide_ids else {}
        self.nbytes = sum(self.sizes.values()) * self.dim * itemsize
        self.cached = bool(self.slide_ids) and self.nbytes <= cache_bytes
        self._cache: dict[str, Bag] | None = self._load_all() if self.cached else None

    def __len__(self) -> int:
        return len(self.slide_ids)

    def __getitem__(self, i: int) -> Bag:
        sid = self.slide_ids[i]
        if self._cache is not None:
            return self._cache[sid]
        return self.read(sid)

    def __iter__(self) -> Iterator[Bag]:
        for i in range(len(self)):
            yield self[i]

    def size(self, slide_id: str) -> int:
        """Number of cells in a slide's bag."""
        return self.sizes.get(slide_id, 0)

    def empty(self) -> list[str]:
        """Slides with no cell (after ``where``)."""
        return [s for s in self.slide_ids if not self.sizes.get(s)]

    def read(self, slide_id: str) -> Bag:
        """Reads one bag from the table (the streaming path).

        Two ordered scans: the uids first, then the embeddings batch by batch,
        each row written straight to its sorted place, so the bag is held once.
        """
        where = slides_filter([slide_id], self.where)
        try:
            uids = self._ds.to_table(columns=["uid"], filter=where).column("uid").to_numpy()
            order = np.argsort(uids, kind="stable")
            rank = np.empty_like(order)
            rank[order] = np.arange(len(order))
            value_type = self._ds.schema.field("embedding").type.value_type
            out = np.empty((len(uids), self.dim), dtype=value_type.to_pandas_dtype())
            start = 0
            for batch in self._ds.to_batches(columns=["embedding"], filter=where, batch_size=READ_BATCH,
                                             scan_in_order=True):
                n = batch.num_rows
                if start + n > len(uids):
                    raise StoreError("the table changed while it was read")
                out[rank[start:start + n]] = embedding_matrix(batch.column("embedding"))
                start += n
        except StoreError:
            raise
        except Exception as e:
            raise StoreError(f"cannot read the cells of slide {slide_id!r} from table {self.table!r}: {e}") from e
        if start != len(uids):
            raise StoreError(f"slide {slide_id!r}: read {start} embeddings for {len(uids)} uids; the table changed "
                             "while it was read, run again")
        return Bag(slide_id, out, uids[order])

    def _count(self) -> dict[str, int]:
        try:
            t = self._ds.to_table(columns=["slide_id"], filter=slides_filter(self.slide_ids, self.where))
        except Exception as e:
            raise StoreError(f"cannot select cells of table {self.table!r} with {self.where!r}: {e}") from e
        return {str(d["values"]): int(d["counts"]) for d in t.column("slide_id").value_counts().to_pylist()}

    def _load_all(self) -> dict[str, Bag]:
        # One scan for every bag: far fewer reads than one filtered query per slide.
        parts: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {s: [] for s in self.slide_ids}
        scanner = self._ds.to_batches(columns=["slide_id", "uid", "embedding"],
                                      filter=slides_filter(self.slide_ids, self.where))
        for batch in scanner:
            if batch.num_rows == 0:
                continue
            sids = np.asarray(batch.column("slide_id").to_pylist(), dtype=object)
            uids = batch.column("uid").to_numpy()
            emb = embedding_matrix(batch.column("embedding"))
            names, inverse = np.unique(sids, return_inverse=True)
            for k, name in enumerate(names):
                rows = np.flatnonzero(inverse == k)
                parts[str(name)].append((uids[rows], emb[rows]))
        out = {}
        for sid, chunks in parts.items():
            if chunks:
                uids = np.concatenate([c[0] for c in chunks])
                emb = np.concatenate([c[1] for c in chunks])
                order = np.argsort(uids, kind="stable")
                out[sid] = Bag(sid, emb[order], uids[order])
            else:
                out[sid] = Bag(sid, np.zeros((0, self.dim), dtype=np.float16), np.zeros(0, dtype=np.int64))
        return out


def store_slide_labels(store: CellStore, table: str) -> dict[str, str | None]:
    """slide id -> its ``slide_label`` (the smallest non-null value; None when unlabelled)."""
    import pyarrow.compute as pc

    t = store.cells(columns=["slide_id", "slide_label"], encoder=table)
    out: dict[str, str | None] = {s: None for s in pc.unique(t.column("slide_id")).to_pylist()}
    pairs = t.filter(pc.is_valid(t.column("slide_label"))).group_by(["slide_id", "slide_label"]).aggregate([])
    for s, lab in sorted(zip(pairs.column("slide_id").to_pylist(), pairs.column("slide_label").to_pylist()),
                         reverse=True):
        out[s] = lab
    return out


def store_slides(store: CellStore, table: str, where: str | None = None) -> list[str]:
    """Distinct slide ids of a table (matching ``where``), sorted."""
    t = store.cells(columns=["slide_id"], where=where, encoder=table)
    return sorted(set(t.column("slide_id").to_pylist()))
