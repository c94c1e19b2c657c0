"""Sources: everything cells come from, turned into one stream of image tasks."""

from __future__ import annotations

from pathlib import Path

from cytostore.errors import InputError
from cytostore.imaging import IMAGE_SUFFIXES, SLIDE_SUFFIXES
from cytostore.limits import regular_file
from cytostore.sources.annotations import GeoJsonSource, VocSource
from cytostore.sources.base import CellRecord, ImageTask, Source, SourceFailure, SourceOptions
from cytostore.sources.folders import CropFolderSource, FieldFolderSource
from cytostore.sources.manifest import ManifestSource

FORMATS = ("manifest", "crops", "voc", "geojson", "fields", "slides")

__all__ = [
    "FORMATS", "CellRecord", "CropFolderSource", "FieldFolderSource", "GeoJsonSource", "ImageTask",
    "ManifestSource", "Source", "SourceFailure", "SourceOptions", "VocSource", "detect_format", "open_source",
]


def detect_format(path: str | Path) -> str:
    """Guesses the source format of ``path``; raises InputError when it is ambiguous."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    if not path.is_dir():
        regular_file(path, "source file")  # a FIFO or a device is refused, never opened
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in {".csv", ".tsv", ".parquet"}:
            return "manifest"
        if suffix in {".geojson", ".json"}:
            return "geojson"
        if suffix == ".xml":
            return "voc"
        if suffix in SLIDE_SUFFIXES - {".tif", ".tiff"}:
            return "slides"
        raise InputError(f"{path}: cannot tell its format; pass --format ({', '.join(FORMATS)})")
    if (path / "Annotations").is_dir() or any(path.glob("*.xml")):
        return "voc"
    if any(path.glob("*.geojson")):
        return "geojson"
    manifests = [p for p in path.iterdir() if p.suffix.lower() in {".csv", ".parquet"}]
    if len(manifests) == 1:
        raise InputError(f"{path}: holds a manifest; pass the file itself: {manifests[0]}")
    if any(p.suffix.lower() in SLIDE_SUFFIXES - {".tif", ".tiff"} for p in path.rglob("*")):
        return "slides"
    if any(p.suffix.lower() in IMAGE_SUFFIXES for p in path.rglob("*")):
        raise InputError(
            f"{path}: a folder of images may hold cell crops (--format crops) or fields whose cells "
            "must be found (--format fields); say which"
        )
    raise InputError(f"{path}: no images, slides, manifests or annotations found")


def open_source(path: str | Path, fmt: str | None = None, options: SourceOptions = SourceOptions(),
                image: str | Path | None = None) -> Source:
    """Opens ``path`` as a source of cells.

    Args:
        path: manifest file, folder or annotation file.
        fmt: one of FORMATS; guessed when None.
        options: slide id, labels from folders, detector parameters.
        image: the image or slide a single GeoJSON file belongs to.
    """
    fmt = fmt or detect_format(path)
    if fmt == "manifest":
        return ManifestSource(path, options)
    if fmt == "crops":
        return CropFolderSource(path, options)
    if fmt == "voc":
        return VocSource(path, options)
    if fmt == "geojson":
        return GeoJsonSource(path, options, image=image)
    if fmt in {"fields", "slides"}:
        return FieldFolderSource(path, options, slides=fmt == "slides")
    raise InputError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
