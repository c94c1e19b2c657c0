"""`cytostore fewshot`: prototypes from a few labelled cells; predict, suggest, evaluate."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cli.common import echo_rows, emit_json, handle_errors, print_score
from cytostore.errors import InputError

fewshot_app = typer.Typer(
    help="Few-shot cell classification: fit prototypes from a few labelled cells, predict, "
         "suggest what to label next, and evaluate with N-way K-shot episodes.",
    no_args_is_help=True,
)

StoreArg = Annotated[Path, typer.Option("--store", "-s", help="Store folder.")]
NameArg = Annotated[str, typer.Option("--name", help="Prototype-set name (letters, digits, '_' or '-').")]
JsonArg = Annotated[bool, typer.Option("--json", help="Print one JSON object as the last line.")]


@fewshot_app.command("fit")
def fit_cmd(
    store: StoreArg,
    support: Annotated[Path, typer.Option("--support", help="CSV/Parquet: slide_id, cell_id, label (store cells) "
                                                             "or image, label[, x, y] (images).")],
    name: NameArg,
    encoder: Annotated[Optional[str], typer.Option(help="Encoder table; default the store's only/default one.")] = None,
    prototypes_per_class: Annotated[int, typer.Option("--prototypes-per-class", "-k",
                                                      help="Prototypes per class (k-means within a class when > 1).")] = 1,
    as_json: JsonArg = False,
) -> None:
    """Build prototypes from a support file and store them as prototypes.NAME."""
    from cytostore.fewshot import PrototypeConfig, fit

    with handle_errors():
        report = fit(store, support, name, encoder, PrototypeConfig(per_class=prototypes_per_class))
    if as_json:
        emit_json(report)
        return
    typer.echo(f"prototype set {report['name']!r} version {report['version']}: {report['prototypes']} prototypes "
               f"from {report['support']} support {report['support_kind']} on table {report['table']} "
               f"(version {report['table_version']})")
    for cls, n in report["classes"].items():
        typer.echo(f"  {cls}: {n} support")


@fewshot_app.command("predict")
def predict_cmd(
    store: StoreArg,
    name: NameArg,
    where: Annotated[Optional[str], typer.Option(help="SQL filter on the cells, e.g. \"slide_id = 'chula-1'\".")] = None,
    min_score: Annotated[Optional[float], typer.Option(help="Cells whose best cosine score is lower get 'unknown'.")] = None,
    as_json: JsonArg = False,
) -> None:
    """Label the selected cells by their nearest prototype into predictions.NAME; print counts per slide."""
    from cytostore.fewshot import predict

    with handle_errors():
        report = predict(store, name, where, min_score)
    if as_json:
        emit_json(report)
        return
    typer.echo(f"{report['cells']} cells predicted with {name!r} (prototypes version {report['prototypes_version']}) "
               f"into predictions.{name} version {report['predictions_version']}")
    for slide, counts in report["counts"].items():
        typer.echo(f"  {slide}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])))
    typer.echo("total: " + ", ".join(f"{k} {v}" for k, v in sorted(report["totals"].items(), key=lambda kv: -kv[1])))
    sc = report["score"]
    if sc:
        left = [f"{sc['support_excluded']} support cells"] if sc["support_excluded"] else []
        other = sc["other_classes_excluded"]
        if other:
            left.append(f"{sum(other.values())} cells of classes the set lacks ("
                        + ", ".join(f"{k} {v}" for k, v in other.items()) + ")")
        print_score(sc, "cells", f" ({'; '.join(left)} excluded)" if left else "")


@fewshot_app.command("suggest")
def suggest_cmd(
    store: StoreArg,
    name: NameArg,
    n: Annotated[int, typer.Option("-n", help="How many cells to suggest.")] = 20,
    where: Annotated[Optional[str], typer.Option(help="SQL filter on the cells to consider.")] = None,
    montage: Annotated[Optional[Path], typer.Option("--montage", help="Write a contact sheet PNG of them here.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Append them to this support-file CSV (slide_id, cell_id, "
                                                              "empty label, predicted); cells already there are skipped.")] = None,
    as_json: JsonArg = False,
) -> None:
    """List the cells to label next: nearest a decision boundary and farthest from every prototype."""
    from cytostore.fewshot import montage as make_montage
    from cytostore.fewshot import suggest
    from cytostore.fewshot.support import append_suggestions

    with handle_errors():
        rows = suggest(store, name, n, where)
        sheet = make_montage(store, rows, montage, name=name) if montage and rows else None
        written = append_suggestions(out, rows) if out is not None else None
    if as_json:
        emit_json({"name": name, "suggestions": rows, "montage": str(sheet) if sheet else None, "out": written})
        return
    for r in rows:
        typer.echo(f"{r['rank']:>3} {r['slide_id']}/{r['cell_id']}  {r['reason']}")
    if sheet:
        typer.echo(f"montage: {sheet}")
    if written:
        typer.echo(f"{written['appended']} cells appended to {written['path']}"
                   + (f" ({written['already_present']} already there)" if written["already_present"] else "")
                   + ": fill in their label column, add them to the support file, then `cytostore fewshot fit` again")
    else:
        typer.echo("add labelled cells to the support file and run `cytostore fewshot fit` again")


@fewshot_app.command("show")
def show_cmd(
    store: StoreArg,
    name: NameArg,
    slide: Annotated[Optional[str], typer.Option("--slide", help="Only this slide's cells.")] = None,
    limit: Annotated[int, typer.Option("--limit", help="At most N cells (0 = all).")] = 50,
    encoder: Annotated[Optional[str], typer.Option(help="Cell table holding the stored labels; default the set's.")] = None,
    as_json: JsonArg = False,
) -> None:
    """Predictions of a set cell by cell, beside the stored label (tab-separated)."""
    from cytostore.fewshot.tables import show_predictions

    with handle_errors():
        rows, total = show_predictions(store, name, slide, limit, encoder)
    records = [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in rows.to_pylist()]
    if as_json:
        emit_json({"name": name, "slide": slide, "cells": total, "shown": len(records), "rows": records})
        return
    echo_rows(rows.column_names, records, total, "predicted cells")


def _ways(value: str) -> int:
    if value.strip().lower() == "all":
        return 0
    try:
        return int(value)
    except ValueError:
        raise InputError(f"--ways must be a number or 'all', got {value!r}") from None


def _queries(value: str) -> int:
    return 0 if value.strip().lower() == "all" else _ways(value)


@fewshot_app.command("eval")
def eval_cmd(
    store: StoreArg,
    ways: Annotated[str, typer.Option(help="Classes per episode; 0 or 'all' = every eligible class.")] = "5",
    shots: Annotated[int, typer.Option(help="Support cells per class.")] = 5,
    queries: Annotated[str, typer.Option(help="Query cells per class; 'all' = every remaining cell.")] = "15",
    episodes: Annotated[int, typer.Option(help="Episodes to draw.")] = 200,
    label_column: Annotated[str, typer.Option(help="Column holding the true class.")] = "label",
    seed: Annotated[int, typer.Option(help="Episode seed; the same seed gives the same episodes.")] = 0,
    encoder: Annotated[Optional[str], typer.Option(help="Encoder table; default the store's only/default one.")] = None,
    prototypes_per_class: Annotated[int, typer.Option("--prototypes-per-class", "-k",
                                                      help="Prototypes per class.")] = 1,
    transductive_steps: Annotated[Optional[int], typer.Option(help="Soft k-means steps with the queries "
                                                                   "(default: the library's).")] = None,
    as_json: JsonArg = False,
) -> None:
    """N-way K-shot episodes on a labelled store: prototypes against k-NN and logistic regression."""
    from cytostore.fewshot import EpisodeSpec, PrototypeConfig, evaluate

    with handle_errors():
        spec = EpisodeSpec(_ways(ways), shots, _queries(queries), episodes, seed)
        config = PrototypeConfig(per_class=prototypes_per_class)
        if transductive_steps is not None:
            from dataclasses import replace

            config = replace(config, transductive_steps=transductive_steps)
        report = evaluate(store, spec, label_column, encoder, config)
    if as_json:
        emit_json(report)
        return
    typer.echo(f"{report['ways']}-way {report['shots']}-shot, {report['queries']} queries/class, "
               f"{report['episodes']} episodes (seed {report['seed']}), chance {report['chance']:.3f}")
    typer.echo(f"  prototypes           accuracy {report['accuracy']:.4f} ± {report['ci95']:.4f}, "
               f"balanced {report['balanced_accuracy']:.4f}")
    for b, r in report["baselines"].items():
        typer.echo(f"  {b:<20} accuracy {r['accuracy']:.4f} ± {r['ci95']:.4f}, balanced {r['balanced_accuracy']:.4f}")
    typer.echo("  per class (prototypes): " + ", ".join(f"{k} {v:.2f}" for k, v in report["per_class"].items()))
    if report["excluded_classes"]:
        typer.echo("  excluded (too few labelled cells): "
                   + ", ".join(f"{k} ({v})" for k, v in report["excluded_classes"].items()))
