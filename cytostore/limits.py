"""Default limits on inputs, in one place, each checked before anything is allocated.

An input beyond a limit is never half-read: a cell, row, object or image beyond
one becomes a recorded failure (the rest of the run goes on); an argument or a
whole file beyond one is refused up front (exit 2) with the limit's name, so a
user who really needs more can raise it (``cytostore.limits.MAX_CROP_SIDE = ...``)
before calling the library.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np

from cytostore.errors import InputError

# Crops ----------------------------------------------------------------------------
MIN_CROP_SIZE = 8  # smallest --crop-size (level-0 pixels); below it every crop is a smear of a few pixels
MAX_CROP_SIDE = 4096  # largest crop side (a box with its margin, a whole-image crop, --crop-size): 48 MiB RGB
MAX_BOX_MARGIN = 4.0  # largest --box-margin (a fraction of the box side on each side)

# Images ---------------------------------------------------------------------------
# PIL's own decompression-bomb threshold (it warns above Image.MAX_IMAGE_PIXELS and
# refuses above twice that): checked from the header, before any pixel is decoded.
MAX_IMAGE_PIXELS = 2 * 89_478_485  # largest plain image (field or crop), in pixels: ~512 MiB decoded RGB
MAX_IMAGE_SIDE = 65_535  # largest width or height of a plain image (JPEG's own bound)

# Tables and annotation files -----------------------------------------------------
MAX_MANIFEST_COLUMNS = 1000  # columns of a manifest (each extra column becomes a column of the cell table)
MAX_COLUMN_NAME_LENGTH = 200  # characters of a manifest column name
MAX_ANNOTATION_BYTES = 2 << 30  # largest VOC XML or GeoJSON file read whole (2 GiB)
MAX_NPY_VALUES = 50_000_000  # values in a .npy file read whole (a query vector, a vector list): 200 MB of float32

# Ingest arguments ----------------------------------------------------------------
MAX_BATCH_SIZE = 16_384  # cells per forward pass
MAX_WORKERS = 256  # crop worker processes


def regular_file(path: str | Path, what: str = "file") -> Path:
    """``path`` when it is a regular file (links followed); else InputError saying what it is.

    Opening a FIFO or a device blocks or never ends, so nothing else is ever opened.
    """
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError as e:
        raise InputError(f"{path}: {what} not found") from e
    except OSError as e:
        raise InputError(f"{path}: cannot read it ({e.strerror or e})") from e
    if not stat.S_ISREG(mode):
        kind = ("a folder" if stat.S_ISDIR(mode) else "a FIFO (named pipe)" if stat.S_ISFIFO(mode)
                else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode)
                else "not a regular file")
        raise InputError(f"{path}: is {kind}, not a regular {what}; only regular files are read")
    return path


def check_file_size(path: str | Path, limit: int, what: str, name: str) -> int:
    """Size of the regular file ``path`` in bytes; InputError when it is over ``limit`` (named ``name``)."""
    size = os.stat(regular_file(path, what)).st_size
    if size > limit:
        raise InputError(f"{path}: {what} is {size:,} bytes; the largest read is {limit:,} "
                         f"(cytostore.limits.{name}); split it")
    return size


def check_crop_side(side: float, what: str = "crop") -> int:
    """``side`` as an int when it is a finite side within [1, MAX_CROP_SIDE]; else InputError."""
    if not np.isfinite(side):
        raise InputError(f"{what} side is {side}; coordinates must be finite numbers")
    if side > MAX_CROP_SIDE:
        raise InputError(f"{what} side would be {side:,.0f} px; the largest is {MAX_CROP_SIDE} px "
                         "(cytostore.limits.MAX_CROP_SIDE); check the coordinates or the box")
    if side < 1:
        raise InputError(f"{what} side would be {side} px; it must be at least 1")
    return int(side)


def check_image_size(width: int, height: int, where: str) -> None:
    """InputError when a plain image of ``width`` x ``height`` is over the pixel or side limits."""
    if width < 1 or height < 1:
        raise InputError(f"{where}: image is {width}x{height} pixels (empty)")
    if max(width, height) > MAX_IMAGE_SIDE:
        raise InputError(f"{where}: image is {width}x{height} pixels; the largest side read is {MAX_IMAGE_SIDE} "
                         "(cytostore.limits.MAX_IMAGE_SIDE); cut it into fields or read it as a slide")
    if width * height > MAX_IMAGE_PIXELS:
        raise InputError(f"{where}: image is {width}x{height} = {width * height:,} pixels; the largest read is "
                         f"{MAX_IMAGE_PIXELS:,} (cytostore.limits.MAX_IMAGE_PIXELS); cut it into fields or "
                         "read it as a slide")


def load_npy(path: str | Path, max_values: int | None = None) -> np.ndarray:
    """Reads a .npy array (no pickles) after checking from its header that it is not too big.

    Raises:
        InputError: not a regular file, not a .npy, a pickle, or more than ``max_values``
            values (default ``MAX_NPY_VALUES``) or more bytes than the file holds.
    """
    limit = MAX_NPY_VALUES if max_values is None else max_values
    path = regular_file(path, ".npy file")
    try:
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            shape, _, dtype = (np.lib.format.read_array_header_1_0(fh) if version == (1, 0)
                               else np.lib.format.read_array_header_2_0(fh))
            header_end = fh.tell()
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: not a readable .npy array ({e}); save one with numpy.save") from e
    if dtype.hasobject:
        raise InputError(f"{path}: holds Python objects (a pickle); save a numeric array with numpy.save")
    values = int(np.prod(shape, dtype=object)) if shape else 1
    if values > limit:
        raise InputError(f"{path}: header says shape {shape} ({values:,} values); the largest read is {limit:,} "
                         "(cytostore.limits.MAX_NPY_VALUES)")
    if header_end + values * dtype.itemsize > os.stat(path).st_size:
        raise InputError(f"{path}: header says shape {shape} but the file is shorter; it is truncated, save it again")
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: not a readable .npy array ({e}); save one with numpy.save") from e
