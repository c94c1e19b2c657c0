"""Validation of the SQL filters (``--where``) handed to Lance.

Lance's parser reads one expression and silently ignores what follows a ``;``,
an unmatched ``)`` or a ``--`` comment (``"1=1; DROP TABLE cells"`` matches every
row), and its planner recurses once per boolean term, so 100,000 ``OR`` terms
crash the process. Every filter a user gives (CellStore reads, ``store delete``,
search, cluster, exports) goes through ``check_where`` first: it refuses those
shapes with an ``InputError`` saying what is wrong and how to write it instead.
"""

from __future__ import annotations

import re

from cytostore.errors import InputError

MAX_FILTER_CHARS = 200_000  # longest filter accepted (an IN list of ~10,000 short ids fits)
MAX_FILTER_TERMS = 1_000  # most AND/OR-joined terms (the planner recurses once per term)
MAX_FILTER_DEPTH = 64  # deepest nesting of parentheses
_BOOL = re.compile(r"\b(AND|OR)\b", re.IGNORECASE)
_QUOTES = {"'": "string", '"': "quoted name", "`": "quoted name"}


def check_where(where: str | None, what: str = "--where") -> str | None:
    """Returns ``where`` unchanged when it is one well-formed filter expression.

    Args:
        where: the SQL filter (None or empty: no filter).
        what: how the caller names it in messages.

    Raises:
        InputError: the filter holds ``;`` or a comment, has unbalanced parentheses or
            quotes, or is longer / has more terms / nests deeper than the documented limits.
    """
    if where is None:
        return None
    if not isinstance(where, str):
        raise InputError(f"{what} must be text (a SQL filter), got {type(where).__name__}")
    if len(where) > MAX_FILTER_CHARS:
        raise InputError(f"{what} is {len(where):,} characters long; the limit is {MAX_FILTER_CHARS:,}. "
                         "Select by a column you can match in a few terms, or run the command on parts of the set")
    outside = _outside_quotes(where, what)
    if ";" in outside:
        raise InputError(f"{what} {_short(where)} holds ';': a filter is one expression, and Lance would ignore "
                         "the text after ';'. Remove it (combine conditions with AND / OR)")
    if "--" in outside or "/*" in outside:
        raise InputError(f"{what} {_short(where)} holds a SQL comment ('--' or '/*'), which would hide the rest "
                         "of the filter; remove it")
    depth = deepest = 0
    for ch in outside:
        if ch == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise InputError(f"{what} {_short(where)} has a ')' without its '('; Lance would ignore the text "
                                 "after it. Balance the parentheses")
    if depth:
        raise InputError(f"{what} {_short(where)} has {depth} '(' never closed; balance the parentheses")
    if deepest > MAX_FILTER_DEPTH:
        raise InputError(f"{what} nests parentheses {deepest} deep; the limit is {MAX_FILTER_DEPTH}: flatten it")
    terms = len(_BOOL.findall(outside)) + 1
    if terms > MAX_FILTER_TERMS:
        raise InputError(f"{what} joins {terms:,} terms with AND/OR; the limit is {MAX_FILTER_TERMS:,}. "
                         "Write many values of one column as `column IN ('a', 'b', ...)`")
    return where


def _outside_quotes(where: str, what: str) -> str:
    """``where`` with every quoted string or name replaced by a blank (quotes checked closed)."""
    out: list[str] = []
    i, n = 0, len(where)
    while i < n:
        ch = where[i]
        if ch in _QUOTES:
            j = i + 1
            while True:
                j = where.find(ch, j)
                if j < 0:
                    raise InputError(f"{what} {_short(where)} opens a {_QUOTES[ch]} with {ch} at character {i + 1} "
                                     f"and never closes it; close it (write {ch}{ch} for a {ch} inside it)")
                if j + 1 < n and where[j + 1] == ch:  # a doubled quote stands for itself
                    j += 2
                    continue
                break
            out.append(" ")
            i = j + 1
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def _short(where: str) -> str:
    return repr(where if len(where) <= 120 else where[:117] + "...")
