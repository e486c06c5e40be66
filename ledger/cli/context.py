"""What every command shares: the config path, a lazily opened ledger, reading times and
tokens from the command line. How commands print is :mod:`ledger.cli.output`."""

from __future__ import annotations

from datetime import UTC, date, datetime, time
from functools import cached_property

import click

from .. import config as config_mod
from ..errors import InvalidInput
from ..secretfile import read_secret_file
from .output import echo_fields, echo_json, echo_table  # noqa: F401  (re-exported)


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

END_OF_DAY = time(23, 59, 59)  # a date as an expiry: valid through that day, UTC


def parse_when(text: str | None, *, end_of_day: bool) -> datetime | None:
    """An ISO date or date and time, in UTC unless it names its offset.

    A date alone (``2027-06-30``) is the start of that day, or with ``end_of_day`` (an
    expiry) its last second, 23:59:59 UTC: the token is valid through that day and shows
    that date."""
    if text is None:
        return None
    try:
        if len(text) == 10:
            d = date.fromisoformat(text)
            return datetime.combine(d, END_OF_DAY if end_of_day else time(0), tzinfo=UTC)
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidInput(f"not an ISO date or time: {text!r} (e.g. 2027-06-30 or "
                           "2027-06-30T18:00:00Z)") from None
    return (dt if dt.tzinfo else dt.replace(tzinfo=UTC)).astimezone(UTC)


def read_token_arg(value: str) -> str:
    """``TOKEN``, ``ID`` or ``@FILE`` (``@-`` reads stdin). A file must pass the SPANK
    plugin's check (``ledger.secretfile``: yours or root's, no group or other access)."""
    if value.startswith("@"):
        path = value[1:]
        if path == "-":
            return click.get_text_stream("stdin").read(65536).strip()
        return read_secret_file(path, "token file").strip()
    return value.strip()
