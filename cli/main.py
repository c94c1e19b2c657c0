"""The `cytostore` command: one sub-command module per stage."""

from __future__ import annotations

import typer

from cli.fewshot import fewshot_app
from cli.info import encoders_cmd, info_cmd
from cli.ingest import ingest_cmd
from cli.maps import register as register_maps
from cli.mil import mil_app
from cli.search import register as register_search

app = typer.Typer(
    name="cytostore",
    help="A cell-level feature store for cytology: ingest, search, classify, map.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("ingest")(ingest_cmd)
app.command("info")(info_cmd)
app.command("encoders")(encoders_cmd)
app.add_typer(mil_app, name="mil")
app.add_typer(fewshot_app, name="fewshot")
register_search(app)  # `index build|verify` and `search`
register_maps(app)  # `map`, `mosaic` and `qc`


def main() -> None:
    """Entry point of the console script."""
    app()


if __name__ == "__main__":
    main()
