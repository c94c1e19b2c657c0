"""`cytostore encoders` (list, the default), `encoders list` and `encoders train`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cli.common import Progress, emit_json, handle_errors

encoders_app = typer.Typer(help="Encoders: list them (with the tables they made and their evaluation), "
                                "or train one from the cells of a store.",
                           invoke_without_command=True, no_args_is_help=False)

JSON_HELP = "Print one JSON object as the last line."


def _show(store: Optional[Path], as_json: bool) -> None:
    from cytostore.encoders.listing import overview

    with handle_errors():
        out = overview(store)
    if as_json:
        emit_json(out)
        return
    typer.echo(f"{'name':<22}{'kind':<9}{'dim':>6}{'input':>7}  weights  description")
    for r in out["encoders"]:
        w = "—" if r["weights_present"] is None else ("yes" if r["weights_present"] else "no")
        typer.echo(f"{r['name']:<22}{r['kind']:<9}{r['dim'] or '':>6}{r['input_size'] or '':>7}  {w:<7}  "
                   f"{r['description']}")
        for t in r.get("tables", []):
            ev = t["evaluation"]
            line = f"    table {t['table']}: {t['cells']} cells, version {t['version']}"
            if ev:
                fs = next((v for k, v in ev.items() if k.startswith("fewshot_")), {}) or {}
                p = ev["linear_probe"]
                line += (f"; evaluated {ev['evaluated_at']} on {ev['n_cells']} cells"
                         f"{' (held-out slides)' if ev['held_out_only'] else ''}: few-shot {_f(fs.get('accuracy'))}, "
                         f"probe acc {_f(p['accuracy'])} bal {_f(p['balanced_accuracy'])} F1 {_f(p['macro_f1'])}, "
                         f"P@10 {_f(ev['precision_at_10'])}, slide of origin {_f(ev['slide_of_origin'])}")
            else:
                line += "; not evaluated (cytostore evaluate --store ...)"
            typer.echo(line)
    typer.echo("Also: any timm architecture (with --weights FILE), hf-hub:org/model, local-dir:/path.")


def _f(v) -> str:
    return "—" if v is None else f"{v:.3f}"


@encoders_app.callback()
def encoders_cmd(
    ctx: typer.Context,
    store: Annotated[Optional[Path], typer.Option("--store", "-s", help="Also show the tables each encoder made "
                                                                        "in this store and their evaluation.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
) -> None:
    """List the encoders: bundled and trained, dimension, input size, weights present."""
    if ctx.invoked_subcommand is None:
        _show(store, as_json)


@encoders_app.command("list")
def list_cmd(
    store: Annotated[Optional[Path], typer.Option("--store", "-s", help="Show the tables each encoder made in this "
                                                                        "store and their latest evaluation.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
) -> None:
    """Every encoder (bundled, trained), the tables each made in the store, and their latest evaluation."""
    _show(store, as_json)


@encoders_app.command("train")
def train_cmd(
    store: Annotated[Path, typer.Option("--store", "-s", help="Store whose cells the encoder learns from.")],
    name: Annotated[str, typer.Option(help="Name of the new encoder (then: cytostore ingest --encoder NAME).")],
    labels: Annotated[Optional[str], typer.Option(help="Label column: supervised on the training slides (the rest "
                                                       "held out); without it, self-supervised.")] = None,
    table: Annotated[Optional[str], typer.Option(help="Cell table to train on; default the store's table.")] = None,
    recipe: Annotated[str, typer.Option(help="auto (gpu when a CUDA GPU is visible, else cpu), cpu or gpu.")] = "auto",
    base: Annotated[str, typer.Option(help="Encoder training starts from.")] = "efficientnet_lite0",
    base_weights: Annotated[Optional[Path], typer.Option(help="Checkpoint for --base (as ingest --weights).")] = None,
    input_size: Annotated[int, typer.Option(help="Input side in pixels; 0: 96 (cpu) or 160 (gpu).")] = 0,
    epochs: Annotated[int, typer.Option(help="Passes over the training cells; 0: the recipe's default.")] = 0,
    train_blocks: Annotated[int, typer.Option(help="cpu: last stages trained on cached trunk maps.")] = 2,
    views: Annotated[int, typer.Option(help="cpu: augmented views of each cell cached.")] = 4,
    batch_size: Annotated[int, typer.Option(help="Cells per step.")] = 256,
    lr: Annotated[float, typer.Option(help="Learning rate of the backbone layers; 0: the recipe's default.")] = 0.0,
    holdout: Annotated[float, typer.Option(help="With --labels: share of the slides held out.")] = 0.3,
    group: Annotated[str, typer.Option(help="With --labels: column the split is made by.")] = "slide_id",
    crops: Annotated[str, typer.Option(help="auto (source images, thumbnail when unreadable), images, thumbnails.")]
    = "auto",
    max_cells: Annotated[int, typer.Option(help="At most this many training cells (a seeded sample).")] = 20000,
    augment: Annotated[float, typer.Option(help="Strength of the scale and colour jitter (0: none).")] = 1.0,
    background: Annotated[float, typer.Option(help="Probability of the Cyto-SSL background swap.")] = 0.5,
    seed: Annotated[int, typer.Option(help="Seed of the sample, split and augmentations.")] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress on standard error.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
) -> None:
    """Train a new encoder on the cells of a store and register it by name.

    Self-supervised (SimCLR-style; cell augmentations: dihedral, scale, colour, background swap) without --labels; supervised (linear probe, then fine-tune) with --labels, on the training slides only.

    The cpu recipe (the default without a GPU) trains the last stages on cached trunk maps at 96 px; the gpu recipe trains the whole network at 160 px in bf16. The encoder is written to $CYTOSTORE_HOME/encoders/NAME (default ~/.local/share/cytostore) and copied into the store.
    """
    from cytostore.encoders.train import TrainConfig, train_encoder

    config = TrainConfig(recipe=recipe, base=base, base_weights=str(base_weights) if base_weights else None,
                         input_size=input_size, train_blocks=train_blocks, views=views, epochs=epochs,
                         batch_size=batch_size, lr=lr, holdout=holdout, group=group, source=crops,
                         max_cells=max_cells, augment=augment, background=background, seed=seed)
    bars: dict[str, Progress] = {}

    def tick(phase: str, done: int, total: int) -> None:
        if phase not in bars:
            for b in bars.values():
                b.close()
            bars[phase] = Progress(f"encoders train: {phase}", "items", total, quiet=quiet)
        bars[phase].update(done, total)

    with handle_errors():
        try:
            report = train_encoder(store, name, labels=labels, table=table, config=config, progress=tick)
        finally:
            for b in bars.values():
                b.close()
    if as_json:
        emit_json(report)
        return
    t = report["training"]
    typer.echo(f"encoder {report['name']} ({report['recipe']}, {report['dim']}-d, {report['input_size']} px) trained on "
               f"{t['n_cells']} cells of table {t['table']} v{t['table_version']} in {report['seconds']:.0f} s")
    if report["held_out_groups"]:
        typer.echo(f"  trained on {len(report['training_groups'])} {t['group']} groups; "
                   f"{len(report['held_out_groups'])} held out (cytostore evaluate scores only those)")
    typer.echo(f"  written to {report['folder']}" + (f" and {report['store_copy']}" if report["store_copy"] else ""))
    typer.echo(f"  next: {report['next']}")
