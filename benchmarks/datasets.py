"""Manifests for the shared real data sets (used by benchmarks and the demo sample).

    python benchmarks/datasets.py chula12 --out runs/chula12.csv [--data ../shared/data]
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

CHULA_CLASSES = [
    "normal", "macrocyte", "microcyte", "spherocyte", "target_cell", "stomatocyte", "ovalocyte",
    "teardrop", "burr_cell", "schistocyte", "uncategorised", "hypochromia", "elliptocyte",
]
DEFAULT_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def chula12_rows(data: Path, fields: list[str] | None = None) -> list[dict]:
    """One row per annotated Chula RBC-12 cell: image, slide_id, x, y, label, class_id."""
    root = data / "chula-rbc12"
    labels = sorted((root / "Label").glob("*.txt"), key=lambda p: int(p.stem) if p.stem.isdigit() else p.stem)
    rows = []
    for lab in labels:
        if fields is not None and lab.stem not in fields:
            continue
        image = root / "Dataset" / f"{lab.stem}.jpg"
        for line in lab.read_text().split("\n"):
            parts = line.split()
            if len(parts) != 3:
                continue
            x, y, c = int(parts[0]), int(parts[1]), int(parts[2])
            rows.append({"image": str(image), "slide_id": f"chula-{lab.stem}", "x": x, "y": y,
                         "label": CHULA_CLASSES[c], "class_id": c})
    return rows


def write_csv(rows: list[dict], out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("dataset", choices=["chula12"])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    rows = chula12_rows(args.data)
    write_csv(rows, args.out)
    print(f"{len(rows)} cells from {len({r['slide_id'] for r in rows})} fields -> {args.out}")


if __name__ == "__main__":
    main()
