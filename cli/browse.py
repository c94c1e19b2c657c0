"""`cytostore slides`, `cytostore cells` and `cytostore cluster`."""

from __future__ import annotations

from typing import Annotated, List, Optional

import typer

from cli.common import echo_rows, emit_json, handle_errors
from cli.export import JsonOption, QuietOption, StoreOption, TableOption, progress


def slides_cmd(store: StoreOption, encoder: TableOption = None, as_json: JsonOption = False) -> None:
    """List every slide: cells, label counts, slide label, image(s), failures."""
    from cytostore.export import list_slides

    with handle_errors():
        r = list_slides(store, encoder=encoder)
    if as_json:
        emit_json(r)
        return
    typer.echo(f"table {r['table']} (version {r['table_version']}): {len(r['slides'])} slides")
    typer.echo(f"{'slide_id':<24}{'cells':>7}  {'slide_label':<16}labels")
    for row in r["slides"]:
        slab = row["slide_label"] or ("/".join(row["slide_labels"]) if row["slide_labels"] else "-")
        labels = ", ".join(f"{k} {v}" for k, v in row["labels"].items()) or "-"
        fails = f"  [{row['failures']} failed]" if row["failures"] else ""
        typer.echo(f"{row['slide_id']:<24}{row['cells']:>7}  {slab:<16}{labels}{fails}")


def cells_cmd(
    store: StoreOption,
    slide: Annotated[str, typer.Option("--slide", help="The slide whose cells to list.")],
    columns: Annotated[Optional[List[str]], typer.Option("--columns", "-c", help="Columns to show (repeat, or comma-separated); default all but embedding and thumbnail.")] = None,
    limit: Annotated[int, typer.Option(help="Show at most N cells (0 = all).")] = 50,
    encoder: TableOption = None,
    as_json: JsonOption = False,
) -> None:
    """List the cells of one slide (tab-separated, with a header)."""
    from cytostore.errors import InputError
    from cytostore.export import slide_cells

    cols = [c.strip() for part in (columns or []) for c in part.split(",") if c.strip()] or None
    with handle_errors():
        if limit < 0:
            raise InputError(f"--limit must be 0 (all) or more, got {limit}")
        t, total = slide_cells(store, slide, columns=cols, limit=limit or None, encoder=encoder)
    rows = t.to_pylist()
    if as_json:
        emit_json({"slide_id": slide, "cells": total, "shown": len(rows), "columns": t.column_names, "rows": rows})
        return
    echo_rows(t.column_names, rows, total, f"cells of {slide}")


def cluster_cmd(
    store: StoreOption,
    name: Annotated[str, typer.Option("--name", help="Prediction-set name to write: colour maps by prediction:NAME.")],
    k: Annotated[int, typer.Option("--k", help="Number of clusters.")] = 8,
    method: Annotated[str, typer.Option(help="Clustering method: kmeans (spherical, on L2-normalised embeddings).")] = "kmeans",
    encoder: TableOption = None,
    where: Annotated[Optional[str], typer.Option(help="SQL filter: cluster only these cells.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the training sample and k-means.")] = 0,
    quiet: QuietOption = False,
    as_json: JsonOption = False,
) -> None:
    """Cluster the embeddings (k-means) into predictions.NAME: label c0 (largest) ... and cosine score."""
    from cytostore.cluster import cluster

    with handle_errors():
        r = cluster(store, name, k=k, method=method, encoder=encoder, where=where, seed=seed,
                    progress=progress("cells", quiet, "cluster"))
    if as_json:
        emit_json(r)
        return
    typer.echo(f"{r['cells']} cells of table {r['table']} in {r['k']} clusters, written to predictions.{r['name']} "
               f"version {r['predictions_version']} ({r['seconds']} s)")
    for c, n in r["sizes"].items():
        top = ", ".join(f"{lab} {m}" for lab, m in r["labels"][c].items())
        typer.echo(f"  {c}: {n} cells" + (f"  (labels: {top})" if top else ""))
    if r["adjusted_rand_index"] is not None:
        typer.echo(f"adjusted Rand index against the stored labels: {r['adjusted_rand_index']} "
                   f"({r['labelled_cells']} labelled cells)")
    typer.echo(f"colour a map by it: cytostore map --store {store} --color-by prediction:{r['name']} --out map.png")


def register(app: typer.Typer) -> None:
    """Adds `slides`, `cells` and `cluster` to the app."""
    app.command("slides")(slides_cmd)
    app.command("cells")(cells_cmd)
    app.command("cluster")(cluster_cmd)
