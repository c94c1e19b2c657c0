"""`cytostore map`, `cytostore mosaic` and `cytostore qc`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from cli.common import QuietOpt, emit_json, handle_errors

StoreOption = Annotated[Path, typer.Option("--store", "-s", help="Store folder.")]
EncoderOption = Annotated[Optional[str], typer.Option(help="Encoder table; default the only (or default) one.")]
WhereOption = Annotated[Optional[str], typer.Option(help="SQL filter on the cell table, e.g. \"label = 'normal'\".")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object as the last line.")]
QuietOption = Annotated[bool, QuietOpt]


def _say(enabled: bool):
    # Stage messages (a few per command) go to standard error on a terminal and off one alike.
    return (lambda msg: typer.echo(msg, err=True)) if enabled else None


def _umap_line(meta: dict[str, Any]) -> str:
    if meta.get("reused"):
        return f"UMAP coordinates reused (table version {meta.get('table_version')}, computed {meta.get('created')})"
    sec = meta.get("seconds", {})
    return (f"UMAP computed for {meta.get('cells')} cells: fitted on {meta.get('fitted_cells')}, projected "
            f"{meta.get('projected_cells')} ({sec.get('fit_s', 0):.1f} s fit, {sec.get('project_s', 0):.1f} s "
            f"projection); stored for table version {meta.get('table_version')}")


def map_cmd(
    store: StoreOption,
    out: Annotated[Path, typer.Option("--out", "-o", help="FILE.png (matplotlib) or FILE.html (interactive, self-contained).")],
    color_by: Annotated[str, typer.Option("--color-by", help="label, slide_id, prediction:NAME or any column of the cell table.")] = "label",
    where: WhereOption = None,
    sample: Annotated[Optional[int], typer.Option(help="Draw at most N cells (HTML default 20000).")] = None,
    encoder: EncoderOption = None,
    seed: Annotated[int, typer.Option(help="Seed of the UMAP fit sample, UMAP itself and the drawing sample.")] = 0,
    fit_sample: Annotated[int, typer.Option(help="Fit UMAP on at most N cells; project the others.")] = 50_000,
    force: Annotated[bool, typer.Option("--force", help="Recompute the UMAP coordinates even when stored ones are current.")] = False,
    as_json: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Draw a UMAP map of the embeddings (coordinates are stored and reused)."""
    from cytostore.maps import UmapParams, make_map

    with handle_errors():
        result = make_map(store, out, color_by=color_by, where=where, sample=sample, encoder=encoder, seed=seed,
                          params=UmapParams(fit_sample=fit_sample, seed=seed), force=force, progress=_say(not (as_json or quiet)))
    if as_json:
        emit_json(result)
        return
    typer.echo(_umap_line(result["umap"]))
    typer.echo(f"map of {result['points']} of {result['cells_matching']} cells, coloured by {color_by}: {result['out']}")


