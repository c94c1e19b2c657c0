"""Prototype and prediction tables in the store: ``prototypes.<name>.lance`` and
``predictions.<name>.lance``, laid out by schemas/prototypes.json and predictions.json."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from cytostore.store import schema
from cytostore.errors import StoreError
from cytostore.fewshot.prototypes import FeatureTransform, PrototypeConfig, Prototypes, StoreStats, power_transform
from cytostore.store import CellStore

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,99}$")


def as_store(store: CellStore | str | Path) -> CellStore:
    """A CellStore from a store or a path (opened, so a missing store is a StoreError)."""
    return store if isinstance(store, CellStore) else CellStore.open(store)


def check_name(name: str) -> str:
    """Returns ``name`` when it is a valid prototype-set name (it becomes a folder name)."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise StoreError(f"prototype set name {name!r} is not valid: use 1-100 letters, digits, '_' or '-', "
                         "starting with a letter or digit")
    return name


def _uri(store: CellStore, kind: str, name: str) -> str:
    return store.uri(kind, check_name(name))


def prototype_sets(store: CellStore | str | Path) -> list[str]:
    """Names of the prototype sets stored in ``store``."""
    s = as_store(store)
    return s.names("prototypes")


MAX_COVARIANCE_CELLS = 200_000  # cells (evenly strided) the covariance is estimated from


def store_stats(store: CellStore, encoder: str | None, power: float | None, rank: int | None = None,
                batch_rows: int = 8192) -> StoreStats:
    """Mean (every cell) and, with ``rank``, the leading covariance eigenpairs of the powered
    embeddings of a table, read batch by batch. No label is used."""
    from threadpoolctl import threadpool_limits

    ds = store.dataset(encoder)
    key = (store.root, store.resolve(encoder), int(ds.version), ds.count_rows(), power, rank)
    if key not in _STATS_CACHE:
        # One BLAS thread: on shared machines more threads mostly wait on each other.
        with threadpool_limits(limits=1):
            stats = _compute_stats(ds, store, encoder, power, rank, batch_rows)
        if len(_STATS_CACHE) >= 8:
            _STATS_CACHE.pop(next(iter(_STATS_CACHE)))
        _STATS_CACHE[key] = stats
    return _STATS_CACHE[key]


_STATS_CACHE: dict[tuple, StoreStats] = {}  # (root, table, version, rows, power, rank) -> stats


