"""cytostore: a cell-level feature store and embedding-retrieval system for cytology.

Nothing heavy happens at import: torch, timm, Lance and FAISS load when first used.
"""

from cytostore.encoders import Encoder, create_encoder, list_encoders, register_encoder
from cytostore.errors import (
    CytostoreError,
    EncoderError,
    InputError,
    ProvenanceError,
    StoreError,
    StoreLockedError,
)
from cytostore.imaging import CropPolicy
from cytostore.ingest import IngestConfig, IngestReport, ingest
from cytostore.sources import SourceOptions, open_source
from cytostore.store import CellStore

__version__ = "0.1.0"

__all__ = [
    "CellStore",
    "CropPolicy",
    "CytostoreError",
    "Encoder",
    "EncoderError",
    "IngestConfig",
    "IngestReport",
    "InputError",
    "ProvenanceError",
    "SourceOptions",
    "StoreError",
    "StoreLockedError",
    "__version__",
    "create_encoder",
    "ingest",
    "list_encoders",
    "open_source",
    "register_encoder",
]
