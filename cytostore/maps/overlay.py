"""Overlays: the stored detections of one slide drawn on its image, coloured by label,
few-shot prediction or MIL attention, with a legend (a PNG).

The image is the one ingest read (the cell table's ``image`` column). Plain images
(fields of view) are drawn whole, downscaled past ``max_side``; whole-slide files are
read through OpenSlide at the pyramid level that fits, over the region that holds
the slide's cells. Cells with a box are drawn as their box, cells given by a centre
as a circle of half their crop.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from cytostore.errors import InputError
from cytostore.store import CellStore

MAX_SIDE = 2048  # longest side of the drawn image, pixels
MISSING = "(none)"  # category of cells without a label or prediction
MISSING_RGB = (200, 200, 200)
LEGEND_W = 220  # legend panel width, pixels
BOX = ("x0", "y0", "x1", "y1")


def _cells(store: CellStore, table: str, slide: str) -> list[dict[str, Any]]:
    names = store.dataset(table).schema.names
    cols = ["uid", "cell_id", "x", "y", "image", "crop_size", *[c for c in (*BOX, "label") if c in names]]
    where = "slide_id = '" + slide.replace("'", "''") + "'"
    rows = store.cells(columns=cols, where=where, encoder=table).to_pylist()
    if not rows:
        raise InputError(f"slide {slide!r} has no cell in table {table!r} of {store.root}; "
                         f"list the slides with `cytostore slides --store {store.root}`")
    return rows


def _image_path(cells: list[dict[str, Any]], slide: str, image: str | None) -> tuple[str, list[dict[str, Any]]]:
    """The image to draw on, and the cells that lie on it."""
    counts = Counter(str(c["image"]) for c in cells if c.get("image"))
    if not counts:
        raise InputError(f"slide {slide!r}: its cells record no image path (cells ingested from crops have no "
                         "field image to draw on)")
    if image is None:
        if len(counts) > 1:
            shown = ", ".join(f"{p} ({n} cells)" for p, n in counts.most_common(5))
            raise InputError(f"slide {slide!r} spans {len(counts)} images: {shown}; pick one with --image")
        image = next(iter(counts))
    elif str(image) not in counts:
        raise InputError(f"slide {slide!r} has no cell on image {image}; its images are {sorted(counts)}")
    return str(image), [c for c in cells if str(c.get("image")) == str(image)]


def _read(path: str, cells: list[dict[str, Any]], max_side: int):
    """(PIL image, level-0 origin (x, y), scale level-0 -> drawn, what was read)."""
    from PIL import Image

    from cytostore.imaging import is_slide_file

    if not Path(path).exists():
        raise InputError(f"image {path} of this slide is not there any more; the overlay draws on the image "
                         "ingest read: put it back at that path")
    if not is_slide_file(path):
        try:
            with Image.open(path) as im:
                img = im.convert("RGB")
        except OSError as e:
            raise InputError(f"{path}: not a readable image ({e})") from e
        scale = min(1.0, max_side / max(img.size))
        if scale < 1.0:
            img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BILINEAR)
        return img, (0.0, 0.0), scale, {"kind": "image", "size": [img.width, img.height]}
    import openslide

    try:
        slide = openslide.OpenSlide(path)
    except openslide.OpenSlideError as e:
        raise InputError(f"{path}: OpenSlide cannot open it ({e})") from e
    try:
        w0, h0 = slide.dimensions
        xs = np.array([c["x"] for c in cells], dtype=np.float64)
        ys = np.array([c["y"] for c in cells], dtype=np.float64)
        margin = max(float(np.nanmax([c.get("crop_size") or 64 for c in cells])), 64.0)
        x0, y0 = max(0, int(np.nanmin(xs) - margin)), max(0, int(np.nanmin(ys) - margin))
        x1, y1 = min(w0, int(np.nanmax(xs) + margin) + 1), min(h0, int(np.nanmax(ys) + margin) + 1)
        want = max(1.0, max(x1 - x0, y1 - y0) / max_side)  # downsample that fits max_side
        level = slide.get_best_level_for_downsample(want)
        ds = float(slide.level_downsamples[level])
        size = (max(1, int((x1 - x0) / ds)), max(1, int((y1 - y0) / ds)))
        rgba = slide.read_region((x0, y0), level, size)
    finally:
        slide.close()
    img = Image.new("RGB", rgba.size, (255, 255, 255))
    img.paste(rgba, mask=rgba.split()[3])
    scale = 1.0 / ds
    fit = min(1.0, max_side / max(img.size))
    if fit < 1.0:
        img = img.resize((max(1, round(img.width * fit)), max(1, round(img.height * fit))), Image.BILINEAR)
        scale *= fit
    return img, (float(x0), float(y0)), scale, {"kind": "slide", "level": int(level), "downsample": ds,
                                                "region": [x0, y0, x1, y1], "size": [img.width, img.height]}


def _attention(store: CellStore, model_dir: str | Path, slide: str, table: str) -> tuple[dict[int, float], str]:
    from cytostore.mil import explain

    if not Path(model_dir).is_dir():
        raise InputError(f"--attention {model_dir}: no such MIL model folder; train one with `cytostore mil train`")
    e = explain(store.root, model_dir, slide, table=table, device="cpu")
    return dict(zip(e.cells.column("uid").to_pylist(), e.cells.column("attention").to_pylist())), e.label


def _colours(store: CellStore, cells: list[dict[str, Any]], slide: str, table: str, predictions: str | None,
             attention: str | Path | None) -> tuple[list[tuple[int, int, int]], dict[str, Any]]:
    """An RGB colour per cell and what the legend shows."""
    if attention is not None:
        from matplotlib import colormaps

        att, mil_label = _attention(store, attention, slide, table)
        a = np.array([att.get(int(c["uid"]), np.nan) for c in cells], dtype=np.float64)
        lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
        t = (a - lo) / (hi - lo) if hi > lo else np.full(len(a), 0.5)
        cmap = colormaps["viridis"]
        rgb = [tuple(int(255 * v) for v in cmap(float(x))[:3]) for x in np.nan_to_num(t, nan=0.0)]
        return rgb, {"kind": "attention", "min": lo, "max": hi, "mil_label": mil_label, "cmap": "viridis"}
    if predictions is not None:
        from cytostore.fewshot.tables import read_predictions

        where = "slide_id = '" + slide.replace("'", "''") + "'"
        pred = read_predictions(store, predictions, columns=["uid", "prediction"], where=where)
        of = dict(zip(pred.column("uid").to_pylist(), pred.column("prediction").to_pylist()))
        names = [of.get(int(c["uid"])) for c in cells]
        by = f"prediction:{predictions}"
    else:
        names = [c.get("label") for c in cells]
        by = "label"
    names = [MISSING if n is None else str(n) for n in names]
    from cytostore.export.geojson import class_colors

    colours = {k: tuple(v) for k, v in class_colors([n for n in names if n != MISSING]).items()}
    colours[MISSING] = MISSING_RGB
    counts = Counter(names)
    order = sorted(counts, key=lambda k: (k == MISSING, -counts[k], k))
    return [colours[n] for n in names], {"kind": by, "classes": {k: counts[k] for k in order},
                                         "colors": {k: list(colours[k]) for k in order}}


def overlay(store: CellStore | str | Path, slide: str, out: str | Path, predictions: str | None = None,
            attention: str | Path | None = None, encoder: str | None = None, image: str | None = None,
            max_side: int = MAX_SIDE) -> dict[str, Any]:
    """Draws the stored detections of ``slide`` on its image and writes a PNG with a legend.

    Args:
        store: the store (or its path).
        slide: the slide (or field) id.
        out: the PNG to write.
        predictions: colour by this prediction set (``fewshot predict`` or ``cluster``).
        attention: colour by the attention of this MIL model (a ``mil train`` folder).
        encoder: which cell table; default the only (or default) one.
        image: the image to draw on when the slide spans several.
        max_side: longest side of the drawn image in pixels.

    Returns:
        A summary: the image read (and OpenSlide level), cells drawn, colouring and legend.

    Raises:
        InputError: no such slide, no image to draw on, both colourings asked for.
    """
    from PIL import Image, ImageDraw

    from cytostore.maps.captions import caption_font, line_height

    if predictions is not None and attention is not None:
        raise InputError("colour by --predictions or by --attention, not both")
    if max_side < 64:
        raise InputError(f"max_side must be at least 64 pixels, got {max_side}")
    s = store if isinstance(store, CellStore) else CellStore.open(store)
    table = s.resolve(encoder)
    path, cells = _image_path(_cells(s, table, slide), slide, image)
    img, (ox, oy), scale, read = _read(path, cells, max_side)
    rgb, legend = _colours(s, cells, slide, table, predictions, attention)
    draw = ImageDraw.Draw(img)
    width = max(1, round(2 * max(scale, 0.5)))
    outside = 0
    for c, col in zip(cells, rgb):
        box = [c.get(k) for k in BOX]
        if all(v is not None for v in box):
            xy = [(box[0] - ox) * scale, (box[1] - oy) * scale, (box[2] - ox) * scale, (box[3] - oy) * scale]
            draw.rectangle(xy, outline=col, width=width)
        else:
            r = max(2.0, 0.5 * 0.7 * float(c.get("crop_size") or 64) * scale)
            cx, cy = (c["x"] - ox) * scale, (c["y"] - oy) * scale
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=col, width=width)
        outside += not (0 <= (c["x"] - ox) * scale < img.width and 0 <= (c["y"] - oy) * scale < img.height)
    font = caption_font(12)
    lh = line_height(font) + 4
    rows = 3 + (len(legend["classes"]) * 2 if "classes" in legend else 0)
    need = 20 + lh * rows + (180 + 2 * lh if legend["kind"] == "attention" else 0)
    sheet = Image.new("RGB", (img.width + LEGEND_W, max(img.height, need)), "white")
    sheet.paste(img, (0, 0))
    _legend(ImageDraw.Draw(sheet), img.width + 10, 10, legend, font, lh, slide, len(cells))
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise InputError(f"--out {out}: the overlay is a PNG; name a .png file")
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out, format="PNG")
    return {"slide_id": slide, "table": table, "image": path, "read": read, "scale": round(scale, 6),
            "cells": len(cells), "cells_outside_image": int(outside), "color_by": legend["kind"],
            "legend": legend, "out": str(out)}


def _legend(draw, x: int, y: int, legend: dict[str, Any], font, lh: int, slide: str, n: int) -> None:
    from cytostore.maps.captions import wrap

    for line in wrap(font, f"{slide}: {n} cells", LEGEND_W - 20):
        draw.text((x, y), line, fill="black", font=font)
        y += lh
    for line in wrap(font, f"colour: {legend['kind']}", LEGEND_W - 20):
        draw.text((x, y), line, fill="black", font=font)
        y += lh
    y += 4
    if legend["kind"] == "attention":
        from matplotlib import colormaps

        cmap, bar_h = colormaps[legend["cmap"]], 160
        for i in range(bar_h):
            col = tuple(int(255 * v) for v in cmap(1.0 - i / (bar_h - 1))[:3])
            draw.line([(x, y + i), (x + 18, y + i)], fill=col)
        draw.text((x + 26, y - 2), f"{legend['max']:.4f} (most)", fill="black", font=font)
        draw.text((x + 26, y + bar_h - lh + 2), f"{legend['min']:.4f} (least)", fill="black", font=font)
        y += bar_h + 8
        for line in wrap(font, f"MIL prediction: {legend['mil_label']}", LEGEND_W - 20):
            draw.text((x, y), line, fill="black", font=font)
            y += lh
        return
    for name, count in legend["classes"].items():
        col = tuple(legend["colors"][name])
        draw.rectangle([x, y + 2, x + 14, y + 14], fill=col, outline="black")
        lines = wrap(font, f"{name} ({count})", LEGEND_W - 40)
        for j, line in enumerate(lines):
            draw.text((x + 22, y + j * (lh - 4)), line, fill="black", font=font)
        y += max(lh, len(lines) * (lh - 4) + 4)
