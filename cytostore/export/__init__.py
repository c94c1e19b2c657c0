"""Round trips out of the store, into the tools cytology users already work in.

- ``geojson``: QuPath detections, one ``<slide_id>.geojson`` per slide (labels,
  predictions, MIL attention);
- ``anndata``: one ``.h5ad`` file for scanpy (obs = cells, obsm = embeddings, UMAP);
- ``h5``: one ``<slide_id>.h5`` per slide in the CLAM/TRIDENT layout (features, coords);
- ``duckdb``: the store's tables as DuckDB views (float16 embeddings widened or left out);
- ``browse``: the slide list and one slide's cells, for the command line.

Optional packages (anndata, h5py, duckdb) load only when their exporter runs; a
missing one is named with ``pip install 'cytostore[export]'``.
"""

from cytostore.export.anndata import export_anndata
from cytostore.export.browse import list_slides, slide_cells
from cytostore.export.geojson import export_geojson
from cytostore.export.h5 import export_h5

__all__ = ["export_anndata", "export_geojson", "export_h5", "list_slides", "slide_cells"]