def mosaic_cmd(
    store: StoreOption,
    out: Annotated[Path, typer.Option("--out", "-o", help="FILE.png")],
    grid: Annotated[int, typer.Option(help="Tiles per side of the grid laid over the UMAP plane.")] = 24,
    where: WhereOption = None,
    encoder: EncoderOption = None,
    tile: Annotated[int, typer.Option(help="Tile side in pixels.")] = 64,
    colors: Annotated[int, typer.Option(help="Quantise the PNG to N colours to keep it small (0 = full colour).")] = 0,
    seed: Annotated[int, typer.Option(help="Seed of the UMAP fit (when coordinates must be computed).")] = 0,
    fit_sample: Annotated[int, typer.Option(help="Fit UMAP on at most N cells; project the others.")] = 50_000,
    as_json: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Draw a mosaic map: one representative cell thumbnail per tile of a grid over the UMAP plane."""
    from cytostore.maps import UmapParams, make_mosaic

    with handle_errors():
        result = make_mosaic(store, out, grid=grid, where=where, encoder=encoder, seed=seed, tile_px=tile,
                             colors=colors, params=UmapParams(fit_sample=fit_sample, seed=seed),
                             progress=_say(not (as_json or quiet)))
    if as_json:
        emit_json(result)
        return
    typer.echo(_umap_line(result["umap"]))
    typer.echo(f"mosaic {grid}x{grid}: {result['tiles']} tiles filled from {result['cells_matching']} cells, "
               f"{result['width']}x{result['height']} px: {result['out']}")


def qc_cmd(
    store: StoreOption,
    encoder: Annotated[Optional[str], typer.Option(help="Encoder table; default every table.")] = None,
    min_cells_per_slide: Annotated[int, typer.Option(help="Slides with fewer cells are left out of slide prediction.")] = 20,
    max_slides: Annotated[int, typer.Option(help="At most N slides (drawn at random) in slide prediction.")] = 100,
    max_cells: Annotated[int, typer.Option(help="Check at most N cells (uniform random sample).")] = 50_000,
    listed: Annotated[int, typer.Option(help="How many duplicate pairs and outliers to list.")] = 20,
    as_json: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Batch-effect QC (slide vs label predictability), near-duplicate and outlier cells."""
    from cytostore.qc import QcConfig, run_qc

    config = QcConfig(min_cells_per_slide=min_cells_per_slide, max_slides=max_slides, max_cells=max_cells,
                      listed=listed)
    with handle_errors():
        report = run_qc(store, encoder, config, progress=_say(not (as_json or quiet)))
    if as_json:
        emit_json(report)
        return
    for t in report["tables"]:
        typer.echo(f"table {t['table']} (version {t['table_version']}): {t['cells_used']} of {t['cells']} cells")
        for key, name in (("slide", "slide"), ("label", "label"), ("slide_within_label", "slide within label")):
            r = t.get(key)
            if not r or r.get("accuracy") is None:
                typer.echo(f"  {name}: not measured" + (f" ({r['note']})" if r and r.get("note") else ""))
                continue
            extra = f" [{r['policy']}]" if r.get("policy") else ""
            extra += f" [label {r['label']}]" if r.get("label") else ""
            typer.echo(f"  predict {name}: accuracy {r['accuracy']:.3f} (chance {r['chance']:.3f}), balanced "
                       f"{r['balanced_accuracy']:.3f} (chance {r['balanced_chance']:.3f}), {r['classes']} classes, "
                       f"{r['cells']} cells{extra}")
        typer.echo(f"  {t['verdict']}")
        d = t["duplicates"]
        typer.echo(f"  near-duplicates (cosine > {d['threshold']}): {d['pairs']} pairs ({d['pairs_same_slide']} within "
                   f"a slide), {d['cells']} cells")
        for p in d["listed"]:
            typer.echo(f"    {p['a']['slide_id']}/{p['a']['cell_id']} ~ {p['b']['slide_id']}/{p['b']['cell_id']} "
                       f"cosine {p['cosine']:.4f}")
        for key, o in t["outliers"].items():
            if o is None:
                continue
            typer.echo(f"  outliers by {o['score']}: {o['count']} (threshold {o['threshold']}, median {o['median']})")
            for c in o["listed"]:
                typer.echo(f"    {c['slide_id']}/{c['cell_id']} uid {c['uid']} score {c['score']} z {c['z']}")


def overlay_cmd(
    store: StoreOption,
    slide: Annotated[str, typer.Option("--slide", help="Slide (or field) id; see `cytostore slides`.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="FILE.png")],
    predictions: Annotated[Optional[str], typer.Option("--predictions", help="Colour by this prediction set "
                                                                             "(fewshot predict, cluster).")] = None,
    attention: Annotated[Optional[Path], typer.Option("--attention", help="Colour by the attention of this MIL "
                                                                          "model folder (mil train).")] = None,
    encoder: EncoderOption = None,
    image: Annotated[Optional[str], typer.Option("--image", help="The image to draw on, when the slide spans several.")] = None,
    max_side: Annotated[int, typer.Option("--max-side", help="Longest side of the drawn image, pixels (whole "
                                                              "slides: the pyramid level that fits).")] = 2048,
    as_json: JsonOption = False,
) -> None:
    """Draw a slide's stored detections on its image, coloured by label, prediction or attention (PNG)."""
    from cytostore.maps.overlay import overlay

    with handle_errors():
        r = overlay(store, slide, out, predictions=predictions, attention=attention, encoder=encoder, image=image,
                    max_side=max_side)
    if as_json:
        emit_json(r)
        return
    read = r["read"]
    where = (f"OpenSlide level {read['level']} (downsample {read['downsample']:g})" if read["kind"] == "slide"
             else f"{read['size'][0]}x{read['size'][1]} px")
    typer.echo(f"{r['cells']} cells of {r['slide_id']} drawn on {r['image']} ({where}), coloured by {r['color_by']}: "
               f"{r['out']}")
    if r["cells_outside_image"]:
        typer.echo(f"  {r['cells_outside_image']} cells lie outside the image drawn")


def register(app: typer.Typer) -> None:
    """Adds `map`, `mosaic`, `qc` and `overlay` to the app."""
    app.command("map")(map_cmd)
    app.command("mosaic")(mosaic_cmd)
    app.command("qc")(qc_cmd)
    app.command("overlay")(overlay_cmd)
