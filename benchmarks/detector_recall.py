"""Benchmark of cytostore.detect on the shared blood-smear collections.

Annotated cell centres of chula-rbc12 are matched one-to-one (greedy, nearest
first) to detection centroids within half the median detected (equivalent)
diameter of that field; the
script prints recall, precision, per-class recall and mean seconds per field,
then mean detections per field on chula-rbc-diseases and RBC+WBC box-centre
recall on bccd. The last line is a JSON summary.

Usage: python benchmarks/detector_recall.py [--data DIR] [--limit N]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cytostore.detect import DetectorParams, detect_cells  # noqa: E402

DENSE = 60  # a field with this many annotated cells is treated as fully annotated
CLASSES = [
    "normal", "macrocyte", "microcyte", "spherocyte", "target", "stomatocyte",
    "ovalocyte", "teardrop", "burr", "schistocyte", "uncategorised",
    "hypochromia", "elliptocyte",
]


def load_rgb(path: Path) -> np.ndarray:
    """Reads an image file as HxWx3 uint8 RGB."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def match(truth: np.ndarray, pred: np.ndarray, radius: float) -> np.ndarray:
    """Greedy one-to-one matching; returns a bool array over truth points."""
    hit = np.zeros(len(truth), dtype=bool)
    if len(truth) == 0 or len(pred) == 0:
        return hit
    d = np.hypot(truth[:, None, 0] - pred[None, :, 0], truth[:, None, 1] - pred[None, :, 1])
    ti, pj = np.nonzero(d <= radius)
    used = np.zeros(len(pred), dtype=bool)
    for k in np.argsort(d[ti, pj], kind="stable"):
        if not hit[ti[k]] and not used[pj[k]]:
            hit[ti[k]] = used[pj[k]] = True
    return hit


def centres_and_radius(dets) -> tuple[np.ndarray, float]:
    """Detection centroids (N x 2) and half the median equivalent diameter."""
    pts = np.array([(d.x, d.y) for d in dets], dtype=float).reshape(-1, 2)
    areas = np.array([d.area for d in dets], dtype=float)
    radius = float(np.sqrt(np.median(areas) / np.pi)) if len(areas) else 0.0
    return pts, radius


def run_chula(root: Path, limit: int | None, params: DetectorParams) -> dict:
    """Recall/precision of annotated centres on chula-rbc12, plus timing."""
    labels = sorted((root / "Label").glob("*.txt"), key=lambda p: int(p.stem))
    labels = labels[:limit] if limit else labels
    n_true = n_hit = n_pred = 0
    dense = [0, 0, 0]  # fields, matched, detections on fields with >= DENSE annotations
    cls_true = np.zeros(len(CLASSES), int)
    cls_hit = np.zeros(len(CLASSES), int)
    seconds, cpu = [], []
    for lab in labels:
        if lab.stat().st_size == 0:
            continue
        rows = np.loadtxt(lab, ndmin=2)
        image = load_rgb(root / "Dataset" / f"{lab.stem}.jpg")
        t0, c0 = time.perf_counter(), time.process_time()
        dets = detect_cells(image, params)
        seconds.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        pred, radius = centres_and_radius(dets)
        hit = match(rows[:, :2], pred, radius)
        cls = rows[:, 2].astype(int)
        np.add.at(cls_true, cls, 1)
        np.add.at(cls_hit, cls, hit.astype(int))
        n_true += len(rows)
        n_hit += int(hit.sum())
        n_pred += len(pred)
        if len(rows) >= DENSE:
            dense[0] += 1
            dense[1] += int(hit.sum())
            dense[2] += len(pred)
    present = [c for c in range(len(CLASSES)) if cls_true[c]]
    return {
        "fields": len(seconds),
        "annotated": n_true,
        "detections": n_pred,
        "recall": n_hit / max(n_true, 1),
        "precision": n_hit / max(n_pred, 1),
        "dense_fields": dense[0],
        "dense_precision": dense[1] / max(dense[2], 1),
        "per_class_recall": {
            CLASSES[c]: round(cls_hit[c] / cls_true[c], 4) for c in present
        },
        "per_class_count": {CLASSES[c]: int(cls_true[c]) for c in present},
        "sec_per_field": float(np.mean(seconds)) if seconds else 0.0,
        "cpu_sec_per_field": float(np.mean(cpu)) if cpu else 0.0,
    }


