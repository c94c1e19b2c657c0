"""Classical (annotation-free) cell detector for light-microscopy blood smears.

Pipeline, per RGB field:

1. Background colour: median colour of the brightest-in-green pixels.
2. Foreground feature: green minus red optical density relative to the
   background, ``log(R/R_bg) - log(G/G_bg)``. Haemoglobin absorbs green far more
   than red, so red cells and stained nuclei are bright while the (bluish or
   whitish) background and grey, colour-neutral artefacts (dust, lines) are dark.
3. Gaussian smoothing, automatic threshold (Otsu by default), hole filling
   (cells have pale centres), opening.
4. Expected cell diameter: from the median area of compact connected
   components, unless both diameters are fixed in :class:`DetectorParams`.
5. Touching cells are split by a watershed on the distance transform, seeded by
   h-maxima that lie at least a fraction of the expected diameter apart.
6. Objects whose equivalent diameter lies outside the diameter range are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from skimage import filters, morphology, segmentation


@dataclass(frozen=True)
class DetectorParams:
    """Detector settings; 0 means "derive from the image" where noted."""

    min_diameter: float = 0.0  # px, smallest kept equivalent diameter; 0 = 0.5 x expected
    max_diameter: float = 0.0  # px, largest kept equivalent diameter; 0 = 1.8 x expected
    expected_diameter: float = 0.0  # px, typical cell diameter; 0 = estimated per image
    smoothing_sigma: float = 1.0  # px, Gaussian sigma applied to the feature image
    threshold_method: str = "otsu"  # "otsu", "li" or "triangle" on the feature image
    threshold_scale: float = 1.0  # multiplies the automatic threshold (<1 keeps paler cells)
    closing_radius: float = 0.0  # px, closing before hole filling (closes broken rims)
    opening_fraction: float = 0.08  # opening disk radius as a fraction of expected diameter
    split_touching: bool = True  # split touching cells with a distance watershed
    min_peak_distance: float = 0.35  # watershed seed spacing, fraction of expected diameter
    peak_prominence: float = 0.08  # seed h-maxima depth, fraction of expected diameter
    split_area_factor: float = 1.2  # only components above this x expected area are split
    neutral_ratio: float = 0.5  # drop grey pixels: hue below this x median cell hue
    exclude_border: bool = False  # drop objects touching the image border


@dataclass(frozen=True)
class Detection:
    """One detected cell."""

    x: float  # centroid column, px
    y: float  # centroid row, px
    x0: int  # bounding box left, px (inclusive)
    y0: int  # bounding box top, px (inclusive)
    x1: int  # bounding box right, px (exclusive)
    y1: int  # bounding box bottom, px (exclusive)
    area: int  # object area, px


_THRESHOLDS = {
    "otsu": filters.threshold_otsu,
    "li": filters.threshold_li,
    "triangle": filters.threshold_triangle,
}


def _validate(image: np.ndarray, params: DetectorParams) -> None:
    if not isinstance(image, np.ndarray):
        raise ValueError(f"image must be a numpy array, got {type(image).__name__}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be HxWx3 RGB, got shape {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8, got dtype {image.dtype}")
    if image.shape[0] < 8 or image.shape[1] < 8:
        raise ValueError(f"image is empty or too small: shape {image.shape}")
    if params.threshold_method not in _THRESHOLDS:
        raise ValueError(
            f"threshold_method must be one of {sorted(_THRESHOLDS)}, "
            f"got {params.threshold_method!r}"
        )
    if params.min_diameter < 0 or params.max_diameter < 0 or params.expected_diameter < 0:
        raise ValueError("diameters must be >= 0")
    if params.max_diameter and params.min_diameter > params.max_diameter:
        raise ValueError("min_diameter must not exceed max_diameter")


def _optical_density(image: np.ndarray, sigma: float) -> np.ndarray:
    """Returns HxWx3 float32 optical density relative to the background colour."""
    rgb = image.astype(np.float32) + 1.0
    green = rgb[..., 1]
    bright = green >= np.percentile(green, 80)
    background = np.median(rgb[bright], axis=0)
    od = np.log(background / rgb)
    if sigma > 0:
        od = ndi.gaussian_filter(od, (sigma, sigma, 0))
    return od


def foreground_mask(image: np.ndarray, params: DetectorParams = DetectorParams()) -> np.ndarray:
    """Returns the boolean cell mask before hole filling and splitting."""
    od = _optical_density(image, params.smoothing_sigma)
    green = od[..., 1]
    if float(green.max()) - float(green.min()) < 1e-6:
        return np.zeros(green.shape, dtype=bool)
    mask = green > _THRESHOLDS[params.threshold_method](green) * params.threshold_scale
    if params.neutral_ratio > 0 and mask.any():
        hue = (green - od[..., 0]) / np.maximum(green, 1e-3)
        mask &= hue > params.neutral_ratio * float(np.median(hue[mask]))
    return mask


def _expected_diameter(labels: np.ndarray, n: int) -> float:
    """Median equivalent diameter of compact, non-tiny components (0 if none)."""
    if n == 0:
        return 0.0
    idx = np.arange(1, n + 1)
    areas = np.bincount(labels.ravel(), minlength=n + 1)[1:].astype(float)
    slices = ndi.find_objects(labels)
    # Fill ratio of the bounding box: ~0.785 for a disc, low for clumps.
    box = np.array([(s[0].stop - s[0].start) * (s[1].stop - s[1].start) for s in slices])
    extent = areas / np.maximum(box, 1)
    keep = (extent > 0.65) & (areas >= 0.25 * np.percentile(areas, 75))
    if not keep.any():
        keep = idx > 0
    return float(2.0 * np.sqrt(np.median(areas[keep]) / np.pi))

def _open(mask: np.ndarray, radius: float) -> np.ndarray:
    """Binary opening with a Euclidean disk, via two distance transforms."""
    eroded = ndi.distance_transform_edt(mask) > radius
    return ndi.distance_transform_edt(~eroded) <= radius


def _split(labels: np.ndarray, n: int, diam: float, params: DetectorParams) -> tuple[np.ndarray, int]:
    """Splits large components by a seeded watershed on the distance transform."""
    areas = np.bincount(labels.ravel(), minlength=n + 1)
    h = max(params.peak_prominence * diam, 0.5)
    spacing = max(int(round(params.min_peak_distance * diam / 2)), 1)
    merge = morphology.disk(spacing)
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
        view = out[sl]
        view[comp] = np.where(split[comp] > 0, split[comp] + next_label - 1, 0)
        next_label += k
    out, _, _ = segmentation.relabel_sequential(out)
    return out, int(out.max())



def detect_cells(image: np.ndarray, params: DetectorParams = DetectorParams()) -> list[Detection]:
    """Detects cells in one smear field.

    Args:
        image: HxWx3 uint8 RGB field.
        params: Detector settings.

    Returns:
        Detections sorted by rounded (y, x); deterministic for a given input.

    Raises:
        ValueError: If the image is not a non-empty HxWx3 uint8 array or the
            parameters are inconsistent.
    """
    _validate(image, params)
    mask = foreground_mask(image, params)
    if params.closing_radius > 0:
        mask = ~_open(~mask, params.closing_radius)
    mask = ndi.binary_fill_holes(mask)
    labels, n = ndi.label(mask)
    diam = params.expected_diameter
    if diam <= 0:
        if params.min_diameter > 0 and params.max_diameter > 0:
            diam = 0.5 * (params.min_diameter + params.max_diameter)
        else:
            diam = _expected_diameter(labels, n)
    if diam <= 0:
        return []

    radius = params.opening_fraction * diam
    if radius >= 1:
        mask = _open(mask, radius)
    min_d = params.min_diameter or 0.5 * diam
    max_d = params.max_diameter or 1.8 * diam
    min_area = np.pi / 4 * min_d**2
    max_area = np.pi / 4 * max_d**2
    labels, n = ndi.label(mask)
    if n == 0:
        return []
    if params.split_touching:
        labels, n = _split(labels, n, diam, params)
    areas = np.bincount(labels.ravel(), minlength=n + 1)
    idx = np.arange(n + 1)
    ok = (areas >= min_area) & (areas <= max_area) & (idx > 0)
    if not ok.any():
        return []
    slices = ndi.find_objects(labels)
    keep = np.flatnonzero(ok)
    cy = ndi.sum_labels(np.arange(labels.shape[0])[:, None] * np.ones_like(labels), labels, keep)
    cx = ndi.sum_labels(np.arange(labels.shape[1])[None, :] * np.ones_like(labels), labels, keep)
    h, w = labels.shape
    out = []
    for k, lab in enumerate(keep):
        sl = slices[lab - 1]
        y0, y1, x0, x1 = sl[0].start, sl[0].stop, sl[1].start, sl[1].stop
        if params.exclude_border and (y0 == 0 or x0 == 0 or y1 == h or x1 == w):
            continue
        a = int(areas[lab])
        out.append(Detection(float(cx[k] / a), float(cy[k] / a), x0, y0, x1, y1, a))
    out.sort(key=lambda d: (round(d.y), round(d.x), d.area))
    return out
