"""Derived cell tables: batch correction in embedding space, and morphometrics beside
(or instead of) the embedding (``cytostore harmonise``).

A derived table holds the same rows as its source (keys, coordinates, labels,
thumbnails, every other column) with a new ``embedding``, and is written through
the store writer, so search, evaluate, fewshot and MIL read it like any cell
table. Its provenance names the source table and version and the method; its
``identity.encoder.arch`` ends in ``+harmonise:...``, so no ingest appends to it.

Methods (``--method``):

- ``centre``: per group (``--by``, default ``slide_id``) the group's mean is
  subtracted and the mean of all cells added back: every group's mean becomes the
  global mean. Removes any per-slide offset, including a real one (a slide whose
  cells are all abnormal looks more like the others afterwards).
- ``harmony``: Harmony (Korsunsky et al. 2019, ``harmonypy``) on the leading
  ``HARMONY_PCS`` principal components; the correction it makes there is added to
  the full embedding (the rest of the embedding is left as it was).
- ``none``: the embedding unchanged (with ``--morphometrics``).

``--morphometrics append`` puts the ``morph_*`` columns (z-scored, from the table or
from ``--morphometrics-from``) beside the embedding, each block scaled to a mean
row norm of 1; ``only`` makes them the whole embedding. Missing values take the
column's median.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np
import pyarrow as pa

from cytostore.errors import InputError

METHODS = ("centre", "harmony", "none")
MORPHOMETRICS = ("append", "only")
HARMONY_PCS = 50


def centre(emb: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Each group's mean moved onto the mean of all rows (float64 in, float64 out)."""
    out = emb.astype(np.float64, copy=True)
    overall = out.mean(axis=0)
    codes, inverse = np.unique(groups, return_inverse=True)
    sums = np.zeros((len(codes), out.shape[1]))
    np.add.at(sums, inverse, out)
    means = sums / np.bincount(inverse)[:, None]
    out -= means[inverse] - overall
    return out


def harmony(emb: np.ndarray, groups: np.ndarray, seed: int = 0) -> np.ndarray:
    """Harmony on the leading principal components; its correction added back to the full embedding."""
    try:
        import harmonypy
    except ImportError as e:
        raise InputError("--method harmony needs harmonypy: pip install 'cytostore[adapt]'") from e
    import pandas as pd

    x = emb.astype(np.float64)
    mean = x.mean(axis=0)
    xc = x - mean
    k = int(min(HARMONY_PCS, x.shape[1], x.shape[0] - 1))
    _, _, vt = np.linalg.svd(xc, full_matrices=False)
    comps = vt[:k]
    pcs = xc @ comps.T
    meta = pd.DataFrame({"group": pd.Categorical(groups.astype(str))})
    ho = harmonypy.run_harmony(pcs, meta, ["group"], random_state=seed, verbose=False)
    z = np.asarray(ho.Z_corr)
    z = z.T if z.shape[0] == k and z.shape[1] != k else z
    return x + (z - pcs) @ comps


def morph_matrix(table: pa.Table) -> tuple[np.ndarray, list[str], int]:
    """(z-scored morph_* values, their names, cells with a missing value filled by the median)."""
    from cytostore.morphometrics import COLUMNS

    names = [c for c in COLUMNS if c in table.column_names]
    if not names:
        raise InputError("no morph_* columns to use: ingest with --morphometrics, or name a table that has them "
                         "with --morphometrics-from")
    m = np.column_stack([table.column(c).to_numpy(zero_copy_only=False).astype(np.float64) for c in names])
    missing = ~np.isfinite(m)
    if missing.all(axis=0).any():
        empty = [n for n, e in zip(names, missing.all(axis=0)) if e]
        if len(empty) == len(names):
            raise InputError("the morph_* columns are empty for these cells: ingest with --morphometrics first")
        keep = ~missing.all(axis=0)
        m, missing, names = m[:, keep], missing[:, keep], [n for n, k in zip(names, keep) if k]
    med = np.nanmedian(np.where(missing, np.nan, m), axis=0)
    m = np.where(missing, med, m)
    sd = m.std(axis=0)
    m = (m - m.mean(axis=0)) / np.where(sd > 0, sd, 1.0)
    return m, names, int(missing.any(axis=1).sum())


def _scaled(block: np.ndarray) -> np.ndarray:
    norm = float(np.linalg.norm(block, axis=1).mean())
    return block / norm if norm > 0 else block


