"""Cell keys: validated slide ids, derived cell ids and stable 64-bit uids."""

from __future__ import annotations

import hashlib
import re

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


def cell_uid(slide_id: str, cell_id: str) -> int:
    """Stable non-negative 63-bit id of a cell; the same for every encoder table."""
    digest = hashlib.blake2b(f"{slide_id}\x1f{cell_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


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
