"""One call per command: a map file (PNG or HTML) or a mosaic from a store."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from cytostore.errors import InputError
from cytostore.maps.coords import UmapParams, as_store
from cytostore.maps.data import load_map_data
from cytostore.maps.html import DEFAULT_MAX_POINTS, render_html
from cytostore.maps.render import render_png
from cytostore.maps.tiles import mosaic


def make_map(store, out: str | Path, color_by: str = "label", where: str | None = None, sample: int | None = None,
             encoder: str | None = None, seed: int = 0, params: UmapParams | None = None, force: bool = False,
             progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Draws the UMAP map of a store into ``out`` (.png or .html).

    An HTML map draws at most ``DEFAULT_MAX_POINTS`` cells unless ``sample`` says
    otherwise (each point carries its thumbnail).

    Returns:
        What was drawn: file, points, cells matching, colouring, and the UMAP metadata.
    """
    out = Path(out)
    kind = out.suffix.lower()
    if kind not in {".png", ".html", ".htm"}:
        raise InputError(f"--out {out}: the map file must end in .png or .html")
    s = as_store(store)
    if kind != ".png" and sample is None:
        sample = DEFAULT_MAX_POINTS
    data = load_map_data(s, color_by=color_by, where=where, sample=sample, encoder=encoder, seed=seed,
                         params=params, force=force, progress=progress)
    result = render_png(data, out) if kind == ".png" else render_html(data, out, store=s)
    return {**result, "table": data.table, "cells_matching": data.total_cells, "color_by": color_by,
            "categories": len(data.categories) if not data.color.numeric else None, "umap": data.umap_meta}


def make_mosaic(store, out: str | Path, grid: int = 24, where: str | None = None, encoder: str | None = None,
                seed: int = 0, tile_px: int = 64, colors: int = 0, params: UmapParams | None = None,
                force: bool = False, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Draws the mosaic map of a store (cells matching ``where``) into a PNG."""
    s = as_store(store)
    data = load_map_data(s, where=where, encoder=encoder, seed=seed, params=params, force=force, progress=progress)
    result = mosaic(data, out, store=s, grid=grid, tile_px=tile_px, colors=colors)
    return {**result, "table": data.table, "cells_matching": data.total_cells, "umap": data.umap_meta}
