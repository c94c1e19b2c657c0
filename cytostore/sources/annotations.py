"""Annotation sources: Pascal VOC XML boxes and QuPath GeoJSON exports."""

from __future__ import annotations

import json
import math
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa

from cytostore import limits
from cytostore.errors import InputError
from cytostore.imaging import IMAGE_SUFFIXES, SLIDE_SUFFIXES
from cytostore.keys import box_cell_id, check_id
from cytostore.sources.base import (CellRecord, finite_number, ImageTask, SourceFailure, SourceItem, SourceOptions, absolute,
                                    safe_slide_id, shard_of)


_MALFORMED = (TypeError, ValueError, AttributeError, IndexError, KeyError, OverflowError, RecursionError)


def _coord(value: Any, what: str) -> float:
    """A coordinate as a finite float; InputError saying what it is otherwise."""
    return finite_number(value, what)


def _xy(c: Any) -> tuple[float, float]:
    if not isinstance(c, (list, tuple)) or len(c) < 2:
        raise InputError(f"position {str(c)[:40]!r} is not [x, y]")
    return _coord(c[0], "x"), _coord(c[1], "y")


def _read_annotation(path: Path) -> bytes:
    """The bytes of an annotation file: a regular file, within ``limits.MAX_ANNOTATION_BYTES``."""
    limits.check_file_size(path, limits.MAX_ANNOTATION_BYTES, "annotation file", "MAX_ANNOTATION_BYTES")
    return path.read_bytes()


def _find_image(stem: str, folders: list[Path], suffixes: set[str]) -> Path | None:
    for folder in folders:
        for suffix in sorted(suffixes):
            for cand in (folder / f"{stem}{suffix}", folder / f"{stem}{suffix.upper()}"):
                if cand.is_file():
                    return cand
    return None


class VocSource:
    """Pascal VOC XML files (the BCCD layout: ``Annotations/`` beside ``JPEGImages/``,
    or XML files next to their images). One box is one cell, its class the label."""

    extra_schema = pa.schema([])
    shard_index, shard_count = 0, 1

    def __init__(self, root: str | Path, options: SourceOptions = SourceOptions()):
        self.root = absolute(root)
        self.options = options
        if not self.root.is_dir():
            limits.regular_file(self.root, "VOC .xml file")  # a FIFO or a device is refused, never opened
        if self.root.is_file():
            self.xmls = [self.root]
        else:
            ann = self.root / "Annotations"
            self.xmls = sorted((ann if ann.is_dir() else self.root).glob("*.xml"))
        if not self.xmls:
            raise InputError(f"{self.root}: no VOC .xml files found")

    def shard(self, index: int, count: int) -> VocSource:
        """XML files index, index+count, ..."""
        return shard_of(self, index, count)

    def __iter__(self) -> Iterator[SourceItem]:
        for xml in self.xmls[self.shard_index::self.shard_count]:
            try:
                yield from self._items(xml)
            except InputError as e:
                yield SourceFailure(str(xml), str(e))

    def _items(self, xml: Path) -> Iterator[SourceItem]:
        """The image task of one XML file, after a failure for each object that cannot be a cell."""
        try:
            root = ET.fromstring(_read_annotation(xml))
        except ET.ParseError as e:
            raise InputError(f"not well-formed XML ({e})") from e
        except OSError as e:
            raise InputError(f"cannot read it ({e})") from e
        fname = (root.findtext("filename") or xml.stem).strip()
        base = xml.parent.parent if xml.parent.name == "Annotations" else xml.parent
        folders = [base / "JPEGImages", xml.parent, base]
        image = next((f / fname for f in folders if (f / fname).is_file()), None)
        image = image or _find_image(Path(fname).stem, folders, IMAGE_SUFFIXES)
        if image is None:
            raise InputError(f"image {fname!r} not found in {', '.join(str(f) for f in folders)}")
        slide_id = safe_slide_id(self.options.slide_id or image.stem, str(xml))
        cells, seen = [], set()
        for k, obj in enumerate(root.iter("object")):
            where = f"{xml}#object{k}"
            try:
                box = _voc_box(obj)
            except InputError as e:
                yield SourceFailure(where, f"{e}; fix or remove the object", slide_id=slide_id)
                continue
            cid = box_cell_id(box)
            if cid in seen:
                yield SourceFailure(where, f"the same box as an earlier object (cell id {cid!r}); the first was "
                                    "kept: remove the repeated object", slide_id=slide_id, cell_id=cid)
                continue
            seen.add(cid)
            cells.append(CellRecord(slide_id=slide_id, cell_id=cid, x=(box[0] + box[2]) / 2, y=(box[1] + box[3]) / 2,
                                    box=box, label=(obj.findtext("name") or "").strip() or None, source_ref=where))
        yield ImageTask(image=str(image), slide_id=slide_id, cells=cells, source_ref=str(xml))


