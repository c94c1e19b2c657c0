"""`cytostore harmonise`: a derived cell table with batch-corrected (or morphometrics-extended) embeddings."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cli.common import emit_json, handle_errors


def harmonise_cmd(
    store: Annotated[Path, typer.Option("--store", "-s", help="Store folder.")],
    table: Annotated[str, typer.Option(help="Source cell table.")],
    out: Annotated[str, typer.Option(help="Name of the new cell table (must not exist).")],
    method: Annotated[str, typer.Option(help="centre (each group's mean moved to the global mean), harmony (Harmony on 50 principal components, its correction added back) or none (with --morphometrics).")] = "centre",
    by: Annotated[str, typer.Option(help="Column whose groups are corrected: slide_id, or e.g. a scanner or batch column.")] = "slide_id",
    morphometrics: Annotated[Optional[str], typer.Option(help="append: the z-scored morph_* columns beside the embedding (each block scaled to mean norm 1); only: they alone are the embedding.")] = None,
    morphometrics_from: Annotated[Optional[str], typer.Option(help="Table the morph_* columns come from (joined on uid); default --table.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress on standard error.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON summary as the last line.")] = False,
) -> None:
    """Write a new cell table: the rows of --table with corrected embeddings (search, evaluate, fewshot
    and MIL read it like any other). Batch correction can erase real slide-level signal: see
    docs/embeddings.md for what it did to MIL on the disease fields."""
    from cytostore.harmonise import harmonise
    from cytostore.store import CellStore

    say = None if quiet or as_json else (lambda msg: typer.echo(msg, err=True))
    with handle_errors():
        summary = harmonise(CellStore.open(store), table, out, method=method, by=by, morphometrics=morphometrics,
                            morphometrics_from=morphometrics_from, progress=say)
    if as_json:
        emit_json(summary)
    else:
        typer.echo(f"table {summary['table']}: {summary['rows']} cells, {summary['dim']}-d, {summary['method']} "
                   f"over {summary['groups']} groups of {summary['by']} from {summary['source']} "
                   f"version {summary['source_version']} ({summary['seconds']:.1f} s)")
