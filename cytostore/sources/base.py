"""What every source yields: image tasks (one image or slide and its cells) and
failures (rows or files that cannot be used)."""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Protocol, Union

from cytostore import limits
from cytostore.errors import InputError
from cytostore.keys import cell_uid, check_id

CONTINUED = " (continued)"  # ends the source_ref of later tasks of one image, so an image counts once


def finite_number(value: Any, what: str = "") -> float:
    """``value`` as a finite float (a coordinate, a size); InputError saying what it is otherwise.

    Booleans, NaN and infinities are not numbers here.
    """
    label = f"{what} " if what else ""
    if isinstance(value, bool):
        raise InputError(f"{label}{str(value)[:40]!r} is not a number")
    try:
        out = float(value)
    except (TypeError, ValueError, OverflowError):
        raise InputError(f"{label}{str(value)[:40]!r} is not a number") from None
    if not math.isfinite(out):
        raise InputError(f"{label}{value!r} is not a finite number")
    return out


@dataclass(frozen=True)
class SourceOptions:
    """Options shared by the sources."""

    slide_id: str | None = None  # fixed slide id (folder of crops)
    labels_from_folders: bool = False  # parent folder name is the label (crops) or slide label (fields)
    detector: Any = None  # DetectorParams for fields and slides without coordinates
    encoding: str = "utf8"  # text encoding of a CSV manifest (e.g. latin1); cells that are not text are failures


@dataclass
class CellRecord:
    """One cell to crop and embed."""

    slide_id: str
    cell_id: str
    x: float | None  # centre; None when the whole image is the crop
    y: float | None
    box: tuple[float, float, float, float] | None = None  # x0, y0, x1, y1
    label: str | None = None
    source_ref: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    _uid: int | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def uid(self) -> int:
        """Stable 63-bit id of the cell (computed once; the key is not changed after)."""
        if self._uid is None:
            self._uid = cell_uid(self.slide_id, self.cell_id)
        return self._uid


@dataclass
class ImageTask:
    """One image or slide file and the cells to take from it.

    ``cells`` is None when the cells must first be found by the detector.
    """

    image: str
    slide_id: str
    cells: list[CellRecord] | None
    slide_label: str | None = None
    source_ref: str = ""
    id_prefix: str | None = None  # prefix for position-derived cell ids (several images per slide)


@dataclass
class SourceFailure:
    """An input that could not be used, and why."""

    where: str
    reason: str
    stage: str = "source"
    slide_id: str | None = None
    cell_id: str | None = None
    uid: int | None = None


SourceItem = Union[ImageTask, SourceFailure]


class Source(Protocol):
    """An iterable of image tasks and failures, picklable so workers can re-open it.

    A source may also offer ``shard(index, count)``: the part that worker ``index``
    of ``count`` plans (every item in exactly one part), or None when it cannot be
    split usefully; and ``prepare()``, a one-off pass run before it is split.
    """

    extra_schema: Any  # pyarrow schema of the extra columns kept, or None

    def __iter__(self) -> Iterator[SourceItem]: ...


def absolute(path: str | Path) -> Path:
    """``path`` made absolute against the working directory and normalised (links kept),
    so stored image paths are right from any directory and on other machines' workers."""
    return Path(os.path.normpath(os.path.abspath(path)))


def shard_of(source: Any, index: int, count: int) -> Any:
    """A copy of a file-listing ``source`` that yields only files index, index+count, ..."""
    part = copy.copy(source)
    part.shard_index, part.shard_count = index, count
    return part


def safe_slide_id(value: object, where: str) -> str:
    """check_id with the place named in the message."""
    try:
        return check_id(value, "slide_id")
    except InputError as e:
        raise InputError(f"{where}: {e}; fix the id in the source") from e


def image_files(root: Path, suffixes: set[str]) -> list[Path]:
    """Regular files under ``root`` with one of ``suffixes``, sorted, hidden files left out."""
    return sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and p.suffix.lower() in suffixes and not any(s.startswith(".") for s in p.relative_to(root).parts)
    )


def unreadable_entries(root: Path, suffixes: set[str]) -> list[SourceFailure]:
    """A failure for each entry under ``root`` named like an image that is not a regular file
    (a FIFO, a device, a socket, a broken link): never opened, since reading one can block forever."""
    out = []
    for p in sorted(root.rglob("*")):
        if p.suffix.lower() not in suffixes or any(s.startswith(".") for s in p.relative_to(root).parts):
            continue
        if p.is_file() or p.is_dir():
            continue  # a folder named like an image is walked into, not read
        try:
            limits.regular_file(p, "image")
            continue
        except InputError as e:
            reason = str(e) if p.exists() else f"{p}: is a link to nothing"
        out.append(SourceFailure(str(p), f"{reason}; replace it with the image file", stage="read"))
    return out