def _voc_box(obj: ET.Element) -> tuple[float, float, float, float]:
    """The (xmin, ymin, xmax, ymax) of a VOC object: four finite numbers, min below max.

    An inverted or empty box is refused (a failure), not swapped: which corner is
    wrong cannot be told, and a swapped box would be a cell nobody drew.
    """
    bb = obj.find("bndbox")
    if bb is None:
        raise InputError("object has no bndbox")
    box = tuple(_coord((bb.findtext(t) or "").strip(), t) for t in ("xmin", "ymin", "xmax", "ymax"))
    if box[2] <= box[0] or box[3] <= box[1]:
        raise InputError(f"box xmin={box[0]:g} ymin={box[1]:g} xmax={box[2]:g} ymax={box[3]:g} is inverted or empty "
                         "(xmin must be below xmax, ymin below ymax)")
    return box  # type: ignore[return-value]


def _points(geom: dict[str, Any]) -> list[tuple[float, float]]:
    coords = geom.get("coordinates")
    if geom.get("type") == "Point":
        return [_xy(coords)]
    if not isinstance(coords, list):
        raise InputError("MultiPoint coordinates are not a list of [x, y]")
    return [_xy(c) for c in coords]


def _geometry_box(geom: dict[str, Any]) -> tuple[float, float, tuple[float, float, float, float] | None]:
    kind = geom.get("type")
    coords = geom.get("coordinates")
    if kind == "Point":
        x, y = _xy(coords)
        return x, y, None
    if kind in {"Polygon", "MultiPolygon"}:
        rings = _outer_rings(geom)
        pts = [p for ring in rings for p in ring]
        if not pts:
            raise InputError(f"{kind} has no points")
        # Area-weighted centroid of the outer ring(s) (shoelace formula).
        a_tot = cx = cy = 0.0
        for ring in rings:
            for (x0, y0), (x1, y1) in zip(ring, ring[1:] + ring[:1]):
                cross = x0 * y1 - x1 * y0
                a_tot += cross
                cx += (x0 + x1) * cross
                cy += (y0 + y1) * cross
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        box = (min(xs), min(ys), max(xs), max(ys))
        if abs(a_tot) < 1e-9:
            return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2, box
        return cx / (3 * a_tot), cy / (3 * a_tot), box
    raise InputError(f"geometry type {kind!r} is not a point, multipoint or polygon")


def _outer_rings(geom: dict[str, Any]) -> list[list[tuple[float, float]]]:
    """Outer rings of a (Multi)Polygon annotation; [] for other geometries."""
    kind, coords = geom.get("type"), geom.get("coordinates") or []
    polys = [coords] if kind == "Polygon" else coords if kind == "MultiPolygon" else []
    if not isinstance(polys, list) or not all(isinstance(p, list) for p in polys):
        raise InputError(f"{kind} coordinates are not lists of rings")
    rings = [p[0] for p in polys if p]
    if not all(isinstance(r, list) for r in rings):
        raise InputError(f"{kind} rings are not lists of [x, y]")
    return [[_xy(c) for c in ring] for ring in rings]


def _inside(x: float, y: float, ring: list[tuple[float, float]]) -> bool:
    """Even-odd ray casting: is (x, y) inside the closed ring?"""
    inside = False
    for (x0, y0), (x1, y1) in zip(ring, ring[1:] + ring[:1]):
        if (y0 > y) != (y1 > y) and x < x0 + (y - y0) * (x1 - x0) / (y1 - y0):
            inside = not inside
    return inside


MEASUREMENT_PREFIX = "m_"


def measurement_column(name: str) -> str:
    """Column name of a QuPath measurement: ``m_`` + the name in lower case, runs of
    other characters than letters, digits and ``_`` made one ``_`` ("Area µm^2" -> m_area_m_2)."""
    text = re.sub(r"[^0-9a-zA-Z_]+", "_", str(name).strip()).strip("_").lower()
    return MEASUREMENT_PREFIX + (text or "unnamed")


