"""Pinned versions: a Lance tag on each table version that a derived artefact (an index,
a prototype set, a prediction set) was made from, so that version cleanup keeps it.

Tag names say who holds the pin, e.g. ``index`` or ``predictions.normal-vs-rest``;
re-pinning under the same name moves the tag to the new version.
"""

from __future__ import annotations

from typing import Any

from cytostore.errors import StoreError

_PREFIX = "pin."


def _tag(holder: str) -> str:
    tag = _PREFIX + "".join(c if c.isalnum() or c in "-_." else "_" for c in holder)
    if len(tag) > 200:
        raise StoreError(f"pin holder name too long: {holder[:40]!r}...")
    return tag


def pin(uri: str, holder: str, version: int) -> None:
    """Pins ``version`` of the Lance table at ``uri`` for ``holder`` (moves an older pin of the same holder)."""
    import lance

    ds = lance.dataset(uri)
    tag = _tag(holder)
    if tag in ds.tags.list():
        ds.tags.update(tag, int(version))
    else:
        ds.tags.create(tag, int(version))


def unpin(uri: str, holder: str) -> None:
    """Drops ``holder``'s pin on the table at ``uri`` (nothing happens when there is none)."""
    import lance

    ds = lance.dataset(uri)
    tag = _tag(holder)
    if tag in ds.tags.list():
        ds.tags.delete(tag)


def pins(uri: str) -> dict[str, int]:
    """Every pin on the table at ``uri``: holder -> version."""
    import lance

    out: dict[str, Any] = {}
    for tag, info in lance.dataset(uri).tags.list().items():
        if tag.startswith(_PREFIX):
            out[tag[len(_PREFIX):]] = int(info["version"] if isinstance(info, dict) else info.version)
    return out
