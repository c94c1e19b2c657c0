"""The mosaic map (as in slideflow): a grid over the UMAP plane, one cell thumbnail per tile.

Each occupied tile shows its representative: the cell nearest the tile centre in
UMAP space. Tiles with no cell stay blank, so the mosaic keeps the map's shape.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cytostore.errors import InputError
from cytostore.maps.data import MapData, fetch_thumbnails


def representatives(x: np.ndarray, y: np.ndarray, grid: int) -> dict[tuple[int, int], int]:
    """For each occupied tile (column, row from the top), the index of the point nearest its centre."""
    if grid < 1:
        raise InputError(f"--grid must be at least 1, got {grid}")
    x0, x1, y0, y1 = float(x.min()), float(x.max()), float(y.min()), float(y.max())
    span = max(x1 - x0, y1 - y0) or 1.0  # square tiles: the grid covers the larger side
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    left, bottom, step = cx - span / 2, cy - span / 2, span / grid
    col = np.clip(((x - left) / step).astype(int), 0, grid - 1)
    row = np.clip(((y - bottom) / step).astype(int), 0, grid - 1)
    d = (x - (left + (col + 0.5) * step)) ** 2 + (y - (bottom + (row + 0.5) * step)) ** 2
    tile = row * grid + col
    order = np.lexsort((d, tile))  # by tile, nearest first
    first = order[np.r_[True, tile[order][1:] != tile[order][:-1]]]
    return {(int(col[i]), int(grid - 1 - row[i])): int(i) for i in first}


def mosaic(data: MapData, out: str | Path, store=None, grid: int = 24, tile_px: int = 64,
           thumbnails: dict[int, bytes] | None = None, gap: int = 1, colors: int = 0) -> dict[str, Any]:
    """Draws the mosaic map of ``data`` as a PNG.

    Args:
        data: from ``load_map_data`` (its cells are the candidates).
        out: the .png file.
        store: where the thumbnails are read (unless ``thumbnails`` is given).
        grid: tiles per side.
        tile_px: side of a tile in pixels.
        thumbnails: uid -> JPEG bytes, when already at hand.
        gap: white pixels between tiles.
        colors: quantise the PNG to this many colours (0 = full colour) to keep it small.

    Returns:
        ``{"out", "grid", "tiles", "width", "height", "bytes"}``.
    """
    from PIL import Image

    from cytostore.imaging import decode_thumbnail

    out = Path(out)
    if out.suffix.lower() != ".png":
        raise InputError(f"{out}: a mosaic needs a .png file name")
    if tile_px < 4:
        raise InputError(f"tile size must be at least 4 pixels, got {tile_px}")
    reps = representatives(data.x, data.y, grid)
    uids = np.array([data.uid[i] for i in reps.values()], dtype=np.int64)
    if thumbnails is None:
        if store is None:
            raise InputError("mosaic needs the store (or the thumbnails) to draw the cells")
        thumbnails = fetch_thumbnails(store, uids, data.table)
    pitch = tile_px + gap
    side = grid * pitch + gap
    canvas = Image.new("RGB", (side, side), (255, 255, 255))
    for (c, r), i in reps.items():
        jpeg = thumbnails.get(int(data.uid[i]))
        if jpeg is None:
            continue
        im = Image.fromarray(decode_thumbnail(jpeg))
        if im.size != (tile_px, tile_px):
            im = im.resize((tile_px, tile_px), Image.BILINEAR)
        canvas.paste(im, (gap + c * pitch, gap + r * pitch))
    out.parent.mkdir(parents=True, exist_ok=True)
    if colors:
        canvas = canvas.quantize(colors=colors, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    canvas.save(out, format="PNG", optimize=True)
    return {"out": str(out), "grid": grid, "tiles": len(reps), "width": side, "height": side,
            "bytes": out.stat().st_size}
