"""Bad inputs for every source format and the ingest options (Hypothesis strategies),
and the invariants every run must keep. Shared by tests/test_fuzz.py (CI size) and
benchmarks/fuzz_inputs.py (a larger run).

A strategy draws a *plan* (plain data); ``Case.write`` turns it into files. Each
input cell of a case is an ``Item``: the ``where`` values any of which accounts
for it (its own row or object, its file, its image), and the text it must keep
if it is stored. The invariants (``check_source``, ``check_ingest``):

- no traceback: the source raises nothing but InputError when opened, nothing when
  read; the CLI exits 0, 1 or 2, never 3;
- no loss: every item is stored or recorded as a failure (exit 2: nothing written);
- no silent change: a stored cell's slide id, label and image are its input's;
- no store damage: the rows stored before the run are unchanged, the store opens.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import strategies as st
from PIL import Image

IMAGE_KINDS = ("good", "good", "good", "small", "one_pixel", "zero_bytes", "corrupt", "thin", "missing", "folder")
SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".webp", ".PNG", ".txt")
BASE_SLIDE = "base#slide"  # the template store's slide: no strategy draws a '#'


def write_image(path: Path, kind: str, seed: int = 0) -> None:
    """An image file of one of IMAGE_KINDS at ``path`` (``missing`` writes nothing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    if kind in {"good", "small", "one_pixel", "thin"}:
        w, h = {"good": (80, 64), "small": (6, 5), "one_pixel": (1, 1), "thin": (1, 6000)}[kind]
        arr = (rng.random((h, w, 3)) * 255).astype("uint8")
        fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".bmp": "BMP", ".tif": "TIFF", ".webp": "WEBP"}.get(
            path.suffix.lower(), "PNG")
        Image.fromarray(arr).save(path, format=fmt)
    elif kind == "zero_bytes":
        path.write_bytes(b"")
    elif kind == "corrupt":
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + rng.bytes(40))
    elif kind == "folder":
        path.mkdir(exist_ok=True)


# -- text ------------------------------------------------------------------------------
_ODD = "ab~ _-.,;:'\"é中\u200b\t%$()=+"
ids = st.one_of(st.text(alphabet=st.sampled_from("abcxyz0123"), min_size=1, max_size=6).map(lambda s: "s" + s),
                st.text(alphabet=st.sampled_from(_ODD + "/\\\x01"), min_size=0, max_size=8).map(lambda s: "s" + s),
                st.just(""), st.just("  "), st.just("x" * 250))
labels = st.one_of(st.none(), st.just(""), st.sampled_from(["007", "1.50", "1e3", "NA", "nan", "True", " lym ", "neu"]),
                   st.text(alphabet=st.sampled_from(_ODD + "0123"), max_size=8))
coords = st.one_of(st.none(), st.integers(-50, 120).map(float), st.floats(allow_nan=True, allow_infinity=True),
                   st.sampled_from([1e300, -1e300, 1e15, 0.0, 63.999]))
_good_names = st.text(alphabet=st.sampled_from("abcdefgh_ é"), min_size=1, max_size=10).filter(str.strip)
column_names = st.one_of(_good_names, _good_names, _good_names, st.sampled_from(["note", "label2", "m_area"]),
                         st.sampled_from(["", " ", "uid", "embedding", "x\x01"]))  # the last refused up front
