"""Classical, annotation-free cell detector for light-microscopy blood smears.

Pipeline for one RGB field (pink/purple cells on a light background):

1. Background colour: median colour of the 20 % brightest pixels in green.
2. Optical density (OD) per channel relative to that background, smoothed.
   The green OD is the foreground signal (haemoglobin and stained nuclei absorb
   green). It keeps the thin gaps between touching cells, which the chroma
   channels of a JPEG blur away.
3. Hysteresis threshold on green OD (Otsu by default, never below
   ``min_contrast`` so an empty background yields nothing). Pixels whose hue ratio
   ``(OD_g - OD_r) / OD_g`` is well below the typical cell value are removed:
   colour-neutral artefacts such as dust or a dark line are grey, cells are not.
4. Holes are filled (cells have pale centres), then a small opening is applied.
5. Expected cell diameter: median equivalent diameter of compact components,
   unless set in :class:`DetectorParams`. Fields with large cells are processed
   at an integer block-mean downscale so that a cell spans ``work_diameter`` to
   twice that many pixels, which keeps the cost per field roughly independent
   of magnification.
6. Components larger than a typical cell are split by a watershed on the
   distance transform, seeded by h-maxima merged within a minimum spacing.
7. Objects whose equivalent diameter is outside [min, max] are dropped.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
from scipy import ndimage as ndi
from skimage import filters, morphology, segmentation


# Version of this detector's algorithm: part of a table's provenance identity, so cells
# found by another version do not join a table silently. Bump it when a change here
# can move, add or drop detections for the same image and parameters.
DETECTOR_VERSION = 1


@dataclass(frozen=True)
class DetectorParams:
    """Detector settings; diameters are in full-resolution pixels, 0 = automatic."""

    min_diameter: float = 0.0  # smallest kept equivalent diameter, px; 0 = 0.5 x expected
    max_diameter: float = 0.0  # largest kept equivalent diameter, px; 0 = 1.8 x expected
    expected_diameter: float = 0.0  # typical cell diameter, px; 0 = estimated per image
    work_diameter: float = 32.0  # work at integer downscale k = floor(expected / this), px
    smoothing_sigma: float = 1.0  # Gaussian sigma on the OD image, working px; 0 = none
    threshold_method: str = "otsu"  # "otsu", "li" or "triangle" on green OD
    threshold_scale: float = 1.0  # multiplies the automatic threshold (<1 keeps paler cells)
    min_contrast: float = 0.05  # threshold floor in green OD, so blank background finds nothing
    hysteresis: float = 0.8  # low/high ratio of the hysteresis threshold; 1 = plain threshold
    neutral_ratio: float = 0.5  # drop grey pixels: hue ratio below this x median; 0 = off
    opening_fraction: float = 0.08  # opening disk radius, fraction of expected diameter
    split_touching: bool = True  # split touching cells with a distance-transform watershed
    split_area_factor: float = 1.2  # split only components above this x expected area
    min_peak_distance: float = 0.35  # seed spacing, fraction of expected diameter
    peak_prominence: float = 0.02  # seed h-maxima depth, fraction of expected diameter
    exclude_border: bool = False  # drop objects touching the image border

    def to_dict(self) -> dict[str, Any]:
        """The parameters as a JSON-serialisable dict (for provenance)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "DetectorParams":
        """Parameters from ``to_dict`` output; unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown detector parameters {unknown}; known: {sorted(known)}")
        return cls(**values)


@dataclass(frozen=True)
class Detection:
    """One detected cell, in full-resolution pixel coordinates."""

    x: float  # centroid column
    y: float  # centroid row
    x0: int  # bounding box left (inclusive)
    y0: int  # bounding box top (inclusive)
    x1: int  # bounding box right (exclusive)
    y1: int  # bounding box bottom (exclusive)
    area: int  # object area in pixels (a multiple of k*k when worked at downscale k)


_THRESHOLDS = {
    "otsu": filters.threshold_otsu,
    "li": filters.threshold_li,
    "triangle": filters.threshold_triangle,
}


def _validate(image: np.ndarray, params: DetectorParams) -> None:
    """Raises ValueError for a malformed image or inconsistent parameters."""
    if not isinstance(image, np.ndarray):
        raise ValueError(f"image must be a numpy array, got {type(image).__name__}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be an HxWx3 RGB array, got shape {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"image must have dtype uint8, got {image.dtype}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"image is empty: shape {image.shape}")
    if params.threshold_method not in _THRESHOLDS:
        raise ValueError(
            f"threshold_method must be one of {sorted(_THRESHOLDS)}, "
            f"got {params.threshold_method!r}"
        )
    if min(params.min_diameter, params.max_diameter, params.expected_diameter) < 0:
        raise ValueError("diameters must be >= 0")
    if params.max_diameter and params.min_diameter > params.max_diameter:
        raise ValueError("min_diameter must not exceed max_diameter")
    if params.work_diameter <= 0 or not 0 < params.hysteresis <= 1:
        raise ValueError("work_diameter must be > 0 and hysteresis in (0, 1]")


def _downscale(image: np.ndarray, k: int) -> np.ndarray:
    """Block-mean downscaling of an HxWx3 image by an integer factor, as float32."""
    if k == 1:
        return image.astype(np.float32)
    h, w = image.shape[0] // k * k, image.shape[1] // k * k
    total = np.zeros((h // k, w // k, 3), np.float32)
    for dy in range(k):
        for dx in range(k):
            total += image[dy:h:k, dx:w:k]
    return total / (k * k)


def foreground_mask(rgb: np.ndarray, params: DetectorParams = DetectorParams()) -> np.ndarray:
    """Returns the hole-filled boolean cell mask of an HxWx3 RGB image (any dtype)."""
    rgb = np.asarray(rgb, dtype=np.float32) + 1.0
    green = rgb[..., 1]
    background = np.median(rgb[green >= np.percentile(green, 80)], axis=0)
    od = np.log(background / rgb)
    if params.smoothing_sigma > 0:
        od = ndi.gaussian_filter(od, (params.smoothing_sigma, params.smoothing_sigma, 0))
    g = od[..., 1]
    if float(g.max()) - float(g.min()) < 1e-3 or float(g.max()) <= params.min_contrast:
        return np.zeros(g.shape, dtype=bool)
    # Clip the brightest few percent first: one dark white cell or stain blob would
    # otherwise pull the threshold above pale (hypochromic) red cells.
    g_clip = np.minimum(g, np.percentile(g, 97))
    thr = max(_THRESHOLDS[params.threshold_method](g_clip) * params.threshold_scale, params.min_contrast)
    if params.hysteresis < 1:
        mask = filters.apply_hysteresis_threshold(g, params.hysteresis * thr, thr)
    else:
        mask = g > thr
    if params.neutral_ratio > 0 and mask.any():
        hue = (g - od[..., 0]) / np.maximum(g, 1e-3)
        typical = float(np.median(hue[mask]))
        if typical > 0.1:  # skip on grey-level images, where cells are neutral too
            mask &= hue > params.neutral_ratio * typical
    return ndi.binary_fill_holes(mask)


def _typical_diameter(mask: np.ndarray) -> float:
    """Median equivalent diameter of compact, non-tiny components; 0 if none."""
    labels, n = ndi.label(mask)
    if n == 0:
        return 0.0
    areas = np.bincount(labels.ravel(), minlength=n + 1)[1:].astype(float)
    boxes = np.array([(s[0].stop - s[0].start) * (s[1].stop - s[1].start)
                      for s in ndi.find_objects(labels)])
    # Bounding-box fill ratio is ~0.79 for a disc and low for clumps; drop specks.
    keep = (areas / boxes > 0.65) & (areas >= 0.25 * np.percentile(areas, 75))
    chosen = areas[keep] if keep.any() else areas
    return float(2.0 * np.sqrt(np.median(chosen) / np.pi))


def _split(labels: np.ndarray, n: int, diam: float, params: DetectorParams) -> np.ndarray:
    """Splits large components by a seeded watershed on their distance transform."""
    areas = np.bincount(labels.ravel(), minlength=n + 1)
    h = max(params.peak_prominence * diam, 0.5)
    merge = morphology.disk(max(int(round(params.min_peak_distance * diam / 2)), 1))
    out = labels.copy()
    next_label = n + 1
    for lab, sl in enumerate(ndi.find_objects(labels), start=1):
        if sl is None or areas[lab] < params.split_area_factor * np.pi / 4 * diam**2:
            continue
        sl = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in sl)
        comp = labels[sl] == lab
        dist = ndi.distance_transform_edt(comp)
        peaks = morphology.h_maxima(dist, h).astype(bool) & comp
        seeds, k = ndi.label(ndi.binary_dilation(peaks, merge) & comp)
        if k < 2:
            continue
        seeds[~peaks] = 0
        split = segmentation.watershed(-dist, seeds, mask=comp)
        out[sl][comp] = np.where(split[comp] > 0, split[comp] + (next_label - 1), 0)
        next_label += k
    return out


def _scale_and_diameter(
    image: np.ndarray, params: DetectorParams
) -> tuple[int, float, np.ndarray | None]:
    """Returns (working factor, expected diameter in full px, mask at that factor or None)."""
    diam = params.expected_diameter
    if diam <= 0 and params.min_diameter > 0 and params.max_diameter > 0:
        diam = 0.5 * (params.min_diameter + params.max_diameter)
    mask, probe = None, 1
    if diam <= 0:
        # Probe on a block-mean thumbnail whose long side is about 640 px.
        probe = max(1, max(image.shape[:2]) // 640)
        mask = foreground_mask(_downscale(image, probe), params)
        diam = _typical_diameter(mask) * probe
    k = max(1, int(diam // params.work_diameter)) if diam > 0 else 1
    k = min(k, max(1, min(image.shape[:2]) // 8))
    return k, diam, mask if k == probe else None


def detect_cells(image: np.ndarray, params: DetectorParams = DetectorParams()) -> list[Detection]:
    """Detects cells in one smear field.

    Args:
        image: HxWx3 uint8 RGB field.
        params: Detector settings.

    Returns:
        Detections sorted by rounded (y, x), then area; deterministic.

    Raises:
        ValueError: If the image is not a non-empty HxWx3 uint8 array or the
            parameters are invalid.
    """
    _validate(image, params)
    k, diam_full, mask = _scale_and_diameter(image, params)
    if diam_full <= 0:
        return []
    if mask is None:
        mask = foreground_mask(_downscale(image, k), params)
    diam = diam_full / k
    radius = int(round(params.opening_fraction * diam))
    if radius >= 1:
        mask = ndi.binary_opening(mask, morphology.disk(radius))
    labels, n = ndi.label(mask)
    if n == 0:
        return []
    if params.split_touching:
        labels = _split(labels, n, diam, params)
        labels, _, _ = segmentation.relabel_sequential(labels)
        n = int(labels.max())

    min_d = (params.min_diameter or 0.5 * diam_full) / k
    max_d = (params.max_diameter or 1.8 * diam_full) / k
    areas = np.bincount(labels.ravel(), minlength=n + 1)
    ok = (areas >= np.pi / 4 * min_d**2) & (areas <= np.pi / 4 * max_d**2)
    ok[0] = False
    keep = np.flatnonzero(ok)
    if keep.size == 0:
        return []
    rows, cols = np.indices(labels.shape, dtype=np.float64)
    cy = ndi.sum_labels(rows, labels, keep) / areas[keep]
    cx = ndi.sum_labels(cols, labels, keep) / areas[keep]
    slices = ndi.find_objects(labels)
    height, width = image.shape[:2]
    hw, ww = labels.shape
    out = []
    for lab, y, x in zip(keep, cy, cx):
        ys, xs = slices[lab - 1]
        on_border = ys.start == 0 or xs.start == 0 or ys.stop == hw or xs.stop == ww
        if params.exclude_border and on_border:
            continue
        # Working pixel (r, c) covers full-res rows r*k .. r*k+k-1.
        y1 = height if ys.stop == hw else ys.stop * k
        x1 = width if xs.stop == ww else xs.stop * k
        out.append(Detection(x=float((x + 0.5) * k - 0.5), y=float((y + 0.5) * k - 0.5),
                             x0=int(xs.start * k), y0=int(ys.start * k), x1=int(x1), y1=int(y1),
                             area=int(areas[lab]) * k * k))
    out.sort(key=lambda d: (round(d.y), round(d.x), d.area))
    return out
