"""`cytostore ingest`: cells from a source into the store."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cli.common import Progress, QuietOpt, emit_json, handle_errors
from cytostore.imaging import CropPolicy
from cytostore.errors import InputError
from cytostore.ingest import IngestConfig, IngestInterrupted, ingest
from cytostore.sources import (FORMATS, CropFolderSource, FieldFolderSource, GeoJsonSource, SourceOptions,
                               detect_format, open_source)


def ingest_cmd(
    source: Annotated[Path, typer.Argument(help="Manifest (CSV/Parquet), folder of crops or fields, VOC or GeoJSON annotations, or slides.")],
    store: Annotated[Path, typer.Option("--store", "-s", help="Store folder; created when absent.")],
    fmt: Annotated[Optional[str], typer.Option("--format", help=f"One of {', '.join(FORMATS)}; guessed when unambiguous.")] = None,
    encoder: Annotated[str, typer.Option(help="Encoder: a `cytostore encoders` name, a timm architecture, or hf-hub:org/model.")] = "efficientnet_lite0",
    weights: Annotated[Optional[Path], typer.Option(help="Local checkpoint to load into the encoder (safetensors preferred).")] = None,
    table: Annotated[Optional[str], typer.Option(help="Cell-table name; default derived from --encoder.")] = None,
    crop_size: Annotated[int, typer.Option(help="Crop side in level-0 pixels around a cell centre (boxes get more when larger).")] = 64,
    box_margin: Annotated[float, typer.Option(help="Context around a cell box, as a fraction of its side.")] = 0.15,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    precision: Annotated[str, typer.Option(help="auto (bf16/fp16 on GPU, fp32 on CPU), fp32, bf16 or fp16.")] = "auto",
    batch_size: Annotated[int, typer.Option(help="Cells per forward pass.")] = 64,
    workers: Annotated[int, typer.Option(help="Worker processes reading and cropping images.")] = 0,
    runtime: Annotated[str, typer.Option(help="Encoder runtime: auto (CPU: the table's runtime, else ONNX Runtime when installed and within tolerance of PyTorch; GPU: torch), torch, onnx or openvino (the \\[cpu] extra). See docs/runtime.md.")] = "auto",
    threads: Annotated[int, typer.Option(help="Intra-op threads of the runtime (0 = the cores available).")] = 0,
    input_size: Annotated[int, typer.Option(help="Resize crops to this side instead of the encoder's own (e.g. 128 for EfficientNet-Lite: ~3x less compute); part of the table's identity.")] = 0,
    features: Annotated[str, typer.Option(help="final (the encoder's pooled output) or multilayer (its later stages pooled too, concatenated in one forward: lite0 2,024-d). Part of the identity; docs/embeddings.md.")] = "final",
    tta: Annotated[int, typer.Option(help="Dihedral test-time augmentation: 1 (off), 4 (mean over 4 rotations) or 8 (and their mirror images); costs 4x / 8x. Part of the identity.")] = 1,
    zoom: Annotated[int, typer.Option(help="Scales: 1 (the crop) or 2 (also its central half enlarged to the input size, features concatenated: the cell's detail beside its context); costs 2x. Part of the identity.")] = 1,
    stain: Annotated[str, typer.Option(help="Colour-normalise crops before the encoder: none, reinhard (LAB mean/std) or macenko (stain vectors), matched per image to a reference. Part of the identity.")] = "none",
    stain_reference: Annotated[Optional[Path], typer.Option(help="--stain reference image (default: a seeded sample of 512 thumbnails of the store's first cell table; a table keeps its reference).")] = None,
    morphometrics: Annotated[bool, typer.Option("--morphometrics", help="Measure each cell (area, perimeter, eccentricity, solidity, pallor, colour, OD...) into the morph_* columns.")] = False,
    float32: Annotated[bool, typer.Option("--float32", help="Store embeddings as float32 (default float16).")] = False,
    slide_id: Annotated[Optional[str], typer.Option(help="Slide id for every cell (folders of crops).")] = None,
    labels_from_folders: Annotated[bool, typer.Option(help="Parent folder = cell label (crops) or slide label (fields).")] = False,
    slide_from: Annotated[str, typer.Option(help="Folders: where slide ids come from. Crops: auto (--slide-id, else the parent folder; the root folder with --labels-from-folders), parent (folder above the crop, not the label folder), path (relative folder path, parts joined by ~), root, fixed (--slide-id). Fields: auto (--slide-id or file stem), stem, path (relative path without suffix).")] = "auto",
    slide_prefix: Annotated[str, typer.Option(help="Folders: put before every slide id (e.g. scope2-, when every field is 1.jpg).")] = "",
    encoding: Annotated[str, typer.Option(help="Text encoding of a CSV manifest (e.g. latin1); a cell that is not valid text in it is a recorded failure.")] = "utf8",
    image: Annotated[Optional[Path], typer.Option(help="Image or slide a single GeoJSON file belongs to.")] = None,
    within_annotations: Annotated[bool, typer.Option(help="GeoJSON: keep only cells inside an annotation polygon (a QuPath region).")] = False,
    min_diameter: Annotated[float, typer.Option(help="Detector: smallest cell diameter in pixels (0 = from the image).")] = 0.0,
    max_diameter: Annotated[float, typer.Option(help="Detector: largest cell diameter in pixels (0 = from the image).")] = 0.0,
    engine: Annotated[str, typer.Option(help="local (this process) or ray (a Ray Data pipeline; needs the \\[scale] extra).")] = "local",
    address: Annotated[Optional[str], typer.Option(help="--engine ray: the Ray cluster to join (default: start a local one).")] = None,
    gpus_per_worker: Annotated[float, typer.Option(help="--engine ray: GPU share per encoder actor (0 = one GPU each when the cluster has GPUs).")] = 0.0,
    commit_rows: Annotated[int, typer.Option(help="Commit once this many cells are pending (0 = 65,536).")] = 0,
    commit_seconds: Annotated[float, typer.Option(help="... or this many seconds after the last commit (0 = 30).")] = 0.0,
    wait: Annotated[bool, typer.Option(help="Wait for another ingest writing the same table instead of exiting.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON summary as the last line.")] = False,
    quiet: Annotated[bool, QuietOpt] = False,
) -> None:
    """Find, crop and embed every cell of SOURCE into the store. Re-running resumes."""
    with handle_errors():
        detector = None
        if min_diameter or max_diameter:
            from cytostore.detect import DetectorParams

            detector = DetectorParams(min_diameter=min_diameter, max_diameter=max_diameter)
        options = SourceOptions(slide_id=slide_id, labels_from_folders=labels_from_folders, detector=detector,
                                encoding=encoding)
        src = _open(source, fmt, options, image, slide_from, slide_prefix, within_annotations)
        config = IngestConfig(
            encoder=encoder, weights=str(weights) if weights else None, table=table,
            crop=CropPolicy(crop_size=crop_size, box_margin=box_margin), detector=detector, device=device,
            precision=precision, batch_size=batch_size, workers=workers, runtime=runtime, threads=threads,
            input_size=input_size, features=features, tta=tta, zoom=zoom, stain=stain,
            stain_reference=str(stain_reference) if stain_reference else None, morphometrics=morphometrics,
            embedding_dtype="float32" if float32 else "float16", engine=engine, ray_address=address,
            gpus_per_worker=gpus_per_worker, commit_rows=commit_rows, commit_seconds=commit_seconds,
            wait_for_lock=wait,
        )
        total_cells = len(src) if hasattr(src, "__len__") else None
        total_images = getattr(src, "n_images", None)
        unit = "cells" if total_cells else "images"
        # Cells count as added once committed, so the last refresh during the run can lag:
        # the final line takes its counts from the finished report.
        with Progress("ingest", unit, total_cells or total_images, quiet=quiet or as_json) as bar:

            def on_progress(cells: int, images: int, report) -> None:
                bar.update(cells if total_cells else images, added=report.cells_added,
                           skipped=report.cells_skipped, failed=report.cells_failed)

            try:
                report = ingest(src, store, config, progress=on_progress)
            except IngestInterrupted as e:
                r = e.report
                bar.close(added=r.cells_added, skipped=r.cells_skipped, failed=r.cells_failed)
                typer.echo(f"interrupted: {r.cells_added} cells added in this run are kept in table {r.table} "
                           f"({r.cells_failed} failures recorded); run the same command again to resume "
                           "(stored cells are skipped)", err=True)
                raise typer.Exit(130) from None
            bar.close(added=report.cells_added, skipped=report.cells_skipped, failed=report.cells_failed)
    if as_json:
        emit_json(report.to_dict())
    else:
        typer.echo(
            f"table {report.table}: {report.cells_added} cells added, {report.cells_skipped} already stored, "
            f"{report.cells_failed} failed, {report.slides} slides, {report.seconds:.1f} s "
            f"({report.cells_per_second:.1f} cells/s)"
        )
        for f in report.failures:
            typer.echo(f"  failed [{f['stage']}] {f['where']}: {f['reason']}")
        for note in report.notes:
            typer.echo(f"  note: {note}")
        if report.cells_failed:
            typer.echo(f"  {report.cells_failed} failures are recorded; see `cytostore info --store {store}`")
    if report.cells_failed:
        raise typer.Exit(1)


def _open(source: Path, fmt: str | None, options: SourceOptions, image: Path | None, slide_from: str,
          slide_prefix: str, within_annotations: bool):
    """The source, with the options that only some formats take."""
    kind = fmt or detect_format(source)
    if kind == "crops":
        return CropFolderSource(source, options, slide_from=slide_from, slide_prefix=slide_prefix)
    if kind in {"fields", "slides"}:
        return FieldFolderSource(source, options, slides=kind == "slides", slide_from=slide_from,
                                 slide_prefix=slide_prefix)
    if slide_from != "auto" or slide_prefix:
        raise InputError(f"--slide-from and --slide-prefix are for folders of crops, fields or slides, not {kind}; "
                         "a manifest names its slides in its slide_id column")
    if kind == "geojson":
        return GeoJsonSource(source, options, image=image, within_annotations=within_annotations)
    if within_annotations:
        raise InputError(f"--within-annotations is for GeoJSON sources, not {kind}")
    return open_source(source, kind, options, image=image)