cell_values = st.one_of(st.none(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                        st.text(alphabet=st.sampled_from(_ODD), max_size=6))
file_stems = st.text(alphabet=st.sampled_from("ab~ ._-é中0"), min_size=1, max_size=12).filter(
    lambda s: s not in {".", ".."} and not s.startswith("."))


@dataclass
class Item:
    """One input cell: what accounts for it, and the text it must keep when stored."""

    refs: tuple[str, ...]  # failure `where` or stored `source_ref` values that account for it
    prefixes: tuple[str, ...] = ()  # ... or values starting with one of these (a MultiPoint's points)
    expect: dict[str, Any] = field(default_factory=dict)  # column -> value a stored row must hold

    def accounted(self, wheres: set[str]) -> bool:
        return any(r in wheres for r in self.refs) or any(w.startswith(p) for w in wheres for p in self.prefixes)


@dataclass
class Case:
    """A written source: its path, CLI arguments and input items."""

    fmt: str
    source: Path
    args: list[str]
    items: list[Item]


def _image(root: Path, name: str, kind: str, seed: int) -> Path:
    path = root / "img" / name
    if not path.exists() and not path.is_dir():
        write_image(path, kind, seed)
    return path


# -- manifests ---------------------------------------------------------------------------
@st.composite
def manifests(draw) -> dict:
    """A manifest plan: rows with odd ids, labels, coordinates, images and extra columns."""
    n = draw(st.integers(0, 6))
    images = draw(st.lists(st.sampled_from(IMAGE_KINDS), min_size=1, max_size=3))
    extra = draw(st.lists(column_names, max_size=2))
    rows = []
    for _ in range(n):
        box = draw(st.booleans())
        rows.append({
            "image": draw(st.integers(0, len(images) - 1)), "slide_id": draw(ids), "label": draw(labels),
            "x": draw(coords), "y": draw(coords),
            "box": [draw(coords) for _ in range(4)] if box else None,
            "extra": [draw(cell_values) for _ in extra], "latin1": draw(st.booleans()) and draw(st.booleans()),
        })
    return {"kind": "manifest", "images": images, "extra": extra, "rows": rows,
            "parquet": draw(st.booleans()) and not any(r["latin1"] for r in rows),
            "cell_ids": draw(st.booleans())}


def _fmt(v: Any) -> str:
    return "" if v is None else repr(v) if isinstance(v, float) else str(v)


def write_manifest_case(plan: dict, root: Path) -> Case:
    images = [_image(root, f"f{k}.png", kind, k) for k, kind in enumerate(plan["images"])]
    has_box = any(r["box"] for r in plan["rows"])
    header = ["image", "slide_id", "label", "x", "y"] + (["x0", "y0", "x1", "y1"] if has_box else [])
    header += (["cell_id"] if plan["cell_ids"] else []) + plan["extra"]
    table: list[list[Any]] = []
    for j, r in enumerate(plan["rows"]):
        box = r["box"] or [None] * 4
        row = [os.path.relpath(images[r["image"]], root), r["slide_id"], r["label"], r["x"], r["y"]]
        row += box if has_box else []
        row += [f"c{j}"] if plan["cell_ids"] else []
        table.append(row + list(r["extra"]))
    items = []
    path = root / ("m.parquet" if plan["parquet"] else "m.csv")
    for j, (r, row) in enumerate(zip(plan["rows"], table)):
        where = f"{path}:{'row' if plan['parquet'] else 'line'} {j + (1 if plan['parquet'] else 2)}"
        label = r["label"]
        expect = {"slide_id": str(r["slide_id"]).strip(), "image": str(images[r["image"]])}
        if not r["latin1"] and label is not None:
            expect["label"] = label or None
        items.append(Item(refs=(where, str(images[r["image"]]), str(path)), expect=expect))
    if plan["parquet"]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        cols = {}
        for k, name in enumerate(header):
            vals = [row[k] for row in table]
            if name in {"x", "y", "x0", "y0", "x1", "y1"}:
                cols[f"{k}"] = pa.array(vals, pa.float64())
            else:
                cols[f"{k}"] = pa.array([None if v is None else str(v) for v in vals], pa.string())
        t = pa.table(cols)
        t = t.rename_columns(header)
        pq.write_table(t, path)
    else:
        with open(path, "wb") as fh:
            text = _csv_text(header, [[_fmt(v) for v in row] for row in table])
            lines = text.split("\n")
            for j, r in enumerate(plan["rows"]):
                if r["latin1"]:  # one byte that is not UTF-8 in this row's label
                    lines[j + 1] = lines[j + 1] + "\udce9"
            fh.write("\n".join(lines).encode("utf-8", "surrogateescape"))
    return Case("manifest", path, [], items)


def _csv_text(header: list[str], rows: list[list[str]]) -> str:
    import io

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue().rstrip("\n")


# -- folders of crops -------------------------------------------------------------------
@st.composite
def crop_folders(draw) -> dict:
    """A crops-folder plan: odd file names, nested folders, broken and extreme images."""
    files = draw(st.lists(st.tuples(st.lists(file_stems, max_size=2), file_stems, st.sampled_from(SUFFIXES),
                                    st.sampled_from(IMAGE_KINDS)), max_size=6))
    return {"kind": "crops", "files": files, "slide_id": draw(st.one_of(st.none(), ids))}


def write_crops_case(plan: dict, root: Path) -> Case:
    top = root / "crops"
    top.mkdir()
    items = []
    for k, (dirs, stem, suffix, kind) in enumerate(plan["files"]):
        path = top.joinpath(*dirs, stem + suffix)
        if path.exists() or any(p.exists() and not p.is_dir() for p in path.parents if top in p.parents):
            continue
        try:
            write_image(path, "good" if kind in {"missing", "folder"} else kind, k)
        except (OSError, ValueError):
            continue  # a name the file system refuses
        if suffix.lower() in {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".webp"}:
            items.append(Item(refs=(str(path),), expect={"image": str(path)}))
    args = ["--format", "crops"] + (["--slide-id", plan["slide_id"]] if plan["slide_id"] else [])
    return Case("crops", top, args, items)


# -- VOC --------------------------------------------------------------------------------
voc_values = st.one_of(st.integers(-20, 120).map(str), st.sampled_from(["nan", "inf", "-inf", "1e400", "", "x", " 5 "]),
                       st.floats(allow_nan=True).map(repr))


@st.composite
def voc_files(draw) -> dict:
    """A VOC plan: objects with odd or missing boxes and names, sometimes broken XML."""
    objects = draw(st.lists(st.tuples(st.text(alphabet=st.sampled_from("ab1 é<&"), max_size=5),
                                      st.one_of(st.none(), st.lists(voc_values, min_size=4, max_size=4))),
                            max_size=6))
    return {"kind": "voc", "objects": objects, "image": draw(st.sampled_from(IMAGE_KINDS)),
            "broken": draw(st.integers(0, 9)) == 0, "copies": draw(st.integers(1, 2))}


def write_voc_case(plan: dict, root: Path) -> Case:
    from xml.sax.saxutils import escape

    d = root / "voc"
    d.mkdir()
    write_image(d / "f.png", plan["image"], 1)
    body = ""
    for name, box in plan["objects"]:
        tags = "" if box is None else "<bndbox>" + "".join(
            f"<{t}>{escape(v)}</{t}>" for t, v in zip(("xmin", "ymin", "xmax", "ymax"), box)) + "</bndbox>"
        body += f"<object><name>{escape(name)}</name>{tags}</object>"
    xml = f"<annotation><filename>f.png</filename>{body}</annotation>"
    if plan["broken"]:
        xml = xml[: len(xml) // 2]
    items = []
    for c in range(plan["copies"]):  # a second XML naming the same image: its cells are repeated keys
        path = d / f"a{c}.xml"
        path.write_text(xml)
        items += [Item(refs=(f"{path}#object{k}", str(path), str(d / "f.png")),
                       expect={"label": name.strip() or None} if plan["image"] == "good" else {})
                  for k, (name, _) in enumerate(plan["objects"])]
    return Case("voc", d, [], items)


# -- GeoJSON ----------------------------------------------------------------------------
json_values = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20), st.floats(allow_nan=False),
                                     st.text(max_size=4)),
                           lambda kids: st.one_of(st.lists(kids, max_size=3),
                                                  st.dictionaries(st.text(max_size=3), kids, max_size=3)),
                           max_leaves=8)
