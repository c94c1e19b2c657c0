"""The similar-cell index of a cell table, managed beside the table in the store.

``faiss`` holds the pure FAISS work (make, fill, tune, add, remove, search, GPU);
``files`` the files and what ties them to one table; ``bound`` the binding to the
table's current version (delta since the build, the load cache); ``build`` the
build, in-place update and verification.
"""

from cytostore.index.bound import BoundIndex, clear_cache, load_index, stats
from cytostore.index.build import build_index, read_sidecar, update_index, verify_index
from cytostore.index.faiss import (KINDS, IndexParams, RunningTopK, add_vectors, faiss_module, fill_index,
                                   gpu_available, new_index, prepare, raw_search, remove_ids, resolve_kind, to_gpu,
                                   uid_digest)
from cytostore.index.files import (INDEX_FILE, SIDECAR, TABLE_ID_KEY, UIDS_FILE, as_store, index_dir, rebuild_command,
                                   schema_provenance, update_command)

__all__ = ["INDEX_FILE", "KINDS", "SIDECAR", "TABLE_ID_KEY", "UIDS_FILE", "BoundIndex", "IndexParams", "RunningTopK",
           "add_vectors", "as_store", "build_index", "clear_cache", "faiss_module", "fill_index", "gpu_available",
           "index_dir", "load_index", "new_index", "prepare", "raw_search", "read_sidecar", "rebuild_command",
           "remove_ids", "resolve_kind", "schema_provenance", "stats", "to_gpu", "uid_digest", "update_command",
           "update_index", "verify_index"]
