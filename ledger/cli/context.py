"""What every command shares: the config path, a lazily opened ledger, output helpers."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta
from functools import cached_property

import click

from .. import config as config_mod
from ..errors import InvalidInput


class App:
    def __init__(self, config_path: str | None):
        self.config_path = config_path

    @cached_property
    def config(self) -> config_mod.Config:
        return config_mod.load(self.config_path)

    @cached_property
    def ledger(self):
        from ..service import Ledger

        return Ledger.from_config(self.config)


pass_app = click.make_pass_decorator(App)


def echo_json(data) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=False, default=str))


def echo_fields(pairs: list[tuple[str, object]]) -> None:
    width = max(len(k) for k, _ in pairs)
    for key, value in pairs:
        click.echo(f"{key:<{width}}  {'-' if value in (None, '') else value}")


def echo_table(headers: list[str], rows: list[list]) -> None:
    cells = [[("-" if c is None else str(c)) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    click.echo("  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip())
    for r in cells:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def parse_when(text: str | None, *, end_of_day: bool) -> datetime | None:
    """ISO date (``2027-01-31``: the end of that day, UTC, for expiries) or datetime."""
    if text is None:
        return None
    try:
        if len(text) == 10:
            d = date.fromisoformat(text)
            start = datetime(d.year, d.month, d.day, tzinfo=UTC)
            return start + timedelta(days=1) if end_of_day else start
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidInput(f"not an ISO date or time: {text!r}") from None
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


def read_token_arg(value: str) -> str:
    """``TOKEN``, ``ID`` or ``@FILE`` (``@-`` reads stdin)."""
    if value.startswith("@"):
        path = value[1:]
        try:
            if path == "-":
                return click.get_text_stream("stdin").read().strip()
            with open(path) as fh:
                return fh.read(65536).strip()
        except OSError as exc:
            raise InvalidInput(f"cannot read token file {path}: {exc.strerror}") from None
    return value.strip()
