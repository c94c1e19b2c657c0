"""`cytostore store optimize|gc|delete|pins`: upkeep of a store (thin: cytostore.store.maintenance)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Annotated, Optional

import typer

from cli.common import emit_json, fail, handle_errors
from cytostore.errors import InputError
from cytostore.store import CellStore, maintenance

store_app = typer.Typer(help="Keep a store small, tidy and sound: optimize, gc, delete cells, list pins, check data files.",
                        no_args_is_help=True)

StoreArg = Annotated[Path, typer.Option("--store", "-s", help="Store folder.")]
JsonArg = Annotated[bool, typer.Option("--json", help="Print one JSON object as the last line.")]
GraceArg = Annotated[float, typer.Option(help="Keep unpinned versions (and unreferenced files) younger than this "
                                         "many minutes, for readers and writes in flight; 0 when none run.")]


def _mb(n: int | None) -> str:
    return "?" if n is None else f"{n / 1e6:.1f} MB"


@store_app.command("optimize")
def optimize_cmd(store: StoreArg, encoder: Annotated[Optional[str], typer.Option(help="One cell table; default all.")] = None,
                 grace_minutes: GraceArg = 60.0, as_json: JsonArg = False) -> None:
    """Compact the cell table(s), then remove old unpinned versions."""
    with handle_errors():
        out = maintenance.optimize(CellStore.open(store), encoder, dt.timedelta(minutes=grace_minutes))
    if as_json:
        emit_json(out)
        return
    for t in out["tables"]:
        b, a = t["before"], t["after"]
        typer.echo(f"table {t['table']}: fragments {b['fragments']} -> {a['fragments']}, versions {b['versions']} -> "
                   f"{a['versions']}, folder {_mb(b['folder_bytes'])} -> {_mb(a['folder_bytes'])} "
                   f"(live data {_mb(a['live_bytes'])}), pins kept: {t['pins'] or 'none'}")


@store_app.command("gc")
def gc_cmd(store: StoreArg, grace_minutes: GraceArg = 60.0, as_json: JsonArg = False) -> None:
    """Remove old unpinned versions of every table, and files no version references."""
    with handle_errors():
        out = maintenance.gc(CellStore.open(store), dt.timedelta(minutes=grace_minutes))
    if as_json:
        emit_json(out)
        return
    for t in out["tables"]:
        typer.echo(f"{t['kind']} {t['name'] or ''}: freed {_mb(t['bytes_freed'])}, {t['old_versions']} old versions, "
                   f"{t['orphan_files_removed']} orphan files removed ({t['orphan_files_kept']} too young), "
                   f"pins kept: {t['pins'] or 'none'}")
    typer.echo(f"freed {_mb(out['bytes_freed'])} in all")


@store_app.command("delete")
def delete_cmd(
    store: StoreArg,
    slide: Annotated[Optional[list[str]], typer.Option("--slide", help="Delete the cells of this slide (repeatable).")] = None,
    where: Annotated[Optional[str], typer.Option(help="Delete the cells matching this SQL filter (one expression, no ';'; "
                                                  "at most 1,000 AND/OR terms: use slide_id IN (...) for many).")] = None,
    encoder: Annotated[Optional[str], typer.Option(help="One cell table; default all.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Count and name what would go stale; delete nothing.")] = False,
    as_json: JsonArg = False,
) -> None:
    """Delete cells (by slide or SQL filter); names the derived artefacts made stale, rebuilds none."""
    if bool(slide) == bool(where):
        fail(InputError("give either --slide ID (repeatable) or --where SQL, not both and not neither"))
    with handle_errors():
        filt = maintenance.slides_filter(slide) if slide else where
        out = maintenance.delete_cells(CellStore.open(store), filt, encoder, dry_run)
    if as_json:
        emit_json(out)
        return
    verb = "would delete" if dry_run else "deleted"
    for t in out["tables"]:
        typer.echo(f"table {t['table']}: {verb} {t['cells']} cells (version {t['version']})")
        for s in t["stale"]:
            typer.echo(f"  {'would be ' if dry_run else ''}stale: {s['kind']} {s['name']}; rebuild with `{s['fix']}`")


@store_app.command("pins")
def pins_cmd(store: StoreArg, as_json: JsonArg = False) -> None:
    """List the pinned versions (kept by cleanup) and who holds them."""
    with handle_errors():
        out = maintenance.list_pins(CellStore.open(store))
    if as_json:
        emit_json(out)
        return
    if not out["pins"]:
        typer.echo("no pinned versions")
    for p in out["pins"]:
        typer.echo(f"{p['kind']} {p['name'] or ''} version {p['version']}: pinned by {p['holder']}")


@store_app.command("check")
def check_cmd(
    store: StoreArg,
    table: Annotated[Optional[str], typer.Option(help="One cell table; default all.")] = None,
    drop_damaged: Annotated[bool, typer.Option("--drop-damaged", help="Remove the fragments of damaged or missing "
                                               "files (their rows) so the table reads again; then re-run the "
                                               "ingest, which re-embeds only the cells that are gone.")] = False,
    as_json: JsonArg = False,
) -> None:
    """Verify every data file against the checksum recorded when it was written.

    Exit 0 when every file checks out (files written before checksums existed are listed as
    unverified), 1 when a file is missing or damaged (named, with its rows, slides and the fix).
    """
    with handle_errors():
        out = maintenance.check(CellStore.open(store), table, drop_damaged)
    if as_json:
        emit_json(out)
    else:
        for t in out["tables"]:
            state = "DAMAGED" if t["damaged"] else "ok"
            typer.echo(f"table {t['table']}: {state}: {t['verified']} of {t['files']} data files verified, "
                       f"{t['unverified']} without a checksum, {len(t['damaged'])} damaged")
            for d in t["damaged"]:
                slides = d.get("slides")
                typer.echo(f"  {d['file']}: {d['problem']}; {d.get('rows')} rows of slide(s) "
                           f"{', '.join(slides[:10]) + (' ...' if len(slides) > 10 else '') if slides else 'unknown'}")
            if t.get("note"):
                typer.echo(f"  note: {t['note']}")
            if "dropped_rows" in t:
                typer.echo(f"  dropped {t['dropped_rows']} rows of the damaged fragments; run the same ingest again")
            elif t.get("fix"):
                typer.echo(f"  fix: {t['fix']}")
    if out["damaged"]:
        raise typer.Exit(1)
