"""DataLoader workers: the torch Dataset that spawned workers unpickle, the keyed
outputs of a worker that plans its own part of a source, and the check of those
keys across workers in the main process.

Kept apart so importing cytostore.embed does not import torch.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator

import numpy as np
import torch.utils.data as tud

from cytostore.keys import DUPLICATE, KeySet, cell_key_hash
from cytostore.sources.base import CellRecord, ImageTask, SourceFailure


class StreamDataset(tud.IterableDataset):
    """Iterable dataset over a cytostore.embed.TaskStream."""

    def __init__(self, stream):
        super().__init__()
        self.stream = stream

    def __iter__(self):
        return iter(self.stream)


def keyed_outputs(stream, item) -> Iterator[dict[str, Any]]:
    """Plans one source item in a worker and yields its outputs, each carrying the
    (uid, key hash) of its cells: the cells it holds, or for a skip output the
    cells already stored (with ``skipped_refs``: where, slide_id, cell_id of each)."""
    from cytostore.embed import plan_tasks

    planned = list(plan_tasks([item], stream.stored))
    skipped: list[CellRecord] = []
    if isinstance(item, ImageTask) and item.cells:
        placed = {id(c) for kind, t in planned if kind == "task" for c in t.cells}
        failed = {(f.slide_id, f.cell_id) for kind, f in planned if kind == "failure"}
        skipped = [c for c in item.cells if id(c) not in placed and (c.slide_id, c.cell_id) not in failed]
    for kind, x in planned:
        out = stream.output(kind, x)
        if kind == "task":
            out["keys"] = _keys((r["uid"], r["slide_id"], r["cell_id"]) for r in out["cells"])
        elif kind == "skipped" and len(skipped) == out["skipped"]:
            out["keys"] = _keys((c.uid, c.slide_id, c.cell_id) for c in skipped)
            out["skipped_refs"] = [(c.source_ref, c.slide_id, c.cell_id) for c in skipped]
        yield out


def _keys(cells: Iterable[tuple[int, str, str]]) -> tuple[np.ndarray, np.ndarray]:
    triples = list(cells)
    uids = np.fromiter((u for u, _, _ in triples), dtype=np.int64, count=len(triples))
    hashes = np.fromiter((cell_key_hash(s, c) for _, s, c in triples), dtype=np.int64, count=len(triples))
    return uids, hashes


def merge_parts(outputs: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Passes worker outputs on, turning a key already met in another worker's part
    into a failure: the cell is dropped (or no longer counted as skipped).

    Holds 16 bytes per key met; the copy that reaches this process first is kept.
    """
    from cytostore.embed import _key_failure

    met = KeySet()
    for out in outputs:
        keys = out.pop("keys", None)
        refs = out.pop("skipped_refs", None)
        if keys is None or not len(keys[0]):
            yield out
            continue
        verdict = met.classify(*keys)
        bad = np.flatnonzero(verdict >= DUPLICATE)
        if bad.size:
            failures = []
            for j in bad:
                if refs is not None:
                    where, slide_id, cell_id = refs[j]
                else:
                    row = out["cells"][j]
                    where, slide_id, cell_id = row["source_ref"], row["slide_id"], row["cell_id"]
                rec = CellRecord(slide_id=slide_id, cell_id=cell_id, x=None, y=None, source_ref=where)
                failures.append(_key_failure(rec, int(verdict[j]), [], met, where))
            _drop(out, bad, failures, skipped=refs is not None)
        yield out


def _drop(out: dict[str, Any], bad: np.ndarray, failures: list[SourceFailure], skipped: bool) -> None:
    out["failures"] = list(out["failures"]) + failures
    out["failed_cells"] = out.get("failed_cells", 0) + len(failures)
    if skipped:
        out["skipped"] -= len(failures)
        return
    keep = np.ones(len(out["cells"]), dtype=bool)
    keep[bad] = False
    out["cells"] = [r for r, k in zip(out["cells"], keep) if k]
    out["pixels"] = out["pixels"][keep] if out["cells"] else None
