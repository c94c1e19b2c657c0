"""`cytostore evaluate`: compare the encoder tables of a store on the same labelled cells."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cli.common import emit_json, handle_errors


def evaluate_cmd(
    store: Annotated[Path, typer.Option("--store", "-s", help="Store folder.")],
    tables: Annotated[Optional[str], typer.Option(help="Comma-separated tables; default every labelled table.")] = None,
    label: Annotated[str, typer.Option(help="Column holding the cell label.")] = "label",
    group: Annotated[str, typer.Option(help="Column splits are made by (slide, field, patient).")] = "slide_id",
    folds: Annotated[int, typer.Option(help="Grouped folds of the linear probe and k-NN.")] = 5,
    ways: Annotated[int, typer.Option(help="Classes per few-shot episode.")] = 5,
    shots: Annotated[int, typer.Option(help="Support cells per class.")] = 5,
    queries: Annotated[int, typer.Option(help="Query cells per class.")] = 15,
    episodes: Annotated[int, typer.Option(help="Few-shot episodes.")] = 200,
    seed: Annotated[int, typer.Option(help="Seed of the folds and episodes.")] = 0,
    hash_images: Annotated[bool, typer.Option("--hash-images/--no-hash-images",
                                              help="Also merge groups cropped from byte-identical source "
                                                   "images (local files).")] = True,
    markdown: Annotated[Optional[Path], typer.Option(help="Also write the table as Markdown to FILE.")] = None,
    png: Annotated[Optional[Path], typer.Option(help="Also draw the figures as a bar chart into FILE.png.")] = None,
    save: Annotated[bool, typer.Option("--save/--no-save",
                                       help="Store each table's figures in the store (evaluations/TABLE.json), "
                                            "shown by `cytostore encoders list`.")] = True,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress on standard error.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object as the last line.")] = False,
) -> None:
    """Linear probe, k-NN, cross-slide few-shot, precision@10 and slide-of-origin per encoder table.

    A table made by an encoder trained with labels (`encoders train --labels`) is scored, with every
    table compared to it, only on the slides that encoder never saw.
    """
    from cytostore.evaluate import EvalConfig, evaluate
    from cytostore.evaluate import report as fmt

    config = EvalConfig(label=label, group=group, folds=folds, ways=ways, shots=shots, queries=queries,
                        episodes=episodes, seed=seed, hash_images=hash_images)
    names = [t.strip() for t in tables.split(",") if t.strip()] if tables else None
    say = None if quiet else (lambda msg: typer.echo(msg, err=True))
    with handle_errors():
        report = evaluate(store, names, config, progress=say)
        if save:
            from cytostore.evaluate.heldout import save as save_figures
            from cytostore.store import CellStore

            try:
                report["saved"] = save_figures(CellStore.open(store), report)
            except OSError as e:  # a read-only store: the figures are still printed
                report["saved"] = []
                typer.echo(f"warning: figures not stored in {store} ({e})", err=True)
        if markdown is not None:
            markdown.write_text(fmt.markdown(report))
        if png is not None:
            fmt.png(report, png)
    if as_json:
        emit_json(report)
        return
    typer.echo(fmt.text(report))