geo_coords = st.one_of(st.integers(-10, 120), st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([1e300]),
                       st.text(max_size=2), st.none())
point = st.lists(geo_coords, min_size=0, max_size=3)


@st.composite
def geo_features(draw) -> Any:
    kind = draw(st.sampled_from(["Point", "MultiPoint", "Polygon", "MultiPolygon", "LineString", "junk"]))
    if kind == "junk":
        return draw(json_values)
    coords = {"Point": point, "MultiPoint": st.lists(point, max_size=3),
              "Polygon": st.lists(st.lists(point, max_size=4), max_size=2),
              "MultiPolygon": st.lists(st.lists(st.lists(point, max_size=4), max_size=1), max_size=2),
              "LineString": st.lists(point, max_size=3)}[kind]
    props = draw(st.one_of(st.none(), json_values, st.fixed_dictionaries({
        "classification": st.one_of(json_values, st.fixed_dictionaries({"name": json_values})),
        "measurements": st.one_of(json_values, st.dictionaries(st.text(max_size=4), json_values, max_size=3)),
        "objectType": st.sampled_from(["detection", "cell", "annotation"])})))
    feat = {"type": "Feature", "geometry": {"type": kind, "coordinates": draw(coords)}, "properties": props}
    if draw(st.booleans()):
        feat["id"] = draw(json_values)
    return feat


