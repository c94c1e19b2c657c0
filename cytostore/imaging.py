"""Reading images and slides, cutting cell crops, making thumbnails."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from cytostore import limits
from cytostore.errors import InputError

SLIDE_SUFFIXES = {".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif"}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
THUMBNAIL_SIZE = 64
_FILTERS = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}


@dataclass(frozen=True)
class CropPolicy:
    """How a cell's square crop is chosen around it."""

    crop_size: int = 64  # side for a cell given by its centre, level-0 pixels
    box_margin: float = 0.15  # context added on each side of a cell's box, as a fraction of its side

    def side(self, box: tuple[float, float, float, float] | None) -> int:
        """Crop side for a cell: ``crop_size``, or more when its box needs it.

        Raises:
            InputError: the box is not finite, or needs a side over ``limits.MAX_CROP_SIDE``.
        """
        if box is None:
            return self.crop_size
        w, h = box[2] - box[0], box[3] - box[1]
        want = max(w, h) * (1 + 2 * self.box_margin)
        if not np.isfinite(want) or want > self.crop_size:
            limits.check_crop_side(want, f"box {w}x{h} px with its margin: crop")
        return max(self.crop_size, int(round(want)))


def is_slide_file(path: str | Path) -> bool:
    """Whether ``path`` is read through OpenSlide (whole-slide formats).

    Plain .tif/.tiff files that OpenSlide does not recognise are read as images.
    """
    suffix = Path(path).suffix.lower()
    if suffix not in SLIDE_SUFFIXES or not Path(path).is_file():
        return False  # not a regular file: open_image refuses it (OpenSlide would block on a FIFO)
    if suffix in {".tif", ".tiff"}:
        import openslide

        return openslide.OpenSlide.detect_format(str(path)) is not None
    return True


class Picture:
    """A plain image held in memory (a field of view or a cell crop)."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        limits.regular_file(self.path, "image")
        try:
            with Image.open(self.path) as im:
                # Checked from the header, before a pixel is decoded (PIL's bomb check, made explicit).
                limits.check_image_size(im.size[0], im.size[1], self.path)
                im.load()
                self.array = np.asarray(im.convert("RGB"))
        except FileNotFoundError as e:
            raise InputError(f"{self.path}: file not found") from e
        except InputError:
            raise
        except Image.DecompressionBombError as e:  # PIL's own check, at the same threshold as ours
            raise InputError(f"{self.path}: over cytostore.limits.MAX_IMAGE_PIXELS ({e}); cut it into fields "
                             "or read it as a slide") from e
        except Exception as e:
            raise InputError(f"{self.path}: not a readable image ({type(e).__name__}: {e})") from e
        if self.array.size == 0:
            raise InputError(f"{self.path}: image is empty")

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) in pixels."""
        return self.array.shape[1], self.array.shape[0]

    def region(self, x0: int, y0: int, side: int) -> np.ndarray:
        """A ``side`` x ``side`` RGB region; parts outside the image repeat its edge."""
        h, w = self.array.shape[:2]
        cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x0 + side, w), min(y0 + side, h)
        out = self.array[cy0:cy1, cx0:cx1]
        pads = ((cy0 - y0, y0 + side - cy1), (cx0 - x0, x0 + side - cx1), (0, 0))
        if any(p for pair in pads for p in pair):
            out = np.pad(out, pads, mode="edge")
        return out

    def close(self) -> None:
        """Nothing to release for an in-memory image."""


class Slide:
    """A whole-slide file read through OpenSlide, region by region at level 0."""

    def __init__(self, path: str | Path):
        import openslide

        self.path = str(path)
        try:
            self._slide = openslide.OpenSlide(self.path)
        except Exception as e:
            raise InputError(f"{self.path}: OpenSlide cannot open it ({type(e).__name__}: {e})") from e

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) at level 0."""
        return tuple(self._slide.dimensions)

    def region(self, x0: int, y0: int, side: int) -> np.ndarray:
        """A ``side`` x ``side`` RGB region at level 0; outside the slide is white."""
        rgba = self._slide.read_region((int(x0), int(y0)), 0, (side, side))
        bg = Image.new("RGB", rgba.size, (255, 255, 255))
        bg.paste(rgba, mask=rgba.split()[3])
        return np.asarray(bg)

    def close(self) -> None:
        """Closes the OpenSlide handle."""
        self._slide.close()


def open_image(path: str | Path) -> Picture | Slide:
    """Opens a plain image or a whole-slide file, chosen by its format; only regular files are opened."""
    limits.regular_file(path, "image")
    return Slide(path) if is_slide_file(path) else Picture(path)


def crop_cell(img: Picture | Slide, x: float, y: float, side: int) -> np.ndarray:
    """The square crop of ``side`` pixels centred on (x, y).

    Raises InputError when the centre lies outside the image or ``side`` is over
    ``limits.MAX_CROP_SIDE`` (checked before the crop is allocated).
    """
    side = limits.check_crop_side(side)
    w, h = img.size
    if not (0 <= x < w and 0 <= y < h) or not np.isfinite([x, y]).all():
        raise InputError(f"cell centre ({x:.1f}, {y:.1f}) is outside the {w}x{h} image")
    x0 = int(round(x - side / 2))
    y0 = int(round(y - side / 2))
    return img.region(x0, y0, side)


def resize(crop: np.ndarray, size: int, interpolation: str = "bicubic") -> np.ndarray:
    """Resizes an RGB crop to ``size`` x ``size`` (uint8, HWC)."""
    if crop.shape[0] == size and crop.shape[1] == size:
        return np.ascontiguousarray(crop)
    im = Image.fromarray(crop).resize((size, size), _FILTERS.get(interpolation, Image.BICUBIC))
    return np.asarray(im)


def thumbnail_bytes(crop: np.ndarray, size: int = THUMBNAIL_SIZE, quality: int = 85) -> bytes:
    """A small JPEG of the crop, for montages and maps."""
    buf = io.BytesIO()
    Image.fromarray(crop).resize((size, size), Image.BILINEAR).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def decode_thumbnail(data: bytes) -> np.ndarray:
    """Decodes a stored thumbnail to an RGB array."""
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))
