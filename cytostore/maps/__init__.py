"""Maps of the embedding space: UMAP coordinates (stored and reused), PNG and HTML maps, mosaics.

    coords.py   fit UMAP on a sample, project the rest, store ``umap.<table>.lance``
    data.py     the cells a map draws and their colours (``--color-by``)
    render.py   PNG through matplotlib (Agg)
    html.py     one self-contained interactive HTML file (canvas, inline thumbnails)
    tiles.py    the mosaic map: one representative thumbnail per grid tile
    build.py    one call per command (``make_map``, ``make_mosaic``)
    overlay.py  a slide's stored detections drawn on its image (label, prediction, attention)
    captions.py text wrapped to a pixel width, for montage captions and legends

matplotlib and umap-learn come with ``pip install 'cytostore[viz]'``; they load on first use.
"""

from cytostore.maps.build import make_map, make_mosaic
from cytostore.maps.coords import UmapParams, compute_umap, load_umap, umap_uri
from cytostore.maps.data import ColorSpec, MapData, load_map_data, resolve_color
from cytostore.maps.html import render_html
from cytostore.maps.render import render_png
from cytostore.maps.tiles import mosaic

__all__ = [
    "ColorSpec",
    "MapData",
    "UmapParams",
    "compute_umap",
    "load_map_data",
    "load_umap",
    "make_map",
    "make_mosaic",
    "mosaic",
    "render_html",
    "render_png",
    "resolve_color",
    "umap_uri",
]