@st.composite
def geojson_files(draw) -> dict:
    """A GeoJSON plan: random feature structures, odd coordinates, classes and ids."""
    feats = draw(st.lists(geo_features(), max_size=6))
    wrap = draw(st.sampled_from(["list", "collection", "feature", "weird"]))
    return {"kind": "geojson", "features": feats, "wrap": wrap, "image": draw(st.sampled_from(IMAGE_KINDS)),
            "json_copy": draw(st.integers(0, 4)) == 0, "deep": draw(st.integers(0, 14)) == 0}


def _is_region(feat: Any) -> bool:
    props = feat.get("properties") if isinstance(feat, dict) else None
    geom = feat.get("geometry") if isinstance(feat, dict) else None
    return (isinstance(props, dict) and str(props.get("objectType", "")).lower() == "annotation"
            and not (isinstance(geom, dict) and geom.get("type") in {"Point", "MultiPoint"}))


def write_geojson_case(plan: dict, root: Path) -> Case:
    d = root / "geo"
    d.mkdir()
    write_image(d / "f.png", plan["image"], 2)
    feats, wrap = plan["features"], plan["wrap"]
    if wrap == "feature" and not (feats and isinstance(feats[0], dict) and feats[0].get("type") == "Feature"):
        wrap = "list"
    data: Any = {"list": feats, "collection": {"type": "FeatureCollection", "features": feats},
                 "feature": feats[0] if feats else feats, "weird": {"features": {"a": feats}}}[wrap]
    text = json.dumps(data, allow_nan=True).replace("Infinity", "1e400").replace("NaN", "1e400")
    if plan["deep"]:
        text = "[" * 5000 + "]" * 5000
    paths = [d / "f.geojson"] + ([d / "f.json"] if plan["json_copy"] else [])
    items = []
    listed = feats[:1] if wrap == "feature" else feats
    for path in paths:
        path.write_text(text)
        for k, feat in enumerate(listed):
            if not _is_region(feat):
                ref = f"{path}#feature{k}"
                items.append(Item(refs=(ref, str(path), str(d / "f.png")), prefixes=(ref + ".",)))
    return Case("geojson", d, ["--format", "geojson"], items)


WRITERS = {"manifest": write_manifest_case, "crops": write_crops_case, "voc": write_voc_case,
           "geojson": write_geojson_case}
SOURCES = {"manifest": manifests(), "crops": crop_folders(), "voc": voc_files(), "geojson": geojson_files()}


def write_case(plan: dict, root: Path) -> Case:
    """Writes a drawn plan under the (empty or new) folder ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    return WRITERS[plan["kind"]](plan, root)


# -- CLI options --------------------------------------------------------------------------
@st.composite
def ingest_options(draw) -> list[str]:
    """Ingest options, in and out of range."""
    args: list[str] = []
    bad = draw(st.integers(0, 3)) == 0  # one case in four has one option out of range
    which = draw(st.sampled_from(["crop", "margin", "batch", "workers", "precision", "commit"]))
    values = {
        "crop": ("--crop-size", st.integers(8, 160), st.sampled_from([-5, 0, 1, 7, 4097, 100000])),
        "margin": ("--box-margin", st.floats(0, 2), st.sampled_from([-0.5, float("nan"), float("inf"), 1e9])),
        "batch": ("--batch-size", st.integers(1, 40), st.sampled_from([0, -3, 10**5, 10**9])),
        "workers": ("--workers", st.just(0), st.sampled_from([-1, 10**4])),
        "precision": ("--precision", st.sampled_from(["auto", "fp32"]), st.sampled_from(["fp8", "FP32", "", "int4"])),
        "commit": ("--commit-rows", st.sampled_from([0, 1, 3]), st.sampled_from([-1, -100])),
    }
    args: list[str] = []
    for key, (flag, good, wrong) in values.items():
        if key == which and bad:
            args += [flag, _fmt(draw(wrong))]
        elif draw(st.booleans()):
            args += [flag, _fmt(draw(good))]
    return args


where_texts = st.one_of(st.text(max_size=30), st.sampled_from([
    "1=1; DROP TABLE cells", "label = 'a'", "(((", "slide_id IN ()", " OR ".join(["x = 1"] * 3000),
    "label = 'a' OR " * 200 + "1=1", "x > 1e400", "\x00"]))


# -- invariants ---------------------------------------------------------------------------
def source_items(source) -> tuple[list, list]:
    """(cell records, failures) of a whole source; raises whatever reading it raises."""
    cells, fails = [], []
    for item in source:
        if hasattr(item, "reason"):
            fails.append(item)
        elif item.cells is not None:
            cells.extend(item.cells)
    return cells, fails


def check_source(case: Case) -> str:
    """Opens and reads ``case``'s source as the library does; checks no traceback, no loss,
    no silent change at the record level. Returns 'refused', 'ok' or 'failures'."""
    from cytostore.errors import InputError
    from cytostore.sources import CropFolderSource, open_source

    try:
        if case.fmt == "crops":
            slide = case.args[case.args.index("--slide-id") + 1] if "--slide-id" in case.args else None
            from cytostore.sources import SourceOptions

            src = CropFolderSource(case.source, SourceOptions(slide_id=slide))
        else:
            src = open_source(case.source, case.fmt)
        from cytostore.ingest.validate import validate_columns

        validate_columns(src)
    except InputError:
        return "refused"
    cells, fails = source_items(src)
    wheres = {f.where for f in fails} | {c.source_ref for c in cells}
    lost = [it for it in case.items if not it.accounted(wheres)]
    assert not lost, f"inputs neither read nor recorded as failures: {[it.refs[0] for it in lost]}"
    by_ref = {c.source_ref: c for c in cells}
    for it in case.items:
        rec = by_ref.get(it.refs[0])
        if rec is not None:
            _check_expect(it, {"slide_id": rec.slide_id, "label": rec.label})
    return "failures" if fails else "ok"


def _check_expect(item: Item, row: dict) -> None:
    for col, want in item.expect.items():
        if col in row and row[col] != want:
            raise AssertionError(f"{item.refs[0]}: {col} stored as {row[col]!r}, input {want!r} (a silent change)")


def snapshot(store: Path) -> dict:
    """What must not change: every stored row's key and embedding, and the failure records."""
    from cytostore import CellStore

    s = CellStore(store)
    t = s.cells(columns=["uid", "slide_id", "cell_id", "embedding"])
    return {"rows": sorted((r["uid"], r["slide_id"], r["cell_id"], tuple(r["embedding"])) for r in t.to_pylist()),
            "failures": sorted(map(str, s.failures().select(["where", "reason"]).to_pylist()))}


