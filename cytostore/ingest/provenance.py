"""The provenance record of an ingest run: the identity of its embeddings (hashed,
compared on every append) and their description (reported).

See ``cytostore.store.provenance`` for what is identity and what is description.
"""

from __future__ import annotations

from typing import Any

from cytostore.embed import PRECISIONS  # re-exported: the ingest's validation names them
from cytostore.encoders.registry import Encoder
from cytostore.errors import InputError
from cytostore.imaging import THUMBNAIL_SIZE, CropPolicy
from cytostore.store import schema
from cytostore.store.provenance import (CROP_RULE, OUTSIDE_IMAGE, build_identity, identity_sha256,
                                        library_versions)


def resolve_compute(device: str = "auto", precision: str = "auto", *, local: bool = True,
                    runtime: str = "torch") -> dict[str, str]:
    """The device kind, precision and runtime the encoder will run in, resolved as
    ``cytostore.embed.Embedder`` does.

    Args:
        device: ``auto``, ``cpu`` or ``cuda[:N]``.
        precision: ``auto`` (bf16, or fp16 on GPUs without bf16; fp32 on the CPU), ``fp32``, ``bf16``, ``fp16``.
        local: the encoder runs in this process (checks the GPU is there); False for Ray
            workers, whose GPUs the driver may not see.
        runtime: the resolved runtime (``torch``, ``onnx``, ``openvino``; see
            ``cytostore.encoders.runtime.resolve``); the identity holds its name and version family.
    """
    from cytostore.encoders.runtime import runtime_identity

    import torch

    if precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if local:
        from cytostore.embed import resolve_device

        device = resolve_device(device)
    elif device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    kind = "cuda" if device.startswith("cuda") else device
    if kind not in {"cpu", "cuda"}:
        raise InputError(f"unknown device {device!r}; use auto, cpu or cuda")
    if precision == "auto":
        if kind == "cpu":
            precision = "fp32"
        elif torch.cuda.is_available():
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            # A Ray driver without a GPU cannot ask its workers' GPUs; every GPU since Ampere has bf16.
            precision = "bf16"
    return {"device": kind, "precision": precision, "runtime": runtime_identity(runtime)}


def uses_detector(source) -> bool:
    """Whether ``source`` yields images whose cells the detector finds (fields and slides)."""
    from cytostore.sources.folders import FieldFolderSource

    return isinstance(source, FieldFolderSource)


def detector_identity(params) -> dict[str, Any]:
    """The detector part of an identity: its version and every parameter (defaults when None)."""
    from cytostore.detect import DETECTOR_VERSION, DetectorParams

    return {"version": DETECTOR_VERSION, "params": (params or DetectorParams()).to_dict()}


def make_provenance(encoder: Encoder, policy: CropPolicy, embedding_dtype: str, *,
                    compute: dict[str, str] | None = None, detector: dict[str, Any] | None = None,
                    runtime_check: dict[str, Any] | None = None) -> dict[str, Any]:
    """The full provenance record of a cell table.

    Args:
        encoder: the encoder (weights, architecture, preprocessing).
        policy: crop geometry.
        embedding_dtype: stored dtype.
        compute: ``resolve_compute(...)``; default: what ``auto`` resolves to here.
        detector: ``detector_identity(params)`` when the run detects cells, else None.
        runtime_check: the tolerance of a runtime other than PyTorch (``runtime.tolerance``),
            recorded so that rows of another runtime may join later (see ``store.provenance``).
    """
    compute = compute or resolve_compute()
    identity = build_identity(
        {"arch": encoder.arch, "dim": encoder.dim, "weights_sha256": encoder.weights_sha256},
        {"crop_size": policy.crop_size, "box_margin": policy.box_margin, "crop_rule": CROP_RULE,
         "outside_image": OUTSIDE_IMAGE, "input_size": encoder.input_size, "interpolation": encoder.interpolation,
         "mean": [float(v) for v in encoder.mean], "std": [float(v) for v in encoder.std]},
        embedding_dtype, compute, detector,
    )
    options = cell_options(encoder, identity)
    record = {
        "schema": "cells",
        "schema_version": schema.version("cells"),
        "identity": identity,
        "identity_sha256": identity_sha256(identity),
        # Description from here on: reported when it differs, never compared.
        "encoder": encoder.provenance(),
        "preprocessing": {
            "crop": "square around the cell centre; side = crop_size, or the cell box plus margin when larger",
            "crop_size": policy.crop_size,
            "box_margin": policy.box_margin,
            "outside_image": "edge pixels repeated (images); white (slides)",
            "resize": f"{encoder.input_size}x{encoder.input_size} {encoder.interpolation}",
            "normalise": {"mean": list(encoder.mean), "std": list(encoder.std)},
            "thumbnail": f"{THUMBNAIL_SIZE}x{THUMBNAIL_SIZE} JPEG",
        },
        "embedding_dtype": embedding_dtype,
        "versions": library_versions(),
    }
    if options:
        record["cell_options"] = options
    if runtime_check is not None:
        record["runtime_check"] = {k: v for k, v in runtime_check.items() if k not in ("threshold", "passed")}
    return record


