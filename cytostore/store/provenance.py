"""Provenance: how a table's embeddings were made, written into its metadata."""

from __future__ import annotations

import importlib.metadata
from typing import Any

from cytostore.store import schema
from cytostore.errors import ProvenanceError

# Parts that must match for rows to share a table; library versions are recorded
# but only reported, since a patch release of a dependency should not split a store.
_MUST_MATCH = ("schema", "schema_version", "encoder", "preprocessing", "embedding_dtype")


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape the embeddings and the files."""
    out = {}
    for pkg in ("cytostore", "torch", "timm", "pylance", "pyarrow", "numpy", "pillow"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "absent"
    return out


def _diff(a: Any, b: Any, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{path}.{k}" if path else k)
        return out
    return [] if a == b else [f"{path}: table has {a!r}, this run has {b!r}"]


def check_compatible(table: str, stored: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Raises ProvenanceError when rows made as ``new`` may not join table ``table``.

    Returns the differences that are only reported (library versions).
    """
    diffs = []
    for key in _MUST_MATCH:
        diffs += _diff(stored.get(key), new.get(key), key)
    if diffs:
        raise ProvenanceError(
            f"table {table!r} holds embeddings made another way:\n  " + "\n  ".join(diffs)
            + "\nUse the same encoder, weights and preprocessing, or write to another store or encoder table."
        )
    return _diff(stored.get("versions"), new.get("versions"), "versions")
