"""Helpers shared by the sub-commands: JSON output, errors, exit codes, progress.

Exit codes: 0 success; 1 the run finished but some inputs failed (recorded in the
store); 2 a usage or input error, or an environment the command cannot work in
(disk full, read-only store), with a message that says what and how to fix it;
3 an unexpected internal error (the traceback is printed with ``cytostore --debug``).
"""

from __future__ import annotations

import errno
import json
import sys
import time
import traceback
from typing import Any, NoReturn

import typer

from cytostore.errors import CytostoreError

StoreOpt = typer.Option(..., "--store", "-s", help="Store folder (or object-store URI).")
QuietOpt = typer.Option("--quiet", "-q", help="No progress on standard error.")

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


def echo_rows(columns: list[str], rows: list[dict[str, Any]], total: int, what: str) -> None:
    """Prints rows as tab-separated text under a header; says on stderr when ``rows`` is a part of ``total``."""
    typer.echo("\t".join(columns))
    for r in rows:
        typer.echo("\t".join("" if v is None else str(v) for v in r.values()))
    if len(rows) < total:
        typer.echo(f"showing {len(rows)} of {total} {what}; --limit 0 shows all", err=True)


def fail(err: Exception, code: int = EXIT_USAGE) -> NoReturn:
    """Prints a cytostore error to standard error and exits."""
    typer.echo(f"error: {err}", err=True)
    raise typer.Exit(code)


REPORT_EVERY_S = 10.0  # off a terminal, one progress line at most this often


class Progress:
    """Progress of a long command on standard error, the same everywhere.

    On a terminal a tqdm bar; otherwise (a log, a notebook, a pipe) one line every
    ``every`` seconds with the counts and the rate; nothing when quiet. ``close``
    prints the final counts, which callers pass from the finished report, so the
    last thing shown is never a stale refresh.

    Args:
        what: the command, first word of every line (``ingest``, ``export h5``...).
        unit: what ``done`` counts (cells, slides, images).
        total: how many there are, when known.
        quiet: print nothing.
        every: seconds between two lines off a terminal (default ``REPORT_EVERY_S``).
        clock: seconds, monotonic (tests pass a fake one).
        stream: where to write (standard error).
        tty: draw a bar (default: whether ``stream`` is a terminal).
    """

    def __init__(self, what: str, unit: str, total: int | None = None, quiet: bool = False,
                 every: float | None = None, clock=time.monotonic, stream=None, tty: bool | None = None):
        self.what, self.unit, self.total, self.quiet, self.clock = what, unit, total, quiet, clock
        self.every = REPORT_EVERY_S if every is None else every
        self.stream = stream if stream is not None else sys.stderr
        self.tty = (not quiet) and (self.stream.isatty() if tty is None else tty)
        self.done, self.stats = 0, {}
        self.start = self.last = clock()
        self.lines = 0  # lines written off a terminal
        self._bar = None
        self._closed = False

    def update(self, done: int, total: int | None = None, **stats: Any) -> None:
        """Sets the absolute count (and total, and named counts such as ``added=``)."""
        self.done = int(done)
        if total is not None:
            self.total = int(total)
        self.stats.update(stats)
        if self.quiet or self._closed:
            return
        if self.tty:
            self._draw()
            return
        now = self.clock()
        if now - self.last >= self.every:
            self.last = now
            self._line(now)

    def close(self, done: int | None = None, **stats: Any) -> None:
        """Prints the final counts (a last line, or the bar's last refresh) once."""
        if done is not None:
            self.done = int(done)
        self.stats.update(stats)
        if self.quiet or self._closed:
            self._closed = True
            return
        self._closed = True
        if self.tty:
            self._draw()
            self._bar.close()
        else:
            self._line(self.clock(), final=True)

    def callback(self, done: int, total: int, what: Any = None) -> None:
        """A ``(done, total, what)`` callback, as the export and cluster functions call it."""
        self.update(done, total, **({"at": str(what)[:40]} if what is not None else {}))

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._bar is not None and not self._closed:
            self._bar.close()  # an error: the bar goes, the message that follows says why
            self._closed = True

    def rate(self, now: float | None = None) -> float:
        """``done`` per second since the start."""
        elapsed = (self.clock() if now is None else now) - self.start
        return self.done / elapsed if elapsed > 0 else 0.0

    def _counts(self) -> str:
        return f"{self.done}/{self.total}" if self.total else f"{self.done}"

    def _extra(self) -> str:
        return ", ".join(f"{k} {v}" for k, v in self.stats.items())

    def _line(self, now: float, final: bool = False) -> None:
        extra = self._extra()
        text = (f"{self.what}: {'done, ' if final else ''}{self._counts()} {self.unit}"
                + (f", {extra}" if extra else "") + f", {self.rate(now):.1f} {self.unit}/s")
        print(text, file=self.stream, flush=True)
        self.lines += 1

    def _draw(self) -> None:
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, unit=" " + self.unit, desc=self.what, dynamic_ncols=True,
                             smoothing=0.1, file=self.stream)
        b = self._bar
        if self.total is not None and b.total != self.total:
            b.total = self.total
        b.n = self.done
        if self.stats:
            b.set_postfix_str(self._extra(), refresh=False)
        b.refresh()


def progress_callback(what: str, unit: str, quiet: bool):
    """A ``(done, total, what)`` callback printing through :class:`Progress` (None when quiet);
    the line for the last item is printed when ``done`` reaches ``total``."""
    if quiet:
        return None
    p = Progress(what, unit)

    def call(done: int, total: int, at: Any = None) -> None:
        p.callback(done, total, at)
        if total and done >= total:
            p.close()

    return call


def print_score(score: dict[str, Any] | None, what: str, excluded: str = "") -> None:
    """Prints a score against stored labels (``cytostore.fewshot.scoring.agreement``); nothing when None."""
    if not score or not score.get("n"):
        if score:
            typer.echo(f"no {what} left to score against stored labels{excluded}")
        return
    from cytostore.fewshot.scoring import confusion_lines

    typer.echo(f"against the stored labels of {score['n']} {what}{excluded}: accuracy {score['accuracy']:.3f}, "
               f"balanced accuracy {score['balanced_accuracy']:.3f}, macro-F1 {score['macro_f1']:.3f}")
    for line in confusion_lines(score):
        typer.echo("  " + line)


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
