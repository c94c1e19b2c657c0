"""Slide labels for MIL: read from a CSV/Parquet file or from the store's ``slide_label`` column."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from cytostore.errors import InputError

FROM_STORE = "slide_label"  # --labels value meaning: take labels from the cell table's slide_label column
TEST_SPLIT = "test"  # rows with this split value are held out of cross-validation


@dataclass(frozen=True)
class SlideLabels:
    """One label per slide, with the groups cross-validation must keep together."""

    slide_ids: tuple[str, ...]  # slides, in file order
    labels: tuple[str, ...]  # class name per slide
    patients: tuple[str, ...]  # group per slide: patient_id when given, else the slide id
    splits: tuple[str, ...]  # "train"/"val"/"test" or "" when the file has no split column
    source: str  # the labels file, or "slide_label" for the store column

    @property
    def classes(self) -> list[str]:
        """Sorted class names."""
        return sorted(set(self.labels))

    @property
    def has_patients(self) -> bool:
        """Whether some patient holds more than one slide."""
        return len(set(self.patients)) < len(self.patients)

    def subset(self, keep: list[int]) -> "SlideLabels":
        """The rows at positions ``keep``."""
        return SlideLabels(tuple(self.slide_ids[i] for i in keep), tuple(self.labels[i] for i in keep),
                           tuple(self.patients[i] for i in keep), tuple(self.splits[i] for i in keep), self.source)

    def counts(self) -> dict[str, int]:
        """Slides per class."""
        return dict(sorted(Counter(self.labels).items()))


def read_labels_file(path: str | Path) -> SlideLabels:
    """Reads ``slide_id, label[, patient_id][, split]`` from a CSV or Parquet file.

    Raises:
        InputError: the file is missing, unreadable, lacks a column, or gives one
            slide two labels.
    """
    import pyarrow as pa

    path = Path(path)
    if not path.is_file():
        raise InputError(f"labels file {path} does not exist; give a CSV/Parquet file with columns slide_id,label "
                         f"or --labels {FROM_STORE} to use the store's slide_label column")
    try:
        if path.suffix.lower() in {".parquet", ".pq"}:
            import pyarrow.parquet as pq

            table = pq.read_table(path)
        else:
            import pyarrow.csv as pcsv

            # Read every column as text so slide ids like "007" keep their zeros.
            names = pcsv.open_csv(path).schema.names
            table = pcsv.read_csv(path, convert_options=pcsv.ConvertOptions(
                column_types={n: pa.string() for n in names}, strings_can_be_null=True))
    except Exception as e:
        kind = "Parquet" if path.suffix.lower() in {".parquet", ".pq"} else "CSV"
        raise InputError(f"labels file {path}: cannot read it as {kind} ({e})") from e
    missing = [c for c in ("slide_id", "label") if c not in table.column_names]
    if missing:
        raise InputError(f"labels file {path} lacks column(s) {missing}; it has {table.column_names} "
                         "(needed: slide_id, label; optional: patient_id, split)")

    def col(name: str) -> list[str | None]:
        if name not in table.column_names:
            return [None] * table.num_rows
        return [None if v is None else str(v).strip() for v in table.column(name).to_pylist()]

    rows: dict[str, tuple[str, str | None, str]] = {}
    for i, (s, lab, pat, split) in enumerate(zip(col("slide_id"), col("label"), col("patient_id"), col("split"))):
        if not s:
            raise InputError(f"labels file {path}, row {i + 2}: empty slide_id")
        if not lab:
            continue  # an unlabelled slide takes no part in training
        split = (split or "").lower()
        if s in rows and rows[s][0] != lab:
            raise InputError(f"labels file {path}: slide {s!r} has two labels ({rows[s][0]!r} and {lab!r}); keep one")
        rows[s] = (lab, pat or None, split)
    return _build(rows, str(path))


def labels_from_store(slide_labels: dict[str, str | None], where: str) -> SlideLabels:
    """Labels from the cell table's ``slide_label`` column (one value per slide).

    Args:
        slide_labels: slide id -> its slide_label (None when unlabelled).
        where: the store, for messages.
    """
    rows = {s: (lab, None, "") for s, lab in sorted(slide_labels.items()) if lab}
    if not rows:
        raise InputError(f"no slide in {where} has a slide_label; ingest with --labels-from-folders or give a "
                         "labels file (slide_id,label)")
    return _build(rows, FROM_STORE)


def _build(rows: dict[str, tuple[str, str | None, str]], source: str) -> SlideLabels:
    if not rows:
        raise InputError(f"labels {source}: no labelled slide")
    ids = tuple(rows)
    return SlideLabels(ids, tuple(rows[s][0] for s in ids), tuple(rows[s][1] or f"slide:{s}" for s in ids),
                       tuple(rows[s][2] for s in ids), source)


def check_against_store(labels: SlideLabels, store_slides: set[str], where: str) -> None:
    """Raises InputError naming the labelled slides that are not in the store."""
    absent = [s for s in labels.slide_ids if s not in store_slides]
    if absent:
        shown = ", ".join(repr(s) for s in absent[:10]) + (f" and {len(absent) - 10} more" if len(absent) > 10 else "")
        raise InputError(f"labels {labels.source} name {len(absent)} slide(s) not in {where}: {shown}; "
                         "fix the slide ids (see `cytostore slides`) or ingest those slides first")


def check_cross_validatable(labels: SlideLabels, folds: int) -> None:
    """Raises InputError when the labels cannot be split into ``folds`` grouped folds."""
    if folds < 2:
        raise InputError(f"--folds must be at least 2, got {folds}")
    classes = labels.classes
    if len(classes) < 2:
        raise InputError(f"labels {labels.source}: only one class ({classes[0]!r}); MIL needs at least two")
    groups_per_class: dict[str, set[str]] = {}
    slides_per_class: dict[str, list[str]] = {}
    for s, lab, g in zip(labels.slide_ids, labels.labels, labels.patients):
        groups_per_class.setdefault(lab, set()).add(g)
        slides_per_class.setdefault(lab, []).append(s)
    for lab in classes:
        if len(slides_per_class[lab]) == 1:
            raise InputError(f"class {lab!r} has a single slide ({slides_per_class[lab][0]!r}): it cannot be "
                             "cross-validated, since it would be missing from either training or test; add "
                             "slides of that class, or drop or merge it in the labels")
        if len(groups_per_class[lab]) == 1:
            raise InputError(f"class {lab!r}: all its {len(slides_per_class[lab])} slides belong to one patient, so "
                             "it cannot be cross-validated without splitting the patient; add another patient")
    n_groups = len(set(labels.patients))
    if n_groups < folds:
        raise InputError(f"{folds} folds asked for but only {n_groups} slides/patients are labelled; "
                         f"use --folds {n_groups} or fewer")