def cell_options(encoder, identity: dict[str, Any]) -> dict[str, Any]:
    """Puts the cell options of ``encoder`` (``ingest.config.with_cell_options``) into ``identity``; returns
    their description (empty for the defaults).

    --features/--tta are in ``encoder.arch`` (``...+multilayer+tta4``) and ``dim``. --stain changes the
    crop pixels: ``preprocessing.crop_rule`` names the method and the reference's hash (so rows with and
    without it, or with another reference, never share a table) and ``stain`` holds the reference's
    numbers. --morphometrics adds ``morphometrics`` (its version); it changes no embedding.
    """
    extra = getattr(encoder, "extra", None) or {}
    opts, out = extra.get("cell_options") or {}, {}
    if extra.get("features"):
        out["features"] = extra["features"]
    if opts.get("stain"):
        from cytostore import stain

        ref = opts["stain"]
        identity["preprocessing"]["crop_rule"] = f"{CROP_RULE}+stain:{ref['method']}:{stain.short_hash(ref)}"
        identity["stain"] = stain.identity(ref)
        out["stain"] = ref
    if opts.get("morphometrics"):
        from cytostore import morphometrics

        identity["morphometrics"] = morphometrics.VERSION
        out["morphometrics"] = {"version": morphometrics.VERSION, "columns": list(morphometrics.COLUMNS)}
    return out


def choose_runtime(config, encoder, device: str, stored: dict[str, Any] | None):
    """The runtime an ingest uses, and the tolerance check its record keeps.

    ``auto`` resolves as ``cytostore.encoders.runtime.resolve`` (the table's own runtime
    when the table exists). A runtime other than PyTorch is checked against PyTorch
    (export, then tolerance, both cached) when it makes a new table or joins a table
    of another runtime; an ``auto`` choice that fails its check (or does not export)
    falls back to torch.

    Returns:
        (config with ``runtime`` resolved, the check or None, notes for the report).
    """
    import dataclasses

    from cytostore.embed import check_precision
    from cytostore.encoders import runtime as rt
    from cytostore.errors import EncoderError
    from cytostore.store.provenance import identity_of

    table_runtime = identity_of(stored)["compute"]["runtime"] if stored else None
    # The device is resolved already (Ray: what its actors get, which this driver may not see).
    name = rt.resolve(config.runtime, device.startswith("cuda"), check_precision(config.precision), table_runtime)
    check, notes = None, []
    if name != "torch" and rt.runtime_identity(name) != table_runtime:
        try:
            check = rt.tolerance(name, rt.ensure_export(encoder, config.batch_size), encoder, config.threads)
        except EncoderError as e:
            if config.runtime != "auto":
                raise
            notes.append(f"runtime {name} not used ({e}); PyTorch runs the encoder")
            name = "torch"
        if check is not None and not check["passed"] and config.runtime == "auto":
            notes.append(f"runtime {name} not used: min cosine vs PyTorch {check['min_cosine']:.7f} is below "
                         f"{check['threshold']}; PyTorch runs the encoder")
            name, check = "torch", None
    return dataclasses.replace(config, runtime=name), check, notes
