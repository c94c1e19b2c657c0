"""Cell keys: validated slide ids, derived cell ids, stable 63-bit uids and the key sets
that tell stored cells, repeated keys and uid collisions apart."""

from __future__ import annotations

import hashlib
import math
import re
from typing import Callable, Iterable

import numpy as np

from cytostore.errors import InputError

MAX_ID_LENGTH = 200
_BAD_ID = re.compile(r"[/\\\x00-\x1f]")


def check_id(value: object, what: str = "slide_id") -> str:
    """Returns ``value`` as a safe id string, or raises InputError saying why not.

    Ids reach file names (index sidecars, montages), so path separators, ``..``,
    control characters and very long ids are refused.
    """
    if value is None:
        raise InputError(f"{what} is empty")
    if isinstance(value, float) and not math.isfinite(value):
        raise InputError(f"{what} is {value}, not an id")
    if isinstance(value, (bytes, bytearray)):
        raise InputError(f"{what} {bytes(value)[:40]!r} is bytes, not text")
    text = str(value).strip()
    if not text:
        raise InputError(f"{what} is empty")
    if len(text) > MAX_ID_LENGTH:
        raise InputError(f"{what} {text[:40]!r}... is {len(text)} characters; at most {MAX_ID_LENGTH}")
    if _BAD_ID.search(text) or text in {".", ".."} or ".." in text:
        raise InputError(f"{what} {text!r} holds a path separator, '..' or a control character")
    return text


def position_cell_id(x: float, y: float, image_stem: str | None = None) -> str:
    """Derives a deterministic cell id from the cell centre (and the image when a
    slide spans several images)."""
    pos = f"{int(round(x))}_{int(round(y))}"
    return f"{image_stem}:{pos}" if image_stem else pos


def box_cell_id(box: tuple[float, float, float, float], image_stem: str | None = None) -> str:
    """Derives a deterministic cell id from the cell's box (x0, y0, x1, y1)."""
    pos = "_".join(str(int(round(v))) for v in box)
    return f"{image_stem}:{pos}" if image_stem else pos


UID_BITS = 63  # uid width; tests shrink it to force collisions
_KEY_PERSON = b"cytostore.key"  # blake2b personalisation: makes the key hash independent of the uid


def _key_bytes(slide_id: str, cell_id: str) -> bytes:
    return f"{slide_id}\x1f{cell_id}".encode()


def cell_uid(slide_id: str, cell_id: str) -> int:
    """Stable non-negative 63-bit id of a cell; the same for every encoder table."""
    digest = hashlib.blake2b(_key_bytes(slide_id, cell_id), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << UID_BITS) - 1)


def cell_key_hash(slide_id: str, cell_id: str) -> int:
    """A second 64-bit hash of the key (signed int64), independent of the uid.

    Two keys with one uid almost surely differ here, which is how a uid
    collision is told apart from a cell that is already stored.
    """
    digest = hashlib.blake2b(_key_bytes(slide_id, cell_id), digest_size=8, person=_KEY_PERSON).digest()
    return int.from_bytes(digest, "little", signed=True)


def key_hashes(slide_ids: Iterable[str], cell_ids: Iterable[str]) -> np.ndarray:
    """``cell_key_hash`` of each (slide_id, cell_id) pair, as int64."""
    return np.fromiter((cell_key_hash(s, c) for s, c in zip(slide_ids, cell_ids)), dtype=np.int64)


class UidSet:
    """A sorted array of uids with fast membership tests (8 bytes per cell)."""

    def __init__(self, uids: np.ndarray | None = None):
        arr = np.asarray(uids if uids is not None else [], dtype=np.int64)
        self._sorted = np.unique(arr)

    def __len__(self) -> int:
        return int(self._sorted.size)

    def contains(self, uids: np.ndarray) -> np.ndarray:
        """Boolean mask: which of ``uids`` are in the set."""
        uids = np.asarray(uids, dtype=np.int64)
        if self._sorted.size == 0 or uids.size == 0:
            return np.zeros(uids.shape, dtype=bool)
        pos = np.searchsorted(self._sorted, uids)
        pos = np.minimum(pos, self._sorted.size - 1)
        return self._sorted[pos] == uids

    def classify(self, uids: np.ndarray, key_hashes: np.ndarray | None = None) -> np.ndarray:
        """Uid-only verdicts (``STORED`` or ``NEW``); a ``KeySet`` also tells keys apart."""
        return np.where(self.contains(uids), STORED, NEW).astype(np.int8)


# Verdicts of KeySet.classify, one per cell.
NEW = 0  # not stored, not seen in this run: to be embedded (and now claimed)
STORED = 1  # stored under the same key: skipped
DUPLICATE = 2  # the same key came earlier in this run: the first is kept
COLLISION = 3  # its uid is stored under another key
RUN_COLLISION = 4  # its uid was taken by another key earlier in this run