def run_diseases(root: Path, limit: int, params: DetectorParams) -> dict:
    """Mean detections and timing on the first chula-rbc-diseases fields."""
    files = sorted(root.glob("*/*.JPG"))[:limit]
    counts, seconds, cpu = [], [], []
    for f in files:
        image = load_rgb(f)
        t0, c0 = time.perf_counter(), time.process_time()
        counts.append(len(detect_cells(image, params)))
        seconds.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {
        "fields": len(files),
        "mean_detections": float(np.mean(counts)) if counts else 0.0,
        "sec_per_field": float(np.mean(seconds)) if seconds else 0.0,
        "cpu_sec_per_field": float(np.mean(cpu)) if cpu else 0.0,
    }


def run_bccd(root: Path, limit: int | None, params: DetectorParams) -> dict:
    """Mean detections and RBC+WBC box-centre recall on bccd."""
    files = sorted((root / "Annotations").glob("*.xml"))
    files = files[:limit] if limit else files
    n_true = n_hit = n_pred = 0
    for f in files:
        img = root / "JPEGImages" / f"{f.stem}.jpg"
        if not img.exists():
            continue
        boxes = []
        for obj in ET.parse(f).getroot().iter("object"):
            if obj.findtext("name", "").strip() in ("RBC", "WBC"):
                bb = obj.find("bndbox")
                x0, y0, x1, y1 = (float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
                boxes.append(((x0 + x1) / 2, (y0 + y1) / 2))
        dets = detect_cells(load_rgb(img), params)
        pred, radius = centres_and_radius(dets)
        hit = match(np.array(boxes, float).reshape(-1, 2), pred, radius)
        n_true += len(boxes)
        n_hit += int(hit.sum())
        n_pred += len(pred)
    return {
        "fields": len(files),
        "mean_detections": n_pred / max(len(files), 1),
        "rbc_wbc_recall": n_hit / max(n_true, 1),
    }


def main(argv: list[str] | None = None) -> int:
    """Runs the benchmark and prints text lines and a final JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO / ".." / "shared" / "data")
    parser.add_argument("--limit", type=int, default=None, help="max fields per collection")
    args = parser.parse_args(argv)
    data = args.data.resolve()
    if not data.is_dir():
        parser.error(f"data folder not found: {data}")
    params = DetectorParams()

    chula = run_chula(data / "chula-rbc12", args.limit, params)
    print(f"chula-rbc12: {chula['fields']} fields, {chula['annotated']} annotated cells, "
          f"{chula['detections']} detections")
    print(f"chula-rbc12: recall {chula['recall']:.4f}  precision {chula['precision']:.4f}  "
          f"mean {chula['sec_per_field']:.4f} s/field "
          f"(CPU {chula['cpu_sec_per_field']:.4f} s)")
    print(f"chula-rbc12: precision {chula['dense_precision']:.4f} on the {chula['dense_fields']} "
          f"fields with >= {DENSE} annotated cells (most fields are only partly annotated)")
    for name, r in chula["per_class_recall"].items():
        print(f"  recall {name:<14} {r:.4f}  (n={chula['per_class_count'][name]})")
    dis = run_diseases(data / "chula-rbc-diseases", min(args.limit or 20, 20), params)
    print(f"chula-rbc-diseases: {dis['fields']} fields, mean {dis['mean_detections']:.1f} "
          f"detections/field, mean {dis['sec_per_field']:.4f} s/field "
          f"(CPU {dis['cpu_sec_per_field']:.4f} s)")
    bccd = run_bccd(data / "bccd", args.limit, params)
    print(f"bccd: {bccd['fields']} fields, mean {bccd['mean_detections']:.1f} detections/field, "
          f"RBC+WBC centre recall {bccd['rbc_wbc_recall']:.4f}")
    print(json.dumps({"chula_rbc12": chula, "chula_rbc_diseases": dis, "bccd": bccd}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
