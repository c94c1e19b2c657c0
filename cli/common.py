"""Helpers shared by the sub-commands: JSON output, errors, progress bars."""

from __future__ import annotations

import json
import sys
from typing import Any, NoReturn

import typer

from cytostore.errors import CytostoreError

StoreOpt = typer.Option(..., "--store", "-s", help="Store folder (or object-store URI).")


def emit_json(obj: Any) -> None:
    """Prints one JSON object as the last line of standard output."""
    typer.echo(json.dumps(obj, default=str, sort_keys=False))


def fail(err: Exception, code: int = 2) -> NoReturn:
    """Prints a cytostore error to standard error and exits."""
    typer.echo(f"error: {err}", err=True)
    raise typer.Exit(code)


def progress_bar(total: int | None, unit: str, enabled: bool):
    """A tqdm bar on standard error, or None when quiet or not on a terminal."""
    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, dynamic_ncols=True, smoothing=0.1, file=sys.stderr)


class handle_errors:
    """Context manager turning CytostoreError into a clean message and exit code 2."""

    def __enter__(self) -> "handle_errors":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is not None and isinstance(exc, CytostoreError):
            fail(exc)
        return False