def measurements(props: dict[str, Any]) -> dict[str, float | None]:
    """``properties.measurements`` (a dict, or QuPath's older list of {name, value})
    as {column: float}; values that are not numbers become None."""
    raw = props.get("measurements") if isinstance(props, dict) else None
    if isinstance(raw, list):
        raw = {m.get("name"): m.get("value") for m in raw
               if isinstance(m, dict) and isinstance(m.get("name"), (str, int, float))}
    if not isinstance(raw, dict):
        return {}
    out: dict[str, float | None] = {}
    for name, value in raw.items():
        try:
            num = None if isinstance(value, bool) else float(value)
        except (TypeError, ValueError, OverflowError):
            num = None
        out[measurement_column(name)] = num if num is None or math.isfinite(num) else None
    return out


def _features(path: Path) -> list[Any]:
    try:
        data = json.loads(_read_annotation(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"not valid JSON ({e})") from e
    except RecursionError:
        raise InputError("JSON nested too deeply to be GeoJSON") from None
    except OSError as e:
        raise InputError(f"cannot read it ({e})") from e
    if isinstance(data, dict) and data.get("type") == "Feature":
        return [data]
    if isinstance(data, dict) and "features" not in data:
        raise InputError("neither a GeoJSON Feature nor a FeatureCollection (no 'features' list); export it again")
    feats = data["features"] if isinstance(data, dict) else data
    if not isinstance(feats, list):
        raise InputError(f"'features' is a {type(feats).__name__}, not a list of GeoJSON features")
    return feats


def _is_region(feat: Any) -> bool:
    """An annotation with an area (a ROI): a region, never a cell. QuPath's Points tool
    also makes annotations, of Point/MultiPoint geometry: those are cells."""
    props = feat.get("properties") if isinstance(feat, dict) else None
    geom = feat.get("geometry") if isinstance(feat, dict) else None
    return (isinstance(props, dict) and str(props.get("objectType", "")).lower() == "annotation"
            and not (isinstance(geom, dict) and geom.get("type") in {"Point", "MultiPoint"}))


def _label(name: Any) -> str | None:
    """A classification name as text: a number becomes its decimal text; anything else is refused."""
    if name is None or isinstance(name, str):
        return name
    if isinstance(name, int) and not isinstance(name, bool):
        return str(name)
    if isinstance(name, float) and math.isfinite(name):
        return repr(name)
    raise InputError(f"classification name {str(name)[:40]!r} is not text or a number")


class GeoJsonSource:
    """QuPath GeoJSON exports: detections, cells and points become cells.

    A Point is one cell; a MultiPoint (QuPath's Points tool) is one cell per point;
    a (Multi)Polygon is one cell at its centroid with its bounding box. Annotations
    (``properties.objectType`` ``annotation``) with an area are regions, never cells; with
    ``within_annotations`` only cells inside an annotation polygon are kept. The label
    is ``properties.classification.name``; ``properties.measurements`` become float
    columns named by ``measurement_column``. The image is the file with the GeoJSON's
    stem beside it (a slide or an image); the cell id is the feature's ``id`` when it
    has one (``<id>#<k>`` for the k-th point of a MultiPoint), else derived from the position.
    """

    shard_index, shard_count = 0, 1

    def __init__(self, root: str | Path, options: SourceOptions = SourceOptions(), image: str | Path | None = None,
                 within_annotations: bool = False):
        self.root = absolute(root)
        self.options = options
        self.image = absolute(image) if image else None
        self.within_annotations = within_annotations
        if not self.root.is_dir():
            limits.regular_file(self.root, "GeoJSON file")  # a FIFO or a device is refused, never opened
        self.files = [self.root] if self.root.is_file() else sorted(
            p for p in self.root.rglob("*") if p.suffix.lower() in {".geojson", ".json"})
        if not self.files:
            raise InputError(f"{self.root}: no .geojson files found")
        self._extra: pa.Schema | None = None

    @property
    def extra_schema(self) -> pa.Schema:
        """Float columns of every measurement name of the cells of every file (read once)."""
        if self._extra is None:
            names: dict[str, None] = {}
            for path in self.files:
                try:
                    feats = _features(path)
                except (InputError, OSError):
                    continue  # reported as a failure when the file is read for its cells
                for feat in feats:
                    if isinstance(feat, dict) and not _is_region(feat):
                        names.update(dict.fromkeys(measurements(feat.get("properties"))))
            self._extra = pa.schema([pa.field(n, pa.float64()) for n in names])
        return self._extra

    @property
    def n_images(self) -> int:
        """Images (or slides) to read: one per GeoJSON file (the total shown by progress)."""
        return len(self.files)

    def shard(self, index: int, count: int) -> GeoJsonSource | None:
        """Files index, index+count, ...; None for one file, whose tasks are shared out instead."""
        return shard_of(self, index, count) if len(self.files) > 1 else None

    def __iter__(self) -> Iterator[SourceItem]:
        for path in self.files[self.shard_index::self.shard_count]:
            try:
                yield from self._items(path)
            except InputError as e:
                yield SourceFailure(str(path), str(e))

    def _items(self, path: Path) -> Iterator[SourceItem]:
        image = self.image or _find_image(path.stem, [path.parent], SLIDE_SUFFIXES | IMAGE_SUFFIXES)
        if image is None:
            raise InputError(f"no image or slide named {path.stem}.* beside it; put it there or pass --image")
        features = _features(path)
        slide_id = safe_slide_id(self.options.slide_id or image.stem, str(path))
        regions = []
        for k, f in enumerate(features):
            if _is_region(f) and isinstance(f.get("geometry"), dict):
                try:
                    regions += _outer_rings(f["geometry"])
                except (InputError, *_MALFORMED) as e:
                    yield SourceFailure(f"{path}#feature{k}", f"annotation region: {e}; fix or remove it",
                                        slide_id=slide_id)
        if self.within_annotations and not regions:
            raise InputError("no annotation polygon to keep cells inside; draw one in QuPath or drop "
                             "--within-annotations")
        cells, seen = [], set()
        for k, feat in enumerate(features):
            where = f"{path}#feature{k}"
            if _is_region(feat):
                continue  # a region (e.g. a whole-image ROI), never a cell
            try:
                found = self._cells(feat)
            except (InputError, *_MALFORMED) as e:
                yield SourceFailure(where, f"{e}; fix or remove the feature", slide_id=slide_id)
                continue
            for j, (cid, x, y, box, label, extra) in enumerate(found):
                at = f"{where}.point{j}" if len(found) > 1 else where
                if self.within_annotations and not any(_inside(x, y, r) for r in regions):
                    continue
                try:
                    cid = check_id(cid, "cell_id")
                except InputError as e:
                    yield SourceFailure(at, f"{e}; fix or remove the feature", slide_id=slide_id)
                    continue
                if cid in seen:
                    yield SourceFailure(at, f"duplicate cell id {cid!r}; the first was kept", slide_id=slide_id,
                                        cell_id=cid)
                    continue
                seen.add(cid)
                cells.append(CellRecord(slide_id=slide_id, cell_id=cid, x=x, y=y, box=box, label=label,
                                        source_ref=at, extra=extra))
        yield ImageTask(image=str(image), slide_id=slide_id, cells=cells, source_ref=str(path))

    @staticmethod
    def _cells(feat: Any) -> list[tuple[str, float, float, tuple[float, float, float, float] | None, str | None,
                                        dict[str, Any]]]:
        """(cell id, x, y, box, label, measurements) of each cell of one feature."""
        if not isinstance(feat, dict) or not isinstance(feat.get("geometry"), dict):
            raise InputError("feature has no geometry")
        geom = feat["geometry"]
        props = feat.get("properties") or {}
        if not isinstance(props, dict):
            raise InputError(f"properties is a {type(props).__name__}, not an object")
        cls = props.get("classification") or {}
        label = _label(cls.get("name") if isinstance(cls, dict) else None)
        extra = measurements(props)
        fid = feat.get("id") or props.get("id")
        if fid is not None and (isinstance(fid, bool) or not isinstance(fid, (str, int))):
            raise InputError(f"feature id {str(fid)[:40]!r} is not text or a whole number")
        if geom.get("type") == "MultiPoint":
            pts = _points(geom)
            if not pts:
                raise InputError("MultiPoint has no points")
            return [(f"{fid}#{j}" if fid else f"{int(round(x))}_{int(round(y))}", x, y, None, label, dict(extra))
                    for j, (x, y) in enumerate(pts)]
        x, y, box = _geometry_box(geom)
        cid = fid or (box_cell_id(box) if box else f"{int(round(x))}_{int(round(y))}")
        return [(cid, x, y, box, label, extra)]
