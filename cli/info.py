"""`cytostore info` (`cytostore encoders` lives in cli/encoders.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.common import emit_json, handle_errors
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

