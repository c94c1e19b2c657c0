"""The `cytostore` command: one sub-command module per stage."""

from __future__ import annotations

import sys
from typing import Optional

import typer

from cli.browse import register as register_browse
from cli.common import DEBUG, report_unexpected
from cli.evaluate import evaluate_cmd
from cli.export import export_app
from cli.fewshot import fewshot_app
from cli.harmonise import harmonise_cmd
from cli.encoders import encoders_app
from cli.info import info_cmd
from cli.ingest import ingest_cmd
from cli.maps import register as register_maps
from cli.mil import mil_app
from cli.search import register as register_search
from cli.store import store_app

app = typer.Typer(
    name="cytostore",
    help="A cell-level feature store for cytology: ingest, search, classify, map.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        from cytostore import __version__

        typer.echo(f"cytostore {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Print the traceback of an unexpected internal error (exit 3)."),
    version: Optional[bool] = typer.Option(None, "--version", callback=_version, is_eager=True,
                                           help="Print the version and exit."),
) -> None:
    """A cell-level feature store for cytology: ingest, search, classify, map.

    Exit codes: 0 ok; 1 finished, some inputs failed (recorded in the store); 2 usage or input
    error (the message says how to fix it); 3 unexpected internal error (see --debug).
    """
    DEBUG["on"] = debug


app.command("ingest")(ingest_cmd)
app.command("info")(info_cmd)
app.add_typer(encoders_app, name="encoders")  # `encoders` (list), `encoders list|train`
app.command("evaluate")(evaluate_cmd)
app.command("harmonise")(harmonise_cmd)
app.add_typer(mil_app, name="mil")
app.add_typer(fewshot_app, name="fewshot")
app.add_typer(store_app, name="store")
register_search(app)  # `index build|verify` and `search`
register_maps(app)  # `map`, `mosaic` and `qc`
app.add_typer(export_app, name="export")  # `export geojson|anndata|h5`
register_browse(app)  # `slides`, `cells` and `cluster`


def main() -> None:
    """Entry point of the console script: anything that escapes a command exits 3, never 1."""
    try:
        app(standalone_mode=True)
    except SystemExit:
        raise
    except Exception as e:  # noqa: BLE001 - the last line of defence of the exit-code contract
        try:
            report_unexpected(e)
        except typer.Exit as done:
            sys.exit(done.exit_code)


if __name__ == "__main__":
    main()
