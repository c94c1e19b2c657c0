"""Contact sheets of a search: the query and its neighbours from the stored thumbnails."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cytostore.errors import InputError

if TYPE_CHECKING:
    from cytostore.search import SearchResult

# -- montage ------------------------------------------------------------------------
MONTAGE_PAD, MONTAGE_LINE, MONTAGE_LINES = 4, 11, 4


def montage_size(n_tiles: int, tile: int = 96, columns: int = 6) -> tuple[int, int]:
    """(width, height) in pixels of a contact sheet of ``n_tiles`` tiles."""
    cols = max(1, min(columns, n_tiles))
    rows = math.ceil(n_tiles / cols)
    return cols * (tile + 2 * MONTAGE_PAD), rows * (tile + 2 * MONTAGE_PAD + MONTAGE_LINE * MONTAGE_LINES)


def montage(result: SearchResult, out: str | Path, tile: int = 96, columns: int = 6) -> Path:
    """Writes a PNG contact sheet: the query, then each neighbour with slide, cell, label and score.

    ``result`` must come from `run_search(..., thumbnails=True)`.
    """
    from PIL import Image, ImageDraw, ImageFont

    from cytostore.imaging import decode_thumbnail

    if "thumbnail" not in result.table.column_names:
        raise InputError("montage needs thumbnails: run the search with thumbnails=True")
    q = result.query
    tiles = [(result.query_pixels, ["QUERY", str(q.get("slide_id", q.get("image", q["mode"]))),
                                    str(q.get("cell_id", "")), str(q.get("label") or "") if "label" in q else ""])]
    for r in result.table.to_pylist():
        tiles.append((decode_thumbnail(r["thumbnail"]),
                      [f"#{r['rank']}  {r['score']:.3f}", str(r["slide_id"]), str(r["cell_id"]), str(r.get("label") or "")]))
    w, h = montage_size(len(tiles), tile, columns)
    sheet = Image.new("RGB", (w, h), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    cols = max(1, min(columns, len(tiles)))
    cell_w, cell_h = w // cols, h // math.ceil(len(tiles) / cols)
    max_chars = max(4, cell_w // 6)
    for j, (pix, lines) in enumerate(tiles):
        x0, y0 = (j % cols) * cell_w + MONTAGE_PAD, (j // cols) * cell_h + MONTAGE_PAD
        if pix is None:
            im = Image.new("RGB", (tile, tile), (200, 200, 200))
        else:
            im = Image.fromarray(np.asarray(pix, dtype=np.uint8)).resize((tile, tile), Image.BICUBIC)
        sheet.paste(im, (x0, y0))
        if j == 0:
            draw.rectangle([x0 - 2, y0 - 2, x0 + tile + 1, y0 + tile + 1], outline=(200, 30, 30), width=2)
        for n, text in enumerate(lines):
            draw.text((x0, y0 + tile + 2 + n * MONTAGE_LINE), text[:max_chars], fill=(0, 0, 0), font=font)
    out = Path(out)
    if out.parent and not out.parent.exists():
        raise InputError(f"--montage {out}: folder {out.parent} does not exist")
    try:
        sheet.save(out, format="PNG")
    except (OSError, ValueError) as e:
        raise InputError(f"--montage {out}: cannot write the PNG ({e})") from e
    return out
