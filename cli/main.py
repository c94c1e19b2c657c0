"""The `cytostore` command: one sub-command module per stage."""

from __future__ import annotations

import typer

from cli.info import encoders_cmd, info_cmd
from cli.ingest import ingest_cmd

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


def main() -> None:
    """Entry point of the console script."""
    app()


if __name__ == "__main__":
    main()
