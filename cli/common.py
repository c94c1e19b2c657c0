"""Helpers shared by the sub-commands: JSON output, errors, exit codes, progress bars.

Exit codes: 0 success; 1 the run finished but some inputs failed (recorded in the
store); 2 a usage or input error, or an environment the command cannot work in
(disk full, read-only store), with a message that says what and how to fix it;
3 an unexpected internal error (the traceback is printed with ``cytostore --debug``).
"""

from __future__ import annotations

import errno
import json
import sys
import traceback
from typing import Any, NoReturn

import typer

from cytostore.errors import CytostoreError

StoreOpt = typer.Option(..., "--store", "-s", help="Store folder (or object-store URI).")

EXIT_OK, EXIT_FAILURES, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3
DEBUG = {"on": False}  # set by `cytostore --debug`

# Environment faults that the user can fix; anything else unexpected is an internal error.
_ENV_ERRNOS = {
    errno.ENOSPC: "the disk is full; free some space",
    errno.EDQUOT: "the disk quota is exceeded; free some space",
    errno.EROFS: "the file system is read-only; use a writable --store",
    errno.EACCES: "permission denied; fix the permissions or use another --store",
    errno.EPERM: "operation not permitted; fix the permissions or use another --store",
}


def emit_json(obj: Any) -> None:
    """Prints one JSON object as the last line of standard output."""
    typer.echo(json.dumps(obj, default=str, sort_keys=False))


def fail(err: Exception, code: int = EXIT_USAGE) -> NoReturn:
    """Prints a cytostore error to standard error and exits."""
    typer.echo(f"error: {err}", err=True)
    raise typer.Exit(code)


def progress_bar(total: int | None, unit: str, enabled: bool):
    """A tqdm bar on standard error, or None when quiet or not on a terminal."""
    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, dynamic_ncols=True, smoothing=0.1, file=sys.stderr)


def _environment_error(exc: BaseException) -> OSError | None:
    """The OSError (disk full, read-only, permissions) behind ``exc``, if any."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _ENV_ERRNOS:
            return exc
        text = str(exc)
        for code, _ in _ENV_ERRNOS.items():
            # Lance and Arrow wrap OS errors in their own exception types, keeping the text.
            if isinstance(exc, Exception) and f"os error {code})" in text:
                return OSError(code, text)
        exc = exc.__cause__ or exc.__context__
    return None


def report_unexpected(exc: BaseException) -> NoReturn:
    """Exit 2 for an environment fault the user can fix, else 3 with the traceback behind --debug."""
    env = _environment_error(exc)
    if env is not None:
        where = f"{env.filename}: " if getattr(env, "filename", None) else ""
        typer.echo(f"error: {where}{_ENV_ERRNOS[env.errno]} ({env.strerror or env}); what was already "
                   "committed to the store is kept: run the command again afterwards", err=True)
        raise typer.Exit(EXIT_USAGE)
    if DEBUG["on"]:
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    typer.echo(f"internal error: {type(exc).__name__}: {exc}\n"
               + ("" if DEBUG["on"] else "run again with `cytostore --debug ...` to see the traceback; ")
               + "please report it with the command that caused it", err=True)
    raise typer.Exit(EXIT_INTERNAL)


class handle_errors:
    """Context manager: CytostoreError -> its message and exit 2; anything unexpected -> exit 3."""

    def __enter__(self) -> "handle_errors":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is None or isinstance(exc, (typer.Exit, typer.Abort, KeyboardInterrupt, SystemExit)):
            return False
        if isinstance(exc, CytostoreError):
            fail(exc)
        report_unexpected(exc)
