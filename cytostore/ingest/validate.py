"""Up-front checks of an ingest: its config and its source's columns, before anything is written.

Whatever these refuse (InputError, exit 2) would otherwise fail half-way, after
the store was created or a table's schema was changed; each message says which
option or which file and column, and how to fix it.
"""

from __future__ import annotations

import math
import re
from typing import Any

from cytostore import limits
from cytostore.errors import InputError
from cytostore.ingest.config import ENGINES, IngestConfig
from cytostore.ingest.provenance import PRECISIONS
from cytostore.store import schema

_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def validate(source: Any, config: IngestConfig) -> None:
    """Refuses a config or a source that cannot be ingested, before the store is touched.

    Raises:
        InputError: an option out of range (named as on the command line) or a source
            whose columns cannot become columns of the cell table.
    """
    validate_config(config)
    validate_columns(source)


def _int_in(value: Any, lo: int, hi: int, option: str, why: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise InputError(f"{option} must be a whole number from {lo:,} to {hi:,}, got {value!r}{why}")


def _float_in(value: Any, lo: float, hi: float, option: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not lo <= value <= hi:
        raise InputError(f"{option} must be a number from {lo:g} to {hi:g}, got {value!r}")


def validate_config(config: IngestConfig) -> None:
    """Every numeric option within its documented bounds (``cytostore.limits``), every name known."""
    _int_in(config.crop.crop_size, limits.MIN_CROP_SIZE, limits.MAX_CROP_SIDE, "--crop-size",
            " (level-0 pixels; limits.MIN_CROP_SIZE / MAX_CROP_SIDE)")
    _float_in(config.crop.box_margin, 0.0, limits.MAX_BOX_MARGIN, "--box-margin")
    _int_in(config.batch_size, 1, limits.MAX_BATCH_SIZE, "--batch-size")
    _int_in(config.workers, 0, limits.MAX_WORKERS, "--workers")
    _int_in(config.commit_rows, 0, 2**40, "--commit-rows")
    _float_in(config.commit_seconds, 0.0, 1e9, "--commit-seconds")
    _float_in(config.gpus_per_worker, 0.0, 1024.0, "--gpus-per-worker")
    _int_in(config.ray_actors, 0, 1_000_000, "ray_actors")
    if config.precision not in PRECISIONS:
        raise InputError(f"unknown --precision {config.precision!r}; use one of {', '.join(PRECISIONS)}")
    if not isinstance(config.device, str) or not _DEVICE.match(config.device):
        raise InputError(f"unknown --device {config.device!r}; use auto, cpu, cuda or cuda:N")
    if config.engine not in ENGINES:
        raise InputError(f"unknown --engine {config.engine!r}; use one of {', '.join(ENGINES)}")
    if config.embedding_dtype not in schema.EMBEDDING_DTYPES:
        raise InputError(f"embedding dtype must be float16 or float32, got {config.embedding_dtype!r}")
    det = config.detector
    if det is not None:
        _float_in(det.min_diameter, 0.0, float(limits.MAX_CROP_SIDE), "--min-diameter")
        _float_in(det.max_diameter, 0.0, float(limits.MAX_CROP_SIDE), "--max-diameter")
        if det.min_diameter and det.max_diameter and det.min_diameter > det.max_diameter:
            raise InputError(f"--min-diameter {det.min_diameter:g} is above --max-diameter {det.max_diameter:g}; "
                             "swap them")


def validate_columns(source: Any) -> None:
    """The extra columns a source keeps can all be added to the cell table.

    A column with an empty, repeated or reserved name would change the table's
    schema and then fail the append (leaving a table no later append fits), so
    it is refused here, naming the file and the column's position.
    """
    extra = getattr(source, "extra_schema", None)
    if extra is None:
        return
    where = str(getattr(source, "path", None) or getattr(source, "root", "the source"))
    names = list(extra.names)
    if len(names) > limits.MAX_MANIFEST_COLUMNS:
        raise InputError(f"{where}: {len(names):,} extra columns; at most {limits.MAX_MANIFEST_COLUMNS:,} "
                         "(cytostore.limits.MAX_MANIFEST_COLUMNS): drop the columns you do not need")
    reserved = set(schema.column_names("cells"))
    seen: dict[str, str] = {}
    for k, name in enumerate(names):
        pos = _position(source, names, k)
        if not name.strip():
            raise InputError(f"{where}: column {pos} has an empty name; name it or delete it")
        if len(name) > limits.MAX_COLUMN_NAME_LENGTH:
            raise InputError(f"{where}: column {pos} has a name of {len(name)} characters; at most "
                             f"{limits.MAX_COLUMN_NAME_LENGTH} (cytostore.limits.MAX_COLUMN_NAME_LENGTH)")
        if any(ord(c) < 32 for c in name):
            raise InputError(f"{where}: column {pos} name {name!r} holds a control character; rename it")
        if name in reserved:
            raise InputError(f"{where}: column {pos} {name!r} is a column cytostore writes itself; rename it")
        if name in seen:
            raise InputError(f"{where}: columns {seen[name]} and {pos} are both named {name!r}; rename one")
        seen[name] = pos


def _position(source: Any, names: list[str], k: int) -> str:
    """1-based position of extra column ``k`` in the file when the source knows it, else among the extras."""
    full = getattr(getattr(source, "table", None), "schema", None)
    nth = names[:k].count(names[k])  # the nth column of that name (names may repeat)
    if full is not None:
        at = [i for i, n in enumerate(full.names) if n == names[k]]
        if nth < len(at):
            return f"#{at[nth] + 1}"
    return f"#{k + 1} (of the extra columns)"
