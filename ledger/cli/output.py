"""How commands print: one JSON document (``--json``), ``key  value`` fields, or a table
(aligned; ``-n/--noheader``; ``-p/--parsable``, ``-P/--parsable2``: ``|``-separated as
sacctmgr and sreport print, with and without the trailing ``|``).

``@json_output(shape)`` gives a command its ``--json`` flag and declares what it prints
(:mod:`ledger.cli.shapes`); ``@no_json(why)`` says why a command has none (a daemon, a
document). ``@table_output`` gives a command that prints a table its format flags.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

import click

from ..amounts import PPM
from . import shapes

_TABLE = "gpuledger.table"


def _default(value):
    if isinstance(value, datetime):
        return shapes.rfc3339(value)
    raise TypeError(f"{type(value).__name__} is not JSON")


def ppm_number(ppm: int | None) -> float | int | None:
    """A rate or multiplier in ppm as a JSON number (1.5, or 2 when whole); null stays."""
    if ppm is None:
        return None
    value = Decimal(ppm) / PPM
    return int(value) if value == value.to_integral_value() else float(value)


def echo_json(data) -> None:
    click.echo(json.dumps(data, indent=2, default=_default))


def json_output(shape: str):
    """Give the command ``--json`` (its ``as_json`` argument) printing ``shape``."""
    shapes._parse(shape)

    def decorate(fn):
        fn.json_shape = shape
        return click.option("--json", "as_json", is_flag=True,
                            help="Print JSON (docs/cli-json.md).")(fn)
    return decorate


def no_json(why: str):
    """Declare that the command has no ``--json``, and why (docs/cli-json.md lists it)."""
    def decorate(fn):
        fn.json_exempt = why
        return fn
    return decorate


@dataclass(frozen=True)
class TableStyle:
    header: bool = True
    separator: str | None = None  # "|": parsable
    trailing: bool = True


def _set_style(ctx: click.Context, param: click.Parameter, value) -> None:
    if not value:
        return
    style = ctx.meta.get(_TABLE, TableStyle())
    if param.name == "noheader":
        style = TableStyle(False, style.separator, style.trailing)
    else:
        style = TableStyle(style.header, "|", param.name == "parsable")
    ctx.meta[_TABLE] = style


def table_output(fn):
    """Give a command that prints a table ``-n/--noheader``, ``-p/--parsable`` and
    ``-P/--parsable2``."""
    fn.prints_table = True
    for flags, name, text in reversed((
            (("-n", "--noheader"), "noheader", "No header line."),
            (("-p", "--parsable"), "parsable", "'|'-separated, with a trailing '|'."),
            (("-P", "--parsable2"), "parsable2", "'|'-separated, no trailing '|'."))):
        fn = click.option(*flags, name, is_flag=True, expose_value=False, is_eager=True,
                          callback=_set_style, help=text)(fn)
    return fn


def _cell(value, parsable: bool) -> str:
    if value is None or value == "":
        return "" if parsable else "-"
    text = str(value)
    if not text.isprintable():  # a stored name with a line break must not forge a row
        text = ascii(text)[1:-1]
    return text.replace("|", "\\|") if parsable else text


def echo_table(headers: list[str], rows: list[list]) -> None:
    ctx = click.get_current_context()
    if not getattr(ctx.command.callback, "prints_table", False):
        raise RuntimeError(f"{ctx.command_path} prints a table without @table_output")
    style = ctx.meta.get(_TABLE, TableStyle())
    if style.separator:
        tail = style.separator if style.trailing else ""
        lines = ([headers] if style.header else []) + [[_cell(c, True) for c in r] for r in rows]
        for line in lines:
            click.echo(style.separator.join(line) + tail)
        return
    cells = [[_cell(c, False) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    if style.header:
        click.echo("  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip())
    for r in cells:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def echo_fields(pairs: list[tuple[str, object]]) -> None:
    width = max(len(k) for k, _ in pairs)
    for key, value in pairs:
        click.echo(f"{key:<{width}}  {_cell(value, False)}")
