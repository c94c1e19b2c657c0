"""`cytostore mil`: slide-level attention-MIL on the stored cell embeddings."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cli.common import QuietOpt, emit_json, handle_errors, print_score

mil_app = typer.Typer(help="Slide-level multiple-instance learning (ABMIL, mean pooling) on stored embeddings.",
                      no_args_is_help=True)

StoreOpt = Annotated[Path, typer.Option("--store", "-s", help="Store folder.")]
ModelDirOpt = Annotated[Path, typer.Option("--model", help="Model directory written by `cytostore mil train`.")]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu or cuda.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object as the last line.")]
TableOpt = Annotated[Optional[str], typer.Option(help="Feature table; default the one the model was trained on.")]


@mil_app.command("train")
def train_cmd(
    store: StoreOpt,
    labels: Annotated[str, typer.Option(help="CSV/Parquet with slide_id,label[,patient_id][,split], or `slide_label` "
                                              "to use the store's slide_label column.")],
    out: Annotated[Path, typer.Option(help="Model directory to write.")],
    encoder: Annotated[Optional[str], typer.Option(help="Feature table (encoder name); default the only/default one.")] = None,
    model: Annotated[str, typer.Option(help="abmil (gated attention) or mean (mean pooling).")] = "abmil",
    folds: Annotated[int, typer.Option(help="Cross-validation folds, grouped by patient (or slide) and stratified.")] = 5,
    epochs: Annotated[int, typer.Option(help="Most epochs per fit (early stopping on a validation part).")] = 100,
    max_cells: Annotated[int, typer.Option(help="Cells sampled per bag per epoch while training (0 = all).")] = 512,
    patience: Annotated[int, typer.Option(help="Epochs without a better validation loss before stopping.")] = 20,
    lr: Annotated[float, typer.Option(help="AdamW learning rate.")] = 2e-4,
    input_norm: Annotated[str, typer.Option(help="layernorm (per cell), standardize (training mean/std) or none.")] = "layernorm",
    cache_gb: Annotated[float, typer.Option(help="Cache the bags in RAM when they fit under this many GiB; else stream.")] = 2.0,
    device: DeviceOpt = "auto",
    seed: Annotated[int, typer.Option(help="Seed of folds, sampling, initialisation and dropout.")] = 0,
    as_json: JsonOpt = False,
    quiet: Annotated[bool, QuietOpt] = False,
) -> None:
    """Cross-validate a MIL head on labelled slides, then train the final model on all of them."""
    from cytostore.mil import TrainConfig, train_mil

    def progress(line: str) -> None:
        if not (as_json or quiet):
            typer.echo(line, err=True)

    with handle_errors():
        cfg = TrainConfig(model=model, epochs=epochs, max_cells=max_cells, patience=patience, lr=lr,
                          input_norm=input_norm, cache_bytes=int(cache_gb * 1024**3), device=device, seed=seed)
        report = train_mil(store, labels, out, cfg, folds=folds, encoder=encoder, progress=progress)
    d = report.to_dict()
    if as_json:
        d.pop("oof")
        emit_json(d)
        return
    typer.echo(f"{report.model} on table {report.table}: {sum(report.counts.values())} slides, classes "
               + ", ".join(f"{c} {n}" for c, n in report.counts.items()))
    for name in ("balanced_accuracy", "auc", "accuracy"):
        typer.echo(f"  {name}: {_fmt(d[name])} ± {_fmt(d[name + '_std'])} over {len(report.folds)} folds")
    typer.echo(f"  majority-class rate: {report.majority_rate:.3f}")
    if report.test:
        typer.echo(f"  held-out test split: balanced accuracy {_fmt(report.test['balanced_accuracy'])}, "
                   f"AUC {_fmt(report.test['auc'])}")
    typer.echo(f"  final model ({report.final_epochs} epochs on all labelled slides) saved to {report.out} "
               f"in {report.seconds:.1f} s ({'bags cached in RAM' if report.cached else 'bags streamed'})")


@mil_app.command("predict")
def predict_cmd(
    store: StoreOpt,
    model: ModelDirOpt,
    where: Annotated[Optional[str], typer.Option(help="SQL filter on cells; each slide's bag is its matching cells "
                                                  "(one expression, no ';'; at most 1,000 AND/OR terms).")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Also write the predictions to this CSV or Parquet file.")] = None,
    table: TableOpt = None,
    device: DeviceOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Predict a label and class probabilities for every slide (all its cells)."""
    from cytostore.mil import predict
    from cytostore.mil.infer import score

    with handle_errors():
        preds = predict(store, model, where=where, table=table, device=device)
        if out is not None:
            preds.write(out)
        sc = score(store, model, preds)
    rows = preds.rows()
    if as_json:
        emit_json({"table": preds.table, "classes": preds.classes, "slides": len(rows), "predictions": rows,
                   "out": str(out) if out else None, "score": sc})
        return
    for r in rows:
        probs = ", ".join(f"{c} {p:.3f}" for c, p in r["probabilities"].items())
        typer.echo(f"{r['slide_id']}\t{r['label']}\t({r['n_cells']} cells; {probs})")
    typer.echo(f"{len(rows)} slides predicted from table {preds.table}" + (f"; written to {out}" if out else ""))
    if sc:
        left = [f"{sc['training_excluded']} slides the model was trained on"] if sc["training_excluded"] else []
        if sc["other_classes_excluded"]:
            left.append(f"{sum(sc['other_classes_excluded'].values())} slides of classes the model lacks ("
                        + ", ".join(f"{k} {v}" for k, v in sc["other_classes_excluded"].items()) + ")")
        print_score(sc, "slides", f" ({'; '.join(left)} excluded)" if left else "")


@mil_app.command("explain")
def explain_cmd(
    store: StoreOpt,
    model: ModelDirOpt,
    slide: Annotated[str, typer.Option("--slide", help="Slide id to explain.")],
    top: Annotated[int, typer.Option(help="How many of the most attended cells to list.")] = 16,
    montage_out: Annotated[Optional[Path], typer.Option("--montage", help="Write a PNG contact sheet of the top cells.")] = None,
    table: TableOpt = None,
    device: DeviceOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Attention of each cell of a slide; the most attended cells, optionally as a montage."""
    from cytostore.mil import explain, montage

    with handle_errors():
        ex = explain(store, model, slide, table=table, device=device)
        if montage_out is not None:
            montage(store, ex, montage_out, top=top)
    cells = [{k: (round(v, 6) if isinstance(v, float) else v) for k, v in c.items()} for c in ex.top(top)]
    if as_json:
        emit_json({"slide_id": ex.slide_id, "label": ex.label, "probabilities": ex.probabilities,
                   "model": ex.model_kind, "n_cells": ex.cells.num_rows, "top": cells,
                   "montage": str(montage_out) if montage_out else None})
        return
    typer.echo(f"slide {ex.slide_id}: predicted {ex.label} "
               f"({', '.join(f'{c} {p:.3f}' for c, p in ex.probabilities.items())}); {ex.cells.num_rows} cells")
    for k, c in enumerate(cells, 1):
        typer.echo(f"  #{k}\tattention {c['attention']:.4f}\tcell {c['cell_id']}\t(x {c['x']:.0f}, y {c['y']:.0f})\tuid {c['uid']}")
    if montage_out is not None:
        typer.echo(f"montage written to {montage_out}")


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"
