"""The provenance record of an ingest run: what made its embeddings (encoder, weights, preprocessing)."""

from __future__ import annotations

from typing import Any

from cytostore.encoders.registry import Encoder
from cytostore.imaging import THUMBNAIL_SIZE, CropPolicy
from cytostore.store import schema
from cytostore.store.provenance import library_versions


def make_provenance(encoder: Encoder, policy: CropPolicy, embedding_dtype: str) -> dict[str, Any]:
    """The full provenance record of a cell table."""
    return {
        "schema": "cells",
        "schema_version": schema.version("cells"),
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
