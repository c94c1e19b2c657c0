"""The store: the only owner of the files under a store folder and of every write to them.

``layout`` declares each table kind (path, schema, lifecycle); ``cells`` reads cell
tables; ``schema``, ``provenance`` and ``lock`` are the pieces they share. This
package imports no higher layer (sources, encoders, ingest, index, search).
"""

from cytostore.store.cells import (CELLS_PREFIX, DEFAULT_TABLE, FAILURES, MARKER, CellStore, conform,
                                   embedding_matrix, table_name_for)

__all__ = ["CELLS_PREFIX", "DEFAULT_TABLE", "FAILURES", "MARKER", "CellStore", "conform", "embedding_matrix",
           "table_name_for"]