def _compute_stats(ds, store: CellStore, encoder: str | None, power: float | None, rank: int | None,
                   batch_rows: int) -> StoreStats:
    from cytostore.store import embedding_matrix

    n_rows = ds.count_rows()
    if not n_rows:
        raise StoreError(f"table {store.resolve(encoder)!r} of {store.root} holds no cells")
    stride = max(1, -(-n_rows // MAX_COVARIANCE_CELLS))
    total = second = None
    n = n_cov = 0
    for batch in ds.to_batches(columns=["embedding"], batch_size=batch_rows):
        if batch.num_rows == 0:
            continue
        x = power_transform(embedding_matrix(batch.column(0)), power)
        s = x.sum(axis=0, dtype=np.float64)
        total = s if total is None else total + s
        n += len(x)
        if rank:
            xs = x[::stride].astype(np.float64)
            g = xs.T @ xs
            second = g if second is None else second + g
            n_cov += len(xs)
    mean = total / n
    if not rank:
        return StoreStats(mean.astype(np.float32), n=n)
    cov = second / n_cov - np.outer(mean, mean)
    w, v = np.linalg.eigh(cov)
    k = min(rank, len(w))
    return StoreStats(mean.astype(np.float32), w[::-1][:k].astype(np.float32),
                      v[:, ::-1][:, :k].T.astype(np.float32), n)


def stats_for(store: CellStore, encoder: str | None, config: PrototypeConfig) -> StoreStats | None:
    """The store statistics a config needs (None when it centres nothing)."""
    if not config.centre and config.whiten is None:
        return None
    return store_stats(store, encoder, config.power, config.whiten_rank if config.whiten is not None else None)


@dataclass(frozen=True)
class PrototypeSet:
    """A stored prototype set, ready to score cells."""

    name: str  # set name
    version: int  # Lance version of prototypes.<name>
    prototypes: Prototypes  # vectors in the transformed space
    transform: FeatureTransform  # raw embedding -> transformed space
    config: PrototypeConfig  # how it was built
    metadata: dict[str, Any]  # everything stored with it (provenance, support ids, ...)

    @property
    def support_uids(self) -> set[int]:
        """uids of the store cells used as support (images have none)."""
        return {int(u) for u in self.metadata.get("support", {}).get("uids", [])}


def write_prototypes(store: CellStore, name: str, protos: Prototypes, metadata: dict[str, Any]) -> int:
    """Writes a prototype set as a new version of ``prototypes.<name>``; returns that version."""
    from cytostore.store.derived import write_version

    dim = protos.vectors.shape[1]
    sch = schema.arrow_schema("prototypes", dim=dim, embedding_dtype="float32", metadata=metadata)
    flat = pa.array(protos.vectors.astype(np.float32).reshape(-1), type=pa.float32())
    table = pa.Table.from_arrays([
        pa.array(protos.labels.tolist(), pa.string()),
        pa.array(protos.index.astype(np.int32), pa.int32()),
        pa.FixedSizeListArray.from_arrays(flat, dim),
        pa.array(protos.n_support.astype(np.int32), pa.int32()),
    ], schema=sch)
    return write_version(store.root, "prototypes", check_name(name), sch, lambda current: table)


def load_prototypes(store: CellStore | str | Path, name: str, version: int | None = None) -> PrototypeSet:
    """Reads a stored prototype set (latest version unless ``version`` is given).

    Raises:
        StoreError: no set of that name (the message lists the sets there are).
    """
    import lance

    s = as_store(store)
    if name not in prototype_sets(s):
        have = prototype_sets(s)
        raise StoreError(f"no prototype set named {name!r} in {s.root}; "
                         + (f"it has {have}" if have else "fit one with `cytostore fewshot fit --name NAME`"))
    ds = lance.dataset(_uri(s, "prototypes", name), version=version)
    t = ds.to_table()
    meta = schema.read_metadata(ds.schema)
    from cytostore.store import embedding_matrix

    config = PrototypeConfig.from_dict(meta.get("config", {}))
    protos = Prototypes(np.array(t.column("label").to_pylist(), dtype=object),
                        t.column("proto_index").to_numpy().astype(int),
                        np.array(embedding_matrix(t.column("vector")), dtype=np.float32),
                        t.column("n_support").to_numpy().astype(int), config.l2)
    return PrototypeSet(name, int(ds.version), protos, FeatureTransform.from_dict(meta.get("transform", {})),
                        config, meta)


PREDICTION = "prediction"  # the predicted class (layout 2)
LAYOUT1_PREDICTION = "label"  # its name in layout 1, renamed on read


def _layout1(sch: pa.Schema) -> bool:
    """Whether a predictions table was written with layout 1 (class column ``label``)."""
    return LAYOUT1_PREDICTION in sch.names and PREDICTION not in sch.names


def _upgraded(table: pa.Table) -> pa.Table:
    """A layout-1 table with its class column renamed to ``prediction`` (others unchanged)."""
    if not _layout1(table.schema):
        return table
    return table.rename_columns([PREDICTION if c == LAYOUT1_PREDICTION else c for c in table.column_names])


def write_predictions(store: CellStore, name: str, rows: pa.Table) -> int:
    """Writes prediction rows as a new version of ``predictions.<name>``; returns that version.

    Rows for cells predicted before and not in ``rows`` are carried over; cells in
    ``rows`` get their new prediction. The new version is written whole (streamed
    from the previous version's files, which a version never changes) and committed
    at once under the prediction set's writer lock: no ``merge_insert``, so a killed
    predict leaves the previous version intact and concurrent writers wait or stop.
    A set written with layout 1 is carried over into layout 2 (``label`` -> ``prediction``).
    """
    import lance

    from cytostore.keys import UidSet
    from cytostore.store import conform
    from cytostore.store.derived import write_version

    sch = schema.arrow_schema("predictions", metadata={"schema": "predictions",
                                                        "schema_version": schema.version("predictions"),
                                                        "prototypes": name})
    rows = conform(_upgraded(rows), sch)
    new = UidSet(rows.column("uid").to_numpy())

    def make(current: int | None):
        if current is None:
            return rows

        def batches():
            for b in lance.dataset(_uri(store, "predictions", name), version=current).to_batches(batch_size=65_536):
                keep = ~new.contains(b.column("uid").to_numpy())
                if keep.any():
                    old = _upgraded(pa.Table.from_batches([b]).filter(pa.array(keep)))
                    yield from conform(old, sch).to_batches()
            yield from rows.to_batches()

        return pa.RecordBatchReader.from_batches(sch, batches())

    return write_version(store.root, "predictions", check_name(name), sch, make)


def read_predictions(store: CellStore | str | Path, name: str, columns: list[str] | None = None,
                     where: str | None = None) -> pa.Table:
    """The predictions of set ``name``: one row per predicted cell, the class in ``prediction``.

    Join it with ``CellStore.cells()`` on ``uid`` (with ``slide_id`` and ``cell_id`` too, to
    keep one of each): the cell's stored ``label`` and its ``prediction`` sit side by side.
    Sets written with layout 1 read the same: their ``label`` column comes back as
    ``prediction`` (``columns`` and ``where`` may name ``prediction`` for them too).

    Raises:
        StoreError: nothing was predicted with that name yet, or a bad filter.
    """
    import lance

    s = as_store(store)
    uri = _uri(s, "predictions", name)
    if "://" not in uri and not Path(uri).is_dir():
        raise StoreError(f"no predictions named {name!r} in {s.root}; run "
                         f"`cytostore fewshot predict --store {s.root} --name {name}` first")
    ds = lance.dataset(uri)
    if _layout1(ds.schema):
        if columns is not None:
            columns = [LAYOUT1_PREDICTION if c == PREDICTION else c for c in columns]
        if where:
            where = re.sub(rf"\b{PREDICTION}\b", LAYOUT1_PREDICTION, where)
    try:
        return _upgraded(ds.to_table(columns=columns, filter=where))
    except Exception as e:
        if where or columns:
            raise StoreError(f"cannot read predictions {name!r} of {s.root} with columns {columns} and filter "
                             f"{where!r}: {e}; the columns are {_upgraded(ds.schema.empty_table()).column_names}") from e
        raise


SHOWN = ("slide_id", "cell_id", "label", "prediction", "nearest", "runner_up", "score", "margin", "uid")


def show_predictions(store: CellStore | str | Path, name: str, slide: str | None = None, limit: int = 50,
                     encoder: str | None = None) -> tuple[pa.Table, int]:
    """Predictions of set ``name`` cell by cell, beside each cell's stored ``label``.

    Args:
        store: the store (or its path).
        name: a prediction set (``fewshot predict`` or ``cluster``).
        slide: only this slide's cells.
        limit: at most this many rows (0: all), ordered by slide then cell id.
        encoder: the cell table holding the labels; default the table the prototype set
            was fitted on, else the store's only (or default) one.

    Returns:
        (rows with the columns of ``SHOWN``, how many cells the set predicted in all).

    Raises:
        InputError: a negative limit, or a slide the set did not predict.
        StoreError: no such prediction set.
    """
    from cytostore.errors import InputError

    if limit < 0:
        raise InputError(f"--limit must be 0 (all) or more, got {limit}")
    s = as_store(store)
    where = None
    if slide is not None:
        where = "slide_id = '" + slide.replace("'", "''") + "'"
    pred = read_predictions(s, name, columns=["uid", "slide_id", "cell_id", "prediction", "nearest", "runner_up",
                                              "score", "margin"], where=where)
    total = pred.num_rows
    if slide is not None and total == 0:
        raise InputError(f"predictions {name!r} hold no cell of slide {slide!r}; list the slides with "
                         f"`cytostore slides --store {s.root}`")
    pred = pred.sort_by([("slide_id", "ascending"), ("cell_id", "ascending")])
    if limit:
        pred = pred.slice(0, limit)
    if encoder is None and name in prototype_sets(s):
        encoder = load_prototypes(s, name).metadata.get("table")
    table = s.resolve(encoder)
    labels: dict[int, Any] = {}
    if "label" in s.dataset(table).schema.names and pred.num_rows:
        uids = pred.column("uid").to_numpy()
        for start in range(0, len(uids), 1000):
            part = uids[start:start + 1000]
            got = s.cells(columns=["uid", "label"], where="uid IN (" + ",".join(str(int(u)) for u in part) + ")",
                          encoder=table)
            labels.update(zip(got.column("uid").to_pylist(), got.column("label").to_pylist()))
    stored = pa.array([labels.get(int(u)) for u in pred.column("uid").to_numpy()], pa.string())
    pred = pred.append_column("label", stored)
    return pred.select(list(SHOWN)), total
