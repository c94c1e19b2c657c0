"""Every file under a store, declared once: each kind's path, schema and lifecycle.

Other modules never build a path under a store themselves; they ask this module
(``layout.uri(store.root, "predictions", name)``). README's "The store" is this
table in prose, and a test checks that the two agree.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from cytostore.errors import StoreError

MARKER = "cytostore.json"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


@dataclass(frozen=True)
class TableKind:
    """One kind of file or table a store holds."""

    kind: str  # short name other modules ask for
    pattern: str  # path under the store root; "{name}" is the table/set name
    schema: str | None  # layout in schemas/ (None: not a Lance table)
    lifecycle: str  # who writes it, when it changes, what cleanup may remove
    lance: bool = True  # a Lance dataset (versions, tags, cleanup) or plain files


KINDS: dict[str, TableKind] = {k.kind: k for k in (
    TableKind("marker", MARKER, None,
              "written once when the store is created; never changed", lance=False),
    TableKind("cells", "cells.{name}.lance", "cells",
              "one per encoder; appended by ingest through the store writer, rows removed by "
              "`cytostore store delete`; old versions removed by `store gc` except pinned ones"),
    TableKind("failures", "failures.lance", "failures",
              "what could not be ingested; appended at each commit, rows dropped once a later run ingests them"),
    TableKind("prototypes", "prototypes.{name}.lance", "prototypes",
              "one per few-shot prototype set; each `fewshot fit` writes a new version, pinned while predictions "
              "made from it exist"),
    TableKind("predictions", "predictions.{name}.lance", "predictions",
              "labels of every cell from prototype set {name}; each `fewshot predict` writes a new version "
              "(bound to the cell and prototype versions it read)"),
    TableKind("umap", "umap.{name}.lance", "umap",
              "2-D coordinates of cell table {name}; rewritten when that table or the parameters change"),
    TableKind("index", "indexes/{name}", None,
              "the FAISS index of cell table {name} (index.faiss, uids.npy, sidecar.json); the table version "
              "it was built from is pinned until the next build", lance=False),
    TableKind("lock", ".locks/{name}.lock", None,
              "advisory writer locks; they die with their process", lance=False),
    TableKind("checksums", "checksums.{name}.jsonl", None,
              "size and sha256 of each data file of cell table {name}, one JSON line per file, appended by the "
              "store writer after each commit and compaction; read by `cytostore store check`", lance=False),
    TableKind("encoder", "encoders/{name}", None, "a copy of trained encoder {name} (model.safetensors, config.json); written once by `encoders train`", lance=False),
    TableKind("evaluation", "evaluations/{name}.json", None, "the latest `cytostore evaluate` figures of cell table {name}; rewritten by each evaluate", lance=False),
)}


def kind(name: str) -> TableKind:
    """The declaration of table kind ``name``."""
    try:
        return KINDS[name]
    except KeyError:
        raise StoreError(f"no table kind {name!r}; known kinds: {sorted(KINDS)}") from None


def check_name(name: str, what: str = "name") -> str:
    """Returns ``name`` when it can be part of a path under a store."""
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name:
        raise StoreError(f"{what} {name!r} is not valid: use 1-100 letters, digits, '_', '-' or '.', "
                         "starting with a letter or digit")
    return name


def relpath(kind_name: str, name: str | None = None) -> str:
    """Path of a table or file of ``kind_name`` relative to the store root."""
    k = kind(kind_name)
    if "{name}" in k.pattern:
        if name is None:
            raise StoreError(f"table kind {kind_name!r} needs a name")
        return k.pattern.format(name=check_name(name))
    return k.pattern


def uri(root: str, kind_name: str, name: str | None = None) -> str:
    """Where a table or file of ``kind_name`` lives under store ``root``."""
    return f"{str(root).rstrip('/')}/{relpath(kind_name, name)}"


def is_uri(path: str) -> bool:
    """Whether ``path`` is an object-store URI (s3://, gs://, ...) rather than a local folder."""
    return "://" in str(path)


def exists(root: str, kind_name: str, name: str | None = None) -> bool:
    """Whether a committed table (or the file) of that kind exists locally.

    A Lance folder without ``_versions`` holds only uncommitted fragments (a killed
    first distributed write): not a table yet.
    """
    path = Path(uri(root, kind_name, name))
    if kind(kind_name).lance:
        return (path / "_versions").is_dir()
    return path.exists()


def names(root: str, kind_name: str) -> list[str]:
    """Names of the committed tables of ``kind_name`` under a local store ``root``."""
    k = kind(kind_name)
    if "{name}" not in k.pattern:
        return []
    prefix, suffix = k.pattern.split("{name}")
    base = Path(root)
    if "/" in prefix:
        base = base / prefix.rsplit("/", 1)[0]
        prefix = prefix.rsplit("/", 1)[1]
    if not base.is_dir():
        return []
    out = []
    for p in base.iterdir():
        if p.name.startswith(prefix) and p.name.endswith(suffix) and len(p.name) > len(prefix) + len(suffix):
            n = p.name[len(prefix): len(p.name) - len(suffix)] if suffix else p.name[len(prefix):]
            if not k.lance or (p / "_versions").is_dir():
                out.append(n)
    return sorted(out)
