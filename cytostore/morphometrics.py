"""Interpretable per-cell measurements from a crop: size, shape, central pallor, colour.

``measure(crop)`` segments the cell at the crop's centre and returns the
``COLUMNS`` (``morph_*``), the nullable columns of the cell table that
``cytostore ingest --morphometrics`` fills (null otherwise, and for a crop with
no cell at its centre). Lengths are in the crop's pixels, which are level-0
pixels of the source image (crops are never resampled before they are measured).

Segmentation: optical density (OD = -log10(I / background)) summed over the
three channels, thresholded by Otsu's method (at least ``MIN_OD``), holes filled
(so the pale centre of a red cell belongs to it), and the connected component
under the centre (or nearest to it) kept.
"""

from __future__ import annotations

import numpy as np

VERSION = 1  # bump when a measurement changes; recorded in the table's provenance
MIN_OD = 0.05  # lowest threshold on summed OD: a blank crop has no cell
COLUMNS: dict[str, str] = {
    "morph_area": "cell area, pixels^2 (holes filled)",
    "morph_perimeter": "perimeter, pixels",
    "morph_equivalent_diameter": "diameter of the disk of the same area, pixels",
    "morph_major_axis": "major axis of the ellipse with the same second moments, pixels",
    "morph_minor_axis": "minor axis of that ellipse, pixels",
    "morph_eccentricity": "eccentricity of that ellipse (0 = circle)",
    "morph_solidity": "area / convex hull area",
    "morph_extent": "area / bounding box area",
    "morph_circularity": "4 pi area / perimeter^2 (1 = disk)",
    "morph_pallor": "central pallor: 1 - mean OD of the central disk (0.4 of the radius) / mean OD of the rest",
    "morph_pallor_area": "share of the cell whose OD is under half the cell's median OD",
    "morph_red_mean": "mean red of the cell's pixels, 0..1",
    "morph_green_mean": "mean green, 0..1",
    "morph_blue_mean": "mean blue, 0..1",
    "morph_red_std": "std of red within the cell",
    "morph_green_std": "std of green within the cell",
    "morph_blue_std": "std of blue within the cell",
    "morph_od_mean": "mean summed optical density within the cell",
    "morph_od_std": "std of summed optical density within the cell",
    "morph_od_integrated": "summed OD over the cell (stain content, a haemoglobin proxy for red cells)",
    "morph_border": "1 when the cell touches the crop's edge (size and shape then cut), else 0",
}


def optical_density(crop: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(summed OD per pixel, the background RGB it is relative to) of a uint8 RGB crop."""
    rgb = crop.astype(np.float32)
    bright = rgb.sum(axis=2)
    # Background: the brightest tenth of the pixels (smears are light behind the cells).
    bg = rgb[bright >= np.quantile(bright, 0.9)].mean(axis=0)
    bg = np.maximum(bg, 1.0)
    od = -np.log10(np.clip(rgb, 1.0, None) / bg)
    return np.clip(od, 0.0, None).sum(axis=2), bg


def cell_mask(crop: np.ndarray) -> np.ndarray | None:
    """Boolean mask of the cell at the crop's centre, or None when there is none."""
    from scipy import ndimage
    from skimage.filters import threshold_otsu

    od, _ = optical_density(crop)
    if float(od.max()) < MIN_OD:
        return None
    thr = max(float(threshold_otsu(od)), MIN_OD)
    fg = ndimage.binary_fill_holes(ndimage.binary_opening(od > thr, iterations=1))
    labels, n = ndimage.label(fg)
    if n == 0:
        return None
    h, w = fg.shape
    cy, cx = h // 2, w // 2
    lab = labels[cy, cx]
    if lab == 0:  # nearest component to the centre
        ys, xs = np.nonzero(labels)
        k = int(np.argmin((ys - cy) ** 2 + (xs - cx) ** 2))
        lab = labels[ys[k], xs[k]]
    return labels == lab


def measure(crop: np.ndarray) -> dict[str, float | None]:
    """The ``COLUMNS`` of the cell at the centre of a uint8 RGB crop (all None without a cell)."""
    from skimage.measure import regionprops

    out: dict[str, float | None] = dict.fromkeys(COLUMNS)
    if crop.ndim != 3 or crop.shape[2] < 3 or min(crop.shape[:2]) < 4:
        return out
    crop = np.ascontiguousarray(crop[..., :3])
    mask = cell_mask(crop)
    if mask is None or mask.sum() < 4:
        return out
    od, _ = optical_density(crop)
    props = regionprops(mask.astype(np.uint8))[0]
    area = float(props.area)
    perimeter = float(props.perimeter)
    rgb = crop[mask].astype(np.float64) / 255.0
    cell_od = od[mask]
    # Central pallor: the central disk (0.4 of the equivalent radius, at the cell's centroid) vs the rest.
    r = 0.4 * float(props.equivalent_diameter_area) / 2
    yy, xx = np.indices(mask.shape)
    cy, cx = props.centroid
    centre = mask & ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r)
    rest = mask & ~centre
    pallor = (1.0 - float(od[centre].mean()) / float(od[rest].mean())
              if centre.any() and rest.any() and od[rest].mean() > 0 else None)
    med = float(np.median(cell_od))
    out.update({
        "morph_area": area,
        "morph_perimeter": perimeter,
        "morph_equivalent_diameter": float(props.equivalent_diameter_area),
        "morph_major_axis": float(props.axis_major_length),
        "morph_minor_axis": float(props.axis_minor_length),
        "morph_eccentricity": float(props.eccentricity),
        "morph_solidity": float(props.solidity),
        "morph_extent": float(props.extent),
        "morph_circularity": float(4 * np.pi * area / perimeter ** 2) if perimeter > 0 else None,
        "morph_pallor": pallor,
        "morph_pallor_area": float((cell_od < 0.5 * med).mean()) if med > 0 else 0.0,
        "morph_red_mean": float(rgb[:, 0].mean()), "morph_green_mean": float(rgb[:, 1].mean()),
        "morph_blue_mean": float(rgb[:, 2].mean()),
        "morph_red_std": float(rgb[:, 0].std()), "morph_green_std": float(rgb[:, 1].std()),
        "morph_blue_std": float(rgb[:, 2].std()),
        "morph_od_mean": float(cell_od.mean()), "morph_od_std": float(cell_od.std()),
        "morph_od_integrated": float(cell_od.sum()),
        "morph_border": float(mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any()),
    })
    return out


def empty() -> dict[str, None]:
    """The columns, all null (rows ingested without --morphometrics)."""
    return dict.fromkeys(COLUMNS)
