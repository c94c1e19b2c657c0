"""Grouped splits that cannot leak: duplicate groups merged, folds and episodes by group.

Every split here is made over *groups* (slides, fields, patients), never over cells, so
no group has cells on both sides. Groups that hold the same image content (byte-identical
cell thumbnails, or byte-identical source images) are first merged into one group, so a
duplicated field cannot sit on both sides either.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np

from cytostore.errors import InputError
from cytostore.fewshot.episodes import Episode

MAX_IMAGE_BYTES = 512 * 2**20  # source images larger than this (whole slides) are not hashed
MAX_GROUPS_PER_HASH = 8  # a thumbnail shared by more groups is taken as blank/uninformative


def content_hash(data: bytes) -> bytes:
    """A 16-byte BLAKE2b digest of ``data``."""
    return hashlib.blake2b(data, digest_size=16).digest()


def file_hash(path: str, max_bytes: int = MAX_IMAGE_BYTES) -> bytes | None:
    """Digest of a local file's bytes; None when it is not a readable local file or too large."""
    try:
        if not os.path.isfile(path) or os.path.getsize(path) > max_bytes:
            return None
        h = hashlib.blake2b(digest_size=16)
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        return h.digest()
    except OSError:
        return None


class _UnionFind:
    def __init__(self, items: Iterable[str]):
        self.parent = {i: i for i in items}

    def find(self, a: str) -> str:
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: str, b: str) -> bool:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return False
        lo, hi = sorted((ra, rb))  # the smaller name represents the merged group
        self.parent[hi] = lo
        return True


@dataclass(frozen=True)
class Dedup:
    """Groups after merging duplicates, and what was merged."""

    groups: np.ndarray  # (N,) merged group of each cell (the smallest original name of its set)
    report: dict[str, Any]  # counts of what was found and merged, for the output


def stored_hashes(rows, column: str) -> list[bytes] | None:
    """The int64 hashes of ``column`` (``content_hash``/``image_hash`` written at ingest) as bytes,
    or None when the column is absent or null in any row (older rows: hash what is stored instead)."""
    if column not in rows.column_names or rows.column(column).null_count:
        return None
    return [int(v).to_bytes(8, "little", signed=True) for v in rows.column(column).to_pylist()]


def merge_duplicate_groups(groups: Sequence[str], cell_hashes: Sequence[bytes | None] | None = None,
                           group_image_hashes: dict[str, set[bytes]] | None = None,
                           max_groups_per_hash: int = MAX_GROUPS_PER_HASH) -> Dedup:
    """Merges groups that share identical content into one group for splitting.

    Two groups are merged (transitively) when a cell of one has a thumbnail byte-identical
    to a cell of the other, or when they were cropped from a byte-identical source image.
    A thumbnail hash shared by more than ``max_groups_per_hash`` groups is ignored (a blank
    or uniform crop says nothing about shared content) and counted in the report.

    Args:
        groups: group of each cell.
        cell_hashes: content hash of each cell's stored thumbnail (None where unknown).
        group_image_hashes: group -> hashes of the source image files its cells came from.
    """
    groups = np.asarray([str(g) for g in groups], dtype=object)
    uf = _UnionFind(sorted(set(groups.tolist())))
    by_hash: dict[bytes, set[str]] = {}
    dup_cells = 0
    if cell_hashes is not None:
        for g, h in zip(groups.tolist(), cell_hashes):
            if h is not None:
                by_hash.setdefault(h, set()).add(g)
        owners: dict[bytes, int] = {}
        for h in cell_hashes:
            if h is not None:
                owners[h] = owners.get(h, 0) + 1
    ignored = 0
    thumb_links = image_links = 0
    for h, gs in by_hash.items():
        if len(gs) < 2:
            continue
        if len(gs) > max_groups_per_hash:
            ignored += 1
            continue
        dup_cells += owners[h]
        first, *rest = sorted(gs)
        for g in rest:
            thumb_links += uf.union(first, g)
    by_image: dict[bytes, set[str]] = {}
    for g, hs in (group_image_hashes or {}).items():
        for h in hs:
            by_image.setdefault(h, set()).add(str(g))
    image_pairs = 0
    for gs in by_image.values():
        if len(gs) < 2:
            continue
        image_pairs += len(gs) - 1
        first, *rest = sorted(gs)
        for g in rest:
            if g in uf.parent and first in uf.parent:
                image_links += uf.union(first, g)
    merged = np.asarray([uf.find(g) for g in groups.tolist()], dtype=object)
    before, after = len(uf.parent), len(set(merged.tolist()))
    sets: dict[str, set[str]] = {}
    for g in uf.parent:
        sets.setdefault(uf.find(g), set()).add(g)
    multi = {r: sorted(s) for r, s in sets.items() if len(s) > 1}
    in_merged = np.isin(merged, list(multi)) if multi else np.zeros(len(groups), dtype=bool)
    report = {
        "groups_before": before,
        "groups_after": after,
        "groups_merged": int(sum(len(s) for s in multi.values())),
        "cells_in_merged_groups": int(in_merged.sum()),
        "cells_with_identical_thumbnail_elsewhere": int(dup_cells),
        "merges_by_thumbnail": int(thumb_links),
        "merges_by_source_image": int(image_links),
        "identical_source_image_links": int(image_pairs),
        "ignored_common_thumbnails": int(ignored),
        "merged_sets": [s for _, s in sorted(multi.items())][:50],
    }
    return Dedup(merged, report)


