"""`cytostore info` and `cytostore encoders`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.common import emit_json, handle_errors
from cytostore.encoders import list_encoders
from cytostore.store import CellStore


def info_cmd(
    store: Annotated[Path, typer.Option("--store", "-s", help="Store folder.")],
    failures: Annotated[int, typer.Option(help="How many failures to list.")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object as the last line.")] = False,
) -> None:
    """Show what a store holds: tables, cells, slides, provenance and failures."""
    with handle_errors():
        s = CellStore.open(store)
        summary = s.info()
        fails = s.failures()
    summary["failure_list"] = fails.select(["where", "stage", "reason"]).slice(0, failures).to_pylist()
    if as_json:
        emit_json(summary)
        return
    typer.echo(f"store {summary['store']}: {summary['cells']} cells, {summary['slides']} slides")
    for t in summary["tables"]:
        enc = t["provenance"].get("encoder", {})
        typer.echo(f"  table {t['name']}: {t['cells']} cells, {t['slides']} slides, version {t['version']}, "
                   f"{(t['bytes'] or 0) / 1e6:.1f} MB")
        typer.echo(f"    encoder {enc.get('name')} ({enc.get('arch')}), dim {enc.get('dim')}, "
                   f"{t['provenance'].get('embedding_dtype')}, weights sha256 {str(enc.get('weights_sha256'))[:16]}..., "
                   f"from {enc.get('weights_source')}")
        if t["labels"]:
            top = sorted(t["labels"].items(), key=lambda kv: -kv[1])
            typer.echo("    labels: " + ", ".join(f"{k} {v}" for k, v in top))
        if t["extra_columns"]:
            typer.echo("    extra columns: " + ", ".join(t["extra_columns"]))
    typer.echo(f"  failures: {summary['failures']}")
    for f in summary["failure_list"]:
        typer.echo(f"    [{f['stage']}] {f['where']}: {f['reason']}")


def encoders_cmd(
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object as the last line.")] = False,
) -> None:
    """List the registered encoders: name, dimension, input size, weights present."""
    rows = [{"name": s.name, "arch": s.arch, "dim": s.dim, "input_size": s.input_size,
             "weights_present": s.weights_present(), "description": s.description} for s in list_encoders()]
    if as_json:
        emit_json({"encoders": rows, "also": "any timm architecture, hf-hub:org/model, local-dir:/path, with --weights FILE"})
        return
    typer.echo(f"{'name':<22}{'dim':>6}{'input':>7}  weights  description")
    for r in rows:
        typer.echo(f"{r['name']:<22}{r['dim']:>6}{r['input_size']:>7}  {'yes' if r['weights_present'] else 'no ':<7}  {r['description']}")
    typer.echo("Also: any timm architecture (with --weights FILE), hf-hub:org/model, local-dir:/path.")
