"""Provenance of a cell table: identity (compared) vs description (reported).

The *identity* is what determines the numbers in the embedding column: weights
(their sha256, not the file name), architecture, numeric preprocessing, stored
dtype, compute device kind and precision, runtime, and for detected cells the
detector's version and parameters. It is stored in the table's metadata as
``identity`` (a canonical dict) and ``identity_sha256``, and every append must
match it exactly. Everything else in the record (encoder and file names, prose,
library versions) is a *description*: differences are reported, never refused.

A ``None`` in a stored identity means "not fixed yet": the first run fills it
in and later runs must match. That is how a detector's parameters are fixed by
the first run that detects cells (a manifest run has no detector and may join
any table), and how tables of layout 1 are upgraded: their record never said
which device or precision made them. Refusing every run on such a table would
strand it, and guessing would refuse an identical re-run on the other kind of
machine, so the first run after the upgrade records what it uses and from then
on nothing else may join. An identical re-run of the settings that made a
layout-1 table always matches: everything layout 1 recorded is compared.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from dataclasses import dataclass, field
from typing import Any

from cytostore.errors import ProvenanceError
from cytostore.store import schema

# Versions of the pixel rules in cytostore.imaging; bump when the code changes what they give.
CROP_RULE = 1  # square around the centre, side max(crop_size, box side x (1 + 2 box_margin)); whole image when no centre
OUTSIDE_IMAGE = "images:edge,slides:white"  # how pixels outside an image or slide are filled
# The prose layout-1 records hold for those rules (the same code as rule 1).
_LEGACY_PROSE = {
    "crop": ("square around the cell centre; side = crop_size, or the cell box plus margin when larger", CROP_RULE),
    "outside_image": ("edge pixels repeated (images); white (slides)", OUTSIDE_IMAGE),
}
# Least min cosine (vs PyTorch fp32, on the export's check batch) for rows of another runtime to join
# a table: the float16 storage of the embeddings alone moves a row's cosine by ~1e-7.
RUNTIME_MIN_COSINE = 0.9999
PREPROCESSING_KEYS = ("crop_size", "box_margin", "crop_rule", "outside_image", "input_size", "interpolation", "mean",
                      "std")
# Record keys that are the identity itself or the layout, not description.
_NOT_DESCRIPTION = ("identity", "identity_sha256", "schema", "schema_version", "upgrades", "runtime_joins",
                     "runtime_check")


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape the embeddings and the files."""
    out = {}
    for pkg in ("cytostore", "torch", "timm", "pylance", "pyarrow", "numpy", "pillow"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "absent"
    return out


def build_identity(encoder: dict[str, Any], preprocessing: dict[str, Any], embedding_dtype: str | None,
                   compute: dict[str, Any], detector: dict[str, Any] | None) -> dict[str, Any]:
    """The canonical identity dict.

    Args:
        encoder: ``arch``, ``dim`` and ``weights_sha256``.
        preprocessing: the ``PREPROCESSING_KEYS`` (crop geometry, resize, normalisation, rules).
        embedding_dtype: stored dtype, ``float16`` or ``float32``.
        compute: ``device`` (cpu/cuda), ``precision`` actually used (fp32/bf16/fp16), ``runtime``.
        detector: ``{"version": ..., "params": {...}}`` for detected cells, else None.
    """
    return {
        "encoder": {k: encoder.get(k) for k in ("arch", "dim", "weights_sha256")},
        "preprocessing": {k: preprocessing.get(k) for k in PREPROCESSING_KEYS},
        "embedding_dtype": embedding_dtype,
        "compute": {k: compute.get(k) for k in ("device", "precision", "runtime")},
        "detector": detector,
    }


def identity_sha256(identity: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of an identity (sorted keys, no spaces)."""
    text = json.dumps(identity, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def derive_identity(record: dict[str, Any]) -> dict[str, Any]:
    """The identity of a record that has none (layout 1): device, precision and detector unknown (None)."""
    enc, pre = record.get("encoder") or {}, record.get("preprocessing") or {}
    norm = pre.get("normalise") or {}
    rules = {}
    for key, (prose, rule) in _LEGACY_PROSE.items():
        rules[key] = rule if pre.get(key) == prose else pre.get(key)
    return build_identity(
        enc,
        {"crop_size": pre.get("crop_size"), "box_margin": pre.get("box_margin"), "crop_rule": rules["crop"],
         "outside_image": rules["outside_image"], "input_size": enc.get("input_size"),
         "interpolation": enc.get("interpolation"), "mean": enc.get("mean", norm.get("mean")),
         "std": enc.get("std", norm.get("std"))},
        record.get("embedding_dtype"),
        {"device": None, "precision": None, "runtime": "torch"},  # torch was the only runtime of layout 1
        None,
    )


def identity_of(record: dict[str, Any]) -> dict[str, Any]:
    """A record's identity: the stored one, or one derived from an older record."""
    return record["identity"] if isinstance(record.get("identity"), dict) else derive_identity(record)


@dataclass
class Compatibility:
    """What ``check_compatible`` found when rows may join a table."""

    notes: list[str] = field(default_factory=list)  # descriptive differences, only reported
    record: dict[str, Any] | None = None  # record to write into the table first (upgrade, newly fixed fields)


def check_compatible(table: str, stored: dict[str, Any], new: dict[str, Any]) -> Compatibility:
    """Raises ProvenanceError when rows made as ``new`` may not join table ``table``.

    Identities are compared field by field; a field the table has not fixed yet
    (None) takes the run's value, and the returned ``record`` says what to write.
    """
    if stored.get("schema", "cells") != new.get("schema", "cells"):
        raise ProvenanceError(f"table {table!r} is a {stored.get('schema')!r} table, not a cell table; "
                              "write these cells to another table with --table NAME")
    have, want = int(stored.get("schema_version", 1)), int(new.get("schema_version", schema.version("cells")))
    if have > want:
        raise ProvenanceError(f"table {table!r} has cells layout {have}, newer than this cytostore knows ({want}); "
                              "upgrade cytostore to append to it")
    diffs, merged = _compare(identity_of(stored), identity_of(new), "")
    join = None
    if diffs and all(d.startswith("compute.runtime:") for d in diffs):
        join = _runtime_join(table, stored, new)  # ProvenanceError unless the tolerance passes
        diffs = []
    if diffs:
        raise ProvenanceError(
            f"table {table!r} holds embeddings made another way; these identity fields differ:\n  "
            + "\n  ".join(diffs)
            + "\nRun with the table's settings (same weights, preprocessing, --device/--precision, --float32 or not, "
              "detector options), or write these cells to another table with --table NAME."
        )
    out = Compatibility(notes=[f"differs from the table's record (description only): {d}"
                               for d in _describe(stored, new)])
    joins = list(stored.get("runtime_joins") or [])
    new_join = join is not None and not any(j.get("runtime") == join["runtime"] and
                                            j.get("min_cosine") == join["min_cosine"] for j in joins)
    if join is not None:
        out.notes.append(f"rows of runtime {join['runtime']} join table {table!r} made with "
                         f"{join['table_runtime']}: min cosine vs PyTorch {join['min_cosine']:.7f} "
                         f">= {RUNTIME_MIN_COSINE} (recorded in the table's runtime_joins)")
    if have < want or stored.get("identity") != merged or new_join:
        record = dict(stored)
        if new_join:
            record["runtime_joins"] = [*joins, join]
        if have < want:
            record["upgrades"] = [*stored.get("upgrades", []), {"from_layout": have, "to_layout": want}]
            out.notes.append(f"table {table!r} upgraded from cells layout {have} to {want}")
        fixed = _newly_fixed(identity_of(stored), merged, "")
        if fixed:
            out.notes.append(f"table {table!r} now records {', '.join(fixed)} from this run")
        record.update(schema_version=want, identity=merged, identity_sha256=identity_sha256(merged))
        out.record = record
    return out


def _runtime_join(table: str, stored: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """The check that lets rows of the run's runtime join a table of another runtime, or ProvenanceError."""
    have = identity_of(stored)["compute"]["runtime"]
    want = identity_of(new)["compute"]["runtime"]
    checks = {have: stored.get("runtime_check"), want: new.get("runtime_check")}
    worst = None
    for runtime, check in checks.items():
        if runtime == "torch":
            continue
        if not isinstance(check, dict) or check.get("runtime") != runtime or "min_cosine" not in check:
            reason = f"no tolerance check of {runtime} against PyTorch is recorded"
        elif check["min_cosine"] < RUNTIME_MIN_COSINE:
            reason = (f"{runtime} agrees with PyTorch only to min cosine {check['min_cosine']:.7f} "
                      f"(median {check.get('median_cosine', float('nan')):.7f}) on its check batch, below "
                      f"the threshold {RUNTIME_MIN_COSINE}")
        else:
            worst = check if worst is None or check["min_cosine"] < worst["min_cosine"] else worst
            continue
        name = "onnx" if have.startswith("onnxruntime-") else have.split("-")[0]  # the --runtime value
        raise ProvenanceError(
            f"table {table!r} holds embeddings made with runtime {have}; this run uses {want}, and {reason}. "
            f"Run with --runtime {name} (the table's runtime), or write these cells to another table "
            "with --table NAME.")
    if worst is None:  # pragma: no cover - two runtime strings differ, so one is not torch
        raise ProvenanceError(f"table {table!r}: runtimes {have} and {want} cannot be compared")
    return {"runtime": want, "table_runtime": have, "min_cosine": worst["min_cosine"],
            "median_cosine": worst.get("median_cosine"), "n": worst.get("n"), "threshold": RUNTIME_MIN_COSINE,
            "passed": True}


def _compare(stored: Any, new: Any, path: str) -> tuple[list[str], Any]:
    """(differences, merged identity): None on the table's side takes the run's value; None on the
    run's side (e.g. no detector) accepts the table's."""
    if stored is None:
        return [], new
    if new is None:
        return [], stored
    if isinstance(stored, dict) and isinstance(new, dict):
        diffs, merged = [], {}
        for k in sorted(set(stored) | set(new)):
            d, merged[k] = _compare(stored.get(k), new.get(k), f"{path}.{k}" if path else k)
            diffs += d
        return diffs, merged
    return ([] if stored == new else [f"{path}: table has {stored!r}, this run has {new!r}"]), stored


def _newly_fixed(before: Any, after: Any, path: str) -> list[str]:
    if isinstance(before, dict) and isinstance(after, dict):
        return [p for k in sorted(after) for p in _newly_fixed(before.get(k), after[k], f"{path}.{k}" if path else k)]
    return [f"{path}={after!r}" if not isinstance(after, dict) else path] if before is None and after is not None else []


def _describe(stored: Any, new: Any, path: str = "") -> list[str]:
    """Differences outside the identity, where both sides say something."""
    if isinstance(stored, dict) and isinstance(new, dict):
        keys = [k for k in sorted(set(stored) & set(new)) if path or k not in _NOT_DESCRIPTION]
        return [d for k in keys for d in _describe(stored[k], new[k], f"{path}.{k}" if path else k)]
    if stored is None or new is None or stored == new:
        return []
    return [f"{path}: table has {stored!r}, this run has {new!r}"]