def check_groups(groups: np.ndarray, folds: int, what: str = "folds") -> None:
    """Raises InputError when there are fewer groups than ``folds``."""
    n = len(set(np.asarray(groups).tolist()))
    if n < folds:
        raise InputError(f"{n} group(s) after merging duplicates, too few for {folds} grouped {what}: "
                         f"pass --folds {max(n, 2)} (at most the number of groups), or a --group column "
                         "with more distinct values")


def grouped_folds(labels: Sequence[str], groups: Sequence[str], folds: int,
                  seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified folds over groups (sklearn StratifiedGroupKFold): (train, test) index pairs.

    No group has cells on both sides of any fold; :func:`assert_disjoint` checks it again.
    """
    import warnings

    from sklearn.model_selection import StratifiedGroupKFold

    labels = np.asarray(labels, dtype=object).astype(str)
    groups = np.asarray(groups, dtype=object).astype(str)
    if folds < 2:
        raise InputError(f"grouped cross-validation needs at least 2 folds, got {folds}; pass --folds 2 or more")
    check_groups(groups, folds)
    cv = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():  # classes with fewer groups than folds only warn
        warnings.simplefilter("ignore", UserWarning)
        out = [(np.asarray(tr), np.asarray(te)) for tr, te in cv.split(np.zeros(len(labels)), labels, groups)]
    for tr, te in out:
        assert_disjoint(groups[tr], groups[te])
    return out


def assert_disjoint(a: Iterable[str], b: Iterable[str]) -> None:
    """Raises RuntimeError when a group is on both sides of a split (a bug, never user input)."""
    shared = set(np.asarray(list(a), dtype=object).tolist()) & set(np.asarray(list(b), dtype=object).tolist())
    if shared:
        raise RuntimeError(f"groups on both sides of a split: {sorted(shared)[:5]}")


@dataclass(frozen=True)
class GroupEpisodes:
    """Cross-group episodes and how they were drawn."""

    episodes: list[Episode]  # support and query cells of each episode, from disjoint groups
    sides: list[tuple[frozenset, frozenset]]  # (support groups, query groups) of each episode
    skipped: int  # episodes for which no split of the groups had enough classes on both sides
    classes: list[str]  # classes that took part in at least one episode


def sample_cross_group_episodes(labels: Sequence[str], groups: Sequence[str], ways: int, shots: int,
                                queries: int, episodes: int, seed: int = 0,
                                tries: int = 20) -> GroupEpisodes:
    """N-way K-shot episodes whose support and query cells come from different groups.

    For episode *e* (``default_rng([seed, e])``) the groups are shuffled and cut in two
    halves: support groups and query groups. Classes with at least ``shots`` cells on the
    support side and ``queries`` on the query side are eligible; ``ways`` of them are drawn,
    then ``shots`` support cells and ``queries`` query cells per class. When a cut leaves
    fewer than ``ways`` eligible classes, another cut is tried (up to ``tries``); failing
    that the episode is skipped and counted.
    """
    if ways < 2 or shots < 1 or queries < 1 or episodes < 1:
        raise InputError(f"need ways >= 2, shots >= 1, queries >= 1, episodes >= 1; got {ways}, {shots}, "
                         f"{queries}, {episodes}")
    labels = np.asarray(labels, dtype=object).astype(str)
    groups = np.asarray(groups, dtype=object).astype(str)
    names = np.array(sorted(set(groups.tolist())), dtype=object)
    if len(names) < 2:
        raise InputError(f"cross-group episodes need at least 2 groups; found {len(names)}")
    classes_all = sorted(set(labels.tolist()))
    out, sides, skipped, used = [], [], 0, set()
    for e in range(episodes):
        rng = np.random.default_rng([seed, e])
        made = None
        for _ in range(tries):
            perm = rng.permutation(names)
            cut = max(1, min(len(names) - 1, int(rng.integers(len(names) // 2, len(names) // 2 + 1))))
            sup_groups, qry_groups = set(perm[:cut].tolist()), set(perm[cut:].tolist())
            on_sup = np.isin(groups, list(sup_groups))
            eligible = [c for c in classes_all
                        if ((labels == c) & on_sup).sum() >= shots and ((labels == c) & ~on_sup).sum() >= queries]
            if len(eligible) < ways:
                continue
            chosen = sorted(rng.choice(eligible, size=ways, replace=False).tolist())
            sup, qry = [], []
            for c in chosen:
                s_idx = np.flatnonzero((labels == c) & on_sup)
                q_idx = np.flatnonzero((labels == c) & ~on_sup)
                sup.append(s_idx[rng.choice(len(s_idx), size=shots, replace=False)])
                qry.append(q_idx[rng.choice(len(q_idx), size=queries, replace=False)])
            made = Episode(tuple(chosen), np.concatenate(sup), np.concatenate(qry))
            break
        if made is None:
            skipped += 1
            continue
        assert_disjoint(groups[made.support], groups[made.query])
        out.append(made)
        sides.append((frozenset(sup_groups), frozenset(qry_groups)))
        used.update(made.classes)
    return GroupEpisodes(out, sides, skipped, sorted(used))