def harmonise(store, table: str, out: str, method: str = "centre", by: str = "slide_id",
              morphometrics: str | None = None, morphometrics_from: str | None = None,
              progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Writes cell table ``out``: the rows of ``table`` with a corrected (or extended) embedding.

    Args:
        store: a CellStore.
        table: the source cell table.
        out: the new table's name (must not exist).
        method: ``centre``, ``harmony`` or ``none``.
        by: the column whose groups are corrected (``slide_id``, or e.g. a scanner column).
        morphometrics: None, ``append`` or ``only``.
        morphometrics_from: the table the morph_* columns come from (joined on uid); default ``table``.
        progress: called with a short message per step.

    Returns:
        A summary (rows, dim, groups, method, source version, seconds).
    """
    from cytostore.store import schema
    from cytostore.store.cells import table_name_for
    from cytostore.store.writer import CellWriter, CommitPolicy

    t0 = time.perf_counter()
    say = progress or (lambda msg: None)
    if method not in METHODS:
        raise InputError(f"unknown --method {method!r}; use one of {', '.join(METHODS)}")
    if morphometrics not in (None, *MORPHOMETRICS):
        raise InputError(f"--morphometrics must be append or only, got {morphometrics!r}")
    if method == "none" and morphometrics is None:
        raise InputError("--method none changes nothing: add --morphometrics append|only, or use centre/harmony")
    if not store.has_table(table):
        raise InputError(f"no cell table {table!r} in {store.root}; see `cytostore info --store {store.root}`")
    if table_name_for(out) != out:
        raise InputError(f"--out {out!r} is not a valid table name; use letters, digits, '_', '-' or '.'")
    if store.has_table(out):
        raise InputError(f"table {out!r} already exists in {store.root}; choose another --out, or delete it first")
    ds = store.dataset(table)
    version = int(ds.version)
    if by not in ds.schema.names:
        raise InputError(f"table {table!r} has no column {by!r} to correct by; use --by slide_id or one of "
                         f"{', '.join(n for n in ds.schema.names if n not in ('embedding', 'thumbnail'))}")
    say(f"reading {table} (version {version})")
    rows = ds.to_table()
    emb = np.asarray(rows.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False),
                     dtype=np.float32).reshape(rows.num_rows, -1)
    groups = np.asarray(rows.column(by).to_pylist(), dtype=object)
    groups = np.where(groups == None, "", groups).astype(str)  # noqa: E711 - elementwise null test
    say(f"{method} over {len(set(groups))} groups of {by}")
    if method == "centre":
        new = centre(emb, groups)
    elif method == "harmony":
        new = harmony(emb, groups)
    else:
        new = emb.astype(np.float64)
    morph_info = None
    if morphometrics:
        src = rows if morphometrics_from in (None, table) else _joined(store, morphometrics_from, rows)
        m, names, filled = morph_matrix(src)
        new = m if morphometrics == "only" else np.hstack([_scaled(new - new.mean(axis=0)), _scaled(m)])
        morph_info = {"mode": morphometrics, "from": morphometrics_from or table, "columns": names,
                      "cells_filled_with_median": filled}
    dtype = rows.schema.field("embedding").type.value_type
    np_dtype = np.float16 if dtype == pa.float16() else np.float32
    record = _record(store.provenance(table), table, version, method, by, new.shape[1], morph_info)
    col = pa.FixedSizeListArray.from_arrays(pa.array(new.astype(np_dtype).reshape(-1)), new.shape[1])
    rows = rows.set_column(rows.schema.get_field_index("embedding"), pa.field("embedding", col.type, False), col)
    target = pa.schema(list(rows.schema), metadata={schema.METADATA_KEY: _json(record)})
    say(f"writing {out} ({rows.num_rows} rows, {new.shape[1]}-d)")
    with CellWriter(store, out, CommitPolicy(commit_rows=max(rows.num_rows, 1))) as w:
        w.prepare(target)
        w.append(rows.replace_schema_metadata(target.metadata))
    return {"table": out, "source": table, "source_version": version, "method": method, "by": by,
            "rows": rows.num_rows, "dim": int(new.shape[1]), "groups": int(len(set(groups))),
            "morphometrics": morph_info, "seconds": round(time.perf_counter() - t0, 2)}


def _joined(store, other: str, rows: pa.Table) -> pa.Table:
    """The morph_* columns of table ``other`` in the order of ``rows`` (null where it lacks a cell)."""
    from cytostore.morphometrics import COLUMNS

    if not store.has_table(other):
        raise InputError(f"--morphometrics-from: no cell table {other!r} in {store.root}")
    ods = store.dataset(other)
    names = [c for c in COLUMNS if c in ods.schema.names]
    src = ods.to_table(columns=["uid", *names])
    pos = {u: i for i, u in enumerate(src.column("uid").to_pylist())}
    idx = pa.array([pos.get(u) for u in rows.column("uid").to_pylist()], pa.int64())
    return pa.table({n: src.column(n).take(idx) for n in names})


def _record(source: dict[str, Any], table: str, version: int, method: str, by: str, dim: int,
            morph: dict[str, Any] | None) -> dict[str, Any]:
    from cytostore.store.provenance import identity_of, identity_sha256

    ident = identity_of(source)
    ident = {**ident, "encoder": dict(ident.get("encoder") or {})}
    tag = method if morph is None else f"{method}+morphometrics-{morph['mode']}"
    ident["encoder"]["arch"] = f"{ident['encoder'].get('arch')}+harmonise:{tag}"
    ident["encoder"]["dim"] = dim
    ident["derived"] = {"from": table, "from_version": version, "method": method, "by": by,
                        "morphometrics": None if morph is None else morph["mode"]}
    record = {k: v for k, v in source.items() if k not in ("identity", "identity_sha256", "runtime_joins")}
    record.update(identity=ident, identity_sha256=identity_sha256(ident),
                  derived={"from": table, "from_version": version, "method": method, "by": by,
                           "morphometrics": morph, "command": "cytostore harmonise"})
    return record


def _json(record: dict[str, Any]) -> bytes:
    import json

    return json.dumps(record, sort_keys=True).encode()
