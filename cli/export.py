"""`cytostore export geojson|anndata|h5`: the store out to QuPath, scanpy and CLAM/TRIDENT."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Callable, List, Optional

import typer

from cli.common import emit_json, handle_errors, progress_callback

export_app = typer.Typer(help="Write cells out for QuPath (GeoJSON), scanpy (h5ad) or CLAM/TRIDENT (h5). "
                              "See docs/export.md.", no_args_is_help=True)

StoreOption = Annotated[Path, typer.Option("--store", "-s", help="Store folder.")]
TableOption = Annotated[Optional[str], typer.Option("--table", "--encoder", help="Cell table (encoder name); default the only (or default) one.")]
SlidesOption = Annotated[Optional[List[str]], typer.Option("--slide", help="Export this slide (repeat for several); default every slide.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object as the last line.")]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="No progress on standard error.")]

def progress(unit: str, quiet: bool, what: str = "export") -> Callable[[int, int, str], None] | None:
    """A (done, total, what) callback through the shared ``cli.common.Progress`` (None when quiet)."""
    return progress_callback(what, unit, quiet)


@export_app.command("geojson")
def geojson_cmd(
    store: StoreOption,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder: one <slide_id>.geojson per slide.")],
    slide: SlidesOption = None,
    predictions: Annotated[Optional[str], typer.Option(help="Classify each cell by this prediction set (fewshot predict or cluster) instead of its label; adds score and margin.")] = None,
    attention: Annotated[Optional[Path], typer.Option(help="MIL model folder (mil train): add each cell's attention as a measurement.")] = None,
    encoder: TableOption = None,
    quiet: QuietOption = False,
    as_json: JsonOption = False,
) -> None:
    """QuPath detections: one feature per cell (box polygon or centre point), classified by label or prediction."""
    from cytostore.export import export_geojson

    with handle_errors():
        r = export_geojson(store, out, slides=slide, predictions=predictions, attention=attention, encoder=encoder,
                           progress=progress("slides", quiet, "export geojson"))
    if as_json:
        emit_json(r)
        return
    by = f"prediction set {predictions}" if predictions else "stored label"
    typer.echo(f"{r['cells']} cells of {r['slides']} slides written to {r['out']}/<slide_id>.geojson "
               f"(table {r['table']}, classified by {by}" + (", with MIL attention" if attention else "") + ")")
    if predictions and r["unpredicted_cells"]:
        typer.echo(f"{r['unpredicted_cells']} cells have no prediction in {predictions}: left unclassified")
    typer.echo("In QuPath: open the image, then File > Import objects from file (or drag the .geojson onto it).")


@export_app.command("anndata")
def anndata_cmd(
    store: StoreOption,
    out: Annotated[Path, typer.Option("--out", "-o", help="The .h5ad file to write.")],
    table: TableOption = None,
    where: Annotated[Optional[str], typer.Option(help="SQL filter on the cell table, e.g. \"label != 'uncategorised'\".")] = None,
    as_json: JsonOption = False,
) -> None:
    """scanpy/AnnData: obs = the cell table, obsm X_<table> = embeddings (float32), X_umap when stored."""
    from cytostore.export import export_anndata

    with handle_errors():
        r = export_anndata(store, out, encoder=table, where=where)
    if as_json:
        emit_json(r)
        return
    typer.echo(f"{r['cells']} cells x {r['dim']} dims of table {r['table']} (version {r['table_version']}) "
               f"written to {r['out']}: obsm {', '.join(r['obsm'])}")
    if "X_umap" not in r["obsm"]:
        typer.echo(f"no X_umap: {r['umap']}")


@export_app.command("h5")
def h5_cmd(
    store: StoreOption,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder: one <slide_id>.h5 per slide.")],
    table: TableOption = None,
    slide: SlidesOption = None,
    quiet: QuietOption = False,
    as_json: JsonOption = False,
) -> None:
    """CLAM/TRIDENT/STAMP: one <slide_id>.h5 per slide with features (N x D float32) and coords (crop top-left)."""
    from cytostore.export import export_h5

    with handle_errors():
        r = export_h5(store, out, encoder=table, slides=slide, progress=progress("slides", quiet, "export h5"))
    if as_json:
        emit_json(r)
        return
    typer.echo(f"{r['cells']} cells of {r['slides']} slides written to {r['out']}/<slide_id>.h5 "
               f"(table {r['table']} version {r['table_version']}, encoder {r['encoder']})")
