"""`cytostore index build|update|verify` and `cytostore search`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cli.common import Progress, QuietOpt, emit_json, handle_errors
from cytostore.index import KINDS, build_index, update_index, verify_index
from cytostore.search import montage, run_search

index_app = typer.Typer(help="Build and check the similar-cell index of a cell table.", no_args_is_help=True)

StoreOpt = Annotated[Path, typer.Option("--store", "-s", help="Store folder.")]
EncoderOpt = Annotated[Optional[str], typer.Option(help="Encoder table; default the only (or default) one.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object as the last line.")]


@index_app.command("build")
def build_cmd(
    store: StoreOpt,
    encoder: EncoderOpt = None,
    kind: Annotated[str, typer.Option(help=f"{'|'.join(KINDS)}: auto is exact below 200k cells, else PCA+IVF-PQ "
                                           "with exact re-ranking.")] = "auto",
    device: Annotated[str, typer.Option(help="auto, cpu or cuda (cuda needs a GPU build of faiss; else the CPU, "
                                              "with a note).")] = "auto",
    as_json: JsonOpt = False,
    quiet: Annotated[bool, QuietOpt] = False,
) -> None:
    """Build (or rebuild) the index of a cell table, beside it in STORE/indexes/."""
    with handle_errors():
        with Progress("index build", "cells", quiet=quiet or as_json) as bar:
            sidecar = build_index(store, encoder, kind=kind, device=device, progress=bar.update)
            bar.close()
    if as_json:
        emit_json(sidecar)
        return
    p = sidecar["params"]
    extra = ", ".join(f"{k} {p[k]}" for k in ("nlist", "pq_m", "reduce_dim", "nprobe", "rerank", "hnsw_m", "ef_search")
                      if k in p)
    typer.echo(f"index of table {sidecar['table']} (version {sidecar['table_version']}): {sidecar['rows']} cells, "
               f"{sidecar['kind']} [{p['factory']}{', ' + extra if extra else ''}], {sidecar['metric']}, "
               f"{sidecar['index_bytes'] / 1e6:.1f} MB, {sidecar['build_seconds']:.1f} s on {sidecar['device']}")
    for what, t in (sidecar.get("tuning") or {}).items():
        typer.echo(f"  tuned {what} = {t['value']}: recall@10 {t['recall_at_10']:.3f} on {t['queries']} held queries")
    for note in sidecar["notes"]:
        typer.echo(f"  note: {note}")


@index_app.command("update")
def update_cmd(store: StoreOpt, encoder: EncoderOpt = None, as_json: JsonOpt = False,
               quiet: Annotated[bool, QuietOpt] = False) -> None:
    """Add the cells appended since the build to the index in place (remove deleted/changed ones).

    Exit 0 when updated or nothing to do, 1 when past the rebuild threshold (run the printed build command).
    """
    with handle_errors():
        with Progress("index update", "cells", quiet=quiet or as_json) as bar:
            out = update_index(store, encoder, progress=bar.update)
            bar.close()
    side = out.pop("sidecar", None)
    if as_json:
        emit_json({**out, "rows_indexed": side["rows"] if side else None})
    elif out["action"] == "updated":
        typer.echo(f"index of table {out['table']} updated to version {out['table_version']}: +{out['added']} cells, "
                   f"-{out['removed']} removed ({out['changed']} changed), {side['rows']} indexed, {out['seconds']:.1f} s")
        if out.get("kept_filtered"):
            typer.echo(f"  {out['kept_filtered']} deleted cells stay in the {side['kind']} graph, filtered at search")
        for note in out.get("notes", []):
            typer.echo(f"  note: {note}")
    elif out["action"] == "none":
        typer.echo(f"index of table {out['table']}: nothing to update ({out['reason']})")
    else:
        typer.echo(f"index of table {out['table']}: rebuild: {out['reason']}\n  fix: {out['fix']}")
    if out["action"] == "rebuild":
        raise typer.Exit(1)


@index_app.command("verify")
def verify_cmd(store: StoreOpt, encoder: EncoderOpt = None, as_json: JsonOpt = False) -> None:
    """Check the index against its table; exit 1 when stale or broken (what is wrong, and the fix), 0 when fresh."""
    with handle_errors():
        report = verify_index(store, encoder)
    if as_json:
        emit_json(report)
    else:
        state = "fresh" if report["fresh"] else "BROKEN" if report["broken"] else "STALE"
        built = (f"index built on version {report['index_table_version']}, {report['rows_indexed']} cells"
                 if report["exists"] else "no index")
        typer.echo(f"index of table {report['table']}: {state} (table version {report['table_version']}, "
                   f"{report['rows_table']} cells; {built})")
        for p in report["problems"]:
            typer.echo(f"  {p}")
        if report.get("note"):
            typer.echo(f"  note: {report['note']}")
        if not report["fresh"]:
            if report.get("update") and not report["broken"]:
                typer.echo(f"  update in place: {report['update']}")
            typer.echo(f"  fix: {report['fix']}")
    if not report["fresh"]:
        raise typer.Exit(1)


def search_cmd(
    store: StoreOpt,
    slide: Annotated[Optional[str], typer.Option("--slide", help="Query cell's slide id (with --cell).")] = None,
    cell: Annotated[Optional[str], typer.Option("--cell", help="Query cell's id (with --slide).")] = None,
    image: Annotated[Optional[Path], typer.Option(help="Query image, embedded with the table's encoder.")] = None,
    x: Annotated[Optional[float], typer.Option("--x", help="Cell centre in --image (with --y); default the whole image.")] = None,
    y: Annotated[Optional[float], typer.Option("--y", help="Cell centre in --image (with --x).")] = None,
    vector: Annotated[Optional[Path], typer.Option(help="Query vector, a .npy of shape (dim,) or (1, dim).")] = None,
    k: Annotated[int, typer.Option("-k", "--k", min=1, help="How many neighbours.")] = 10,
    where: Annotated[Optional[str], typer.Option(help="SQL filter on the cell table, e.g. \"label = 'spherocyte'\": one expression (no ';' or comments), "
                                                                  "at most 1,000 AND/OR terms and 200,000 characters; many values: col IN (...).")] = None,
    exclude_same_slide: Annotated[bool, typer.Option("--exclude-same-slide", help="Drop neighbours from the query's slide.")] = False,
    montage_out: Annotated[Optional[Path], typer.Option("--montage", help="Write a PNG contact sheet of the query and its neighbours.")] = None,
    encoder: EncoderOpt = None,
    device: Annotated[str, typer.Option(help="cpu, cuda or auto: where an --image is embedded and, with a GPU build of faiss, where the index is searched.")] = "cpu",
    as_json: JsonOpt = False,
) -> None:
    """Find the cells most similar to a stored cell, an image or a vector (cosine similarity)."""
    with handle_errors():
        res = run_search(store, slide, cell, image=image, x=x, y=y, vector=vector, k=k, where=where,
                         exclude_same_slide=exclude_same_slide, encoder=encoder, device=device,
                         thumbnails=montage_out is not None)
        if montage_out is not None:
            montage(res, montage_out)
    out = res.to_dict()
    if montage_out is not None:
        out["montage"] = str(montage_out)
    if as_json:
        emit_json(out)
        return
    q = res.query
    what = (f"cell {q['slide_id']}/{q['cell_id']} ({q.get('label')})" if q["mode"] == "cell"
            else f"image {q['image']}" if q["mode"] == "image" else f"vector {q.get('source')}")
    typer.echo(f"{len(out['results'])} nearest to {what} in table {res.index['table']} "
               f"({'no' if res.index['kind'] == 'none' else res.index['kind']} index):")
    typer.echo(f"{'rank':>4} {'score':>7}  {'slide':<16} {'cell':<14} label")
    for r in out["results"]:
        typer.echo(f"{r['rank']:>4} {r['score']:>7.4f}  {r['slide_id']:<16} {r['cell_id']:<14} {r.get('label') or ''}")
    for note in res.notes:
        typer.echo(f"note: {note}")
    if montage_out is not None:
        typer.echo(f"montage: {montage_out}")


def register(app: typer.Typer) -> None:
    """Adds `index build|update|verify` and `search` to the main app."""
    app.add_typer(index_app, name="index")
    app.command("search")(search_cmd)
