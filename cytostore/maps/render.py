"""A map as a PNG, drawn with matplotlib's Agg backend (no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cytostore.errors import InputError
from cytostore.maps.data import MISSING, MapData

MAX_LEGEND = 20  # categories named in the legend; the rest are grouped as "other"
MISSING_RGB = (0.78, 0.78, 0.78)


def palette(n: int) -> list[tuple[float, float, float]]:
    """``n`` distinct colours: tab10, then tab20 hues, then a golden-angle HSV walk."""
    import colorsys

    from matplotlib import colormaps

    base = [tuple(c[:3]) for c in colormaps["tab10"].colors]
    base += [tuple(c[:3]) for i, c in enumerate(colormaps["tab20"].colors) if i % 2 == 1]
    out = list(base[:n])
    k = 0
    while len(out) < n:
        out.append(colorsys.hsv_to_rgb((0.13 + 0.618034 * k) % 1.0, 0.65, 0.85))
        k += 1
    return out


def category_colors(categories: list[str]) -> np.ndarray:
    """(K, 3) RGB in 0..1, grey for the MISSING category."""
    cols = np.array(palette(len(categories)) or [MISSING_RGB], dtype=np.float64)[: len(categories)]
    for i, name in enumerate(categories):
        if name == MISSING:
            cols[i] = MISSING_RGB
    return cols.reshape(-1, 3)


def point_size(n: int) -> float:
    """Marker area in points^2: larger for small maps, down to a pixel for a million."""
    return float(np.clip(12000.0 / max(n, 1), 0.3, 18.0))


def render_png(data: MapData, out: str | Path, title: str | None = None, size: tuple[float, float] = (9.0, 7.0),
               dpi: int = 110) -> dict[str, Any]:
    """Draws ``data`` as a scatter plot PNG.

    Categorical colourings get a legend (largest categories first, at most
    ``MAX_LEGEND`` named), numeric ones a colour bar.

    Returns:
        ``{"out", "width", "height", "points"}``.
    """
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise InputError(f"{out}: a PNG map needs a .png file name")
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    fig, ax = plt.subplots(figsize=size, dpi=dpi)
    try:
        s = point_size(data.n)
        if data.color.numeric:
            v = data.values
            ok = np.isfinite(v)
            if (~ok).any():
                ax.scatter(data.x[~ok], data.y[~ok], s=s, c=[MISSING_RGB], linewidths=0, rasterized=True)
            sc = ax.scatter(data.x[ok], data.y[ok], s=s, c=v[ok], cmap="viridis", linewidths=0, rasterized=True)
            fig.colorbar(sc, ax=ax, fraction=0.04, pad=0.02, label=data.color.by)
        else:
            cols = category_colors(data.categories)
            ax.scatter(data.x, data.y, s=s, c=cols[data.values], linewidths=0, rasterized=True)
            counts = np.bincount(data.values, minlength=len(data.categories))
            present = [i for i in range(len(data.categories)) if counts[i]]  # ranked by count over all matching cells
            handles = [Line2D([], [], marker="o", linestyle="", markersize=6, color=cols[i],
                              label=f"{data.categories[i]} ({counts[i]})") for i in present[:MAX_LEGEND]]
            if len(present) > MAX_LEGEND:
                rest = int(sum(counts[i] for i in present[MAX_LEGEND:]))
                handles.append(Line2D([], [], linestyle="", label=f"+{len(present) - MAX_LEGEND} more ({rest})"))
            ax.legend(handles=handles, title=data.color.by, loc="upper left", bbox_to_anchor=(1.01, 1.0),
                      fontsize=8, title_fontsize=9, frameon=False)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel("UMAP 1")
        ax.set_ylabel("UMAP 2")
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
        meta = data.umap_meta
        shown_of = f"{data.n} of {data.total_cells}" if data.n < data.total_cells else f"{data.n}"
        ax.set_title(title or f"{data.table}: {shown_of} cells, coloured by {data.color.by}", fontsize=11)
        fig.text(0.01, 0.01, f"UMAP {meta.get('umap_metric', '')}, n_neighbors {meta.get('params', {}).get('n_neighbors')}, "
                 f"fitted on {meta.get('fitted_cells')} of {meta.get('cells')} cells, table version "
                 f"{meta.get('table_version')}", fontsize=7, color="0.4")
        fig.tight_layout(rect=(0, 0.02, 1, 1))
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=dpi)
        w, h = fig.canvas.get_width_height()
    finally:
        plt.close(fig)
    return {"out": str(out), "width": int(w), "height": int(h), "points": int(data.n)}