def check_ingest(case: Case, store: Path, before: dict, exit_code: int, output: str) -> None:
    """The invariants of one CLI ingest of ``case`` into ``store`` (which held ``before``)."""
    from cytostore import CellStore

    assert exit_code in {0, 1, 2}, f"exit {exit_code}: {output[-2000:]}"
    assert "Traceback" not in output and "internal error" not in output, output[-2000:]
    after = snapshot(store)  # the store still opens
    new_rows = [r for r in after["rows"] if r not in before["rows"]]
    assert set(before["rows"]) <= set(after["rows"]), "rows stored before the run changed or vanished"
    if exit_code == 2:
        assert after == before, "a refused run wrote to the store"
        return
    s = CellStore(store)
    t = s.cells(columns=["uid", "source_ref", "slide_id", "label", "image"]).to_pylist()
    new_uids = {r[0] for r in new_rows}
    stored = {r["source_ref"]: r for r in t if r["uid"] in new_uids}
    fails = s.failures().select(["where"]).column("where").to_pylist()
    wheres = set(fails) | set(stored)
    lost = [it.refs[0] for it in case.items if not it.accounted(wheres)]
    assert not lost, f"inputs neither stored nor recorded as failures: {lost}"
    if exit_code == 0:
        assert len(fails) == len(before["failures"]), "exit 0 with failures recorded"
    else:
        assert len(fails) > len(before["failures"]), "exit 1 with no failure recorded"
    for it in case.items:
        row = stored.get(it.refs[0])
        if row is not None:
            _check_expect(it, row)


def fresh_store(template: Path, dest: Path) -> Path:
    """A copy of the template store (one slide ``BASE_SLIDE``), for one case."""
    shutil.copytree(template, dest)
    return dest


def make_template(root: Path, weights: Path, encoder: str) -> Path:
    """A small store of two cells of slide ``BASE_SLIDE``, made once."""
    from cytostore import IngestConfig, ingest, open_source

    write_image(root / "base.png", "good", 99)
    m = root / "base.csv"
    m.write_text(f"image,slide_id,x,y\n{root / 'base.png'},{BASE_SLIDE},20,20\n{root / 'base.png'},{BASE_SLIDE},40,30\n")
    store = root / "template"
    ingest(open_source(m), store, IngestConfig(encoder=encoder, weights=str(weights), device="cpu", batch_size=8))
    return store