class KeySet:
    """The (uid, key hash) pairs of a table, plus the cells claimed by this run.

    16 bytes per cell. A uid found with the same key hash is stored; with
    another key hash it is a collision, never a silent skip. Cells claimed in
    this run live in sorted levels merged like a binary counter, so claiming
    n cells costs O(n log n) in all.
    """

    def __init__(self, uids: np.ndarray | None = None, key_hashes: np.ndarray | None = None,
                 resolve: Callable[[int], tuple[str, str] | None] | None = None):
        u = np.asarray(uids if uids is not None else [], dtype=np.int64)
        k = np.asarray(key_hashes if key_hashes is not None else [], dtype=np.int64)
        if u.shape != k.shape:
            raise ValueError(f"{u.size} uids but {k.size} key hashes")
        self._stored = _sorted_pairs(u, k)
        self._run: list[tuple[np.ndarray, np.ndarray]] = []
        self.resolve = resolve  # uid -> the stored (slide_id, cell_id), for messages; picklable

    def __len__(self) -> int:
        return int(self._stored[0].size + sum(u.size for u, _ in self._run))

    def contains(self, uids: np.ndarray) -> np.ndarray:
        """Boolean mask: which of ``uids`` are stored or claimed (whatever their key)."""
        uids = np.asarray(uids, dtype=np.int64)
        out = np.zeros(uids.shape, dtype=bool)
        for su, _ in [self._stored, *self._run]:
            if su.size:
                pos = np.minimum(np.searchsorted(su, uids), su.size - 1)
                out |= su[pos] == uids
        return out

    def classify(self, uids: np.ndarray, key_hashes: np.ndarray, claim: bool = True) -> np.ndarray:
        """Verdict per cell (``NEW``, ``STORED``, ``DUPLICATE``, ``COLLISION``, ``RUN_COLLISION``).

        Cells are judged in order, so within one call the first of two keys
        sharing a uid is ``NEW`` and the second a duplicate or collision. With
        ``claim`` the ``NEW`` cells join the run's set.
        """
        uids = np.asarray(uids, dtype=np.int64)
        keys = np.asarray(key_hashes, dtype=np.int64)
        # Judged in uid order (binary searches of sorted queries stay in cache), stable so
        # that of two cells with one uid the earlier comes first.
        order = np.argsort(uids, kind="stable")
        su, sk = uids[order], keys[order]
        verdict = np.full(su.shape, NEW, dtype=np.int8)
        _judge(self._stored, su, sk, verdict, STORED, COLLISION)
        for level in self._run:
            _judge(level, su, sk, verdict, DUPLICATE, RUN_COLLISION)
        # Repeats inside this call: each later occurrence of a uid is judged against its first.
        later = np.zeros(su.shape, dtype=bool)
        later[1:] = su[1:] == su[:-1]
        later &= verdict == NEW
        if later.any():
            starts = np.flatnonzero(~later)
            first = starts[np.searchsorted(starts, np.flatnonzero(later), "right") - 1]
            i = np.flatnonzero(later)
            verdict[i] = np.where(sk[i] == sk[first], DUPLICATE, RUN_COLLISION)
        out = np.empty_like(verdict)
        out[order] = verdict
        if claim:
            take = out == NEW
            if take.any():
                self._claim(uids[take], keys[take])
        return out

    def stored_key(self, uid: int) -> tuple[str, str] | None:
        """The (slide_id, cell_id) stored under ``uid``, when the set knows where to look."""
        return self.resolve(int(uid)) if self.resolve is not None else None

    def _claim(self, uids: np.ndarray, keys: np.ndarray) -> None:
        self._run.append(_sorted_pairs(uids, keys))
        while len(self._run) > 1 and self._run[-2][0].size <= 2 * self._run[-1][0].size:
            (u1, k1), (u2, k2) = self._run.pop(), self._run.pop()
            self._run.append(_sorted_pairs(np.concatenate([u2, u1]), np.concatenate([k2, k1]), merge=True))


def _sorted_pairs(uids: np.ndarray, keys: np.ndarray, merge: bool = False) -> tuple[np.ndarray, np.ndarray]:
    # Sorted by uid only: the keys of one uid are searched as a (tiny) range. Two sorted
    # runs concatenated are merged in linear time by the stable sort (timsort).
    order = np.argsort(uids, kind="stable" if merge else "quicksort")
    return uids[order], keys[order]


def _judge(level: tuple[np.ndarray, np.ndarray], uids: np.ndarray, keys: np.ndarray, out: np.ndarray,
           same: int, other: int) -> None:
    """Marks the still-NEW cells whose uid is in ``level``: ``same`` key or ``other`` key."""
    su, sk = level
    if su.size == 0 or uids.size == 0:
        return
    lo = np.searchsorted(su, uids, "left")
    pos = np.minimum(lo, su.size - 1)
    hit = (su[pos] == uids) & (out == NEW)
    nxt = np.minimum(lo + 1, su.size - 1)
    one = hit & ((lo + 1 >= su.size) | (su[nxt] != uids))
    out[one] = np.where(sk[lo[one]] == keys[one], same, other)
    for i in np.flatnonzero(hit & ~one):  # one uid under several stored keys: rare
        hi = np.searchsorted(su, uids[i], "right")
        out[i] = same if keys[i] in sk[lo[i]:hi] else other
