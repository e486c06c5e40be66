"""The ledger's click commands: a thin front over the library (the whole ``gpuledger``
command, with the reports' and the Slurm plugin's commands, is ``slurm_plugin.climain``).

Typed library errors become ``Error: <message>`` on stderr and exit status 1;
nothing here decides a business rule.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

import click
from sqlalchemy.exc import DBAPIError

from ..db import storage_error
from ..errors import LedgerError
from .context import pass_app  # noqa: F401  (re-exported for command modules)


class ErrorHandlingGroup(click.Group):
    """A root group: its commands are registered on first use from ``sources``
    (``module:ATTR`` lists of commands), so importing the root loads no command module."""

    def __init__(self, *args, sources: tuple[str, ...] = (), **kw):
        super().__init__(*args, **kw)
        self.sources = sources
        self._registered = False

    def _ensure(self) -> None:
        if not self._registered:
            self._registered = True
            _register(self, self.sources)

    def list_commands(self, ctx):
        self._ensure()
        return super().list_commands(ctx)

    def get_command(self, ctx, cmd_name):
        self._ensure()
        return super().get_command(ctx, cmd_name)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except LedgerError as exc:
            click.echo(f"Error: {exc}", err=True)
            ctx.exit(1)
        except DBAPIError as exc:  # a driver error that escaped the library's own mapping
            click.echo(f"Error: {storage_error(exc)}", err=True)
            ctx.exit(1)
        except BrokenPipeError:
            sys.stderr.close()
            ctx.exit(1)


def root(sources: tuple[str, ...]) -> click.Group:
    """A ``gpuledger`` root group with the commands of ``sources`` (``module:ATTR``); a
    source whose module is not part of this build is left out."""

    @click.group(cls=ErrorHandlingGroup, sources=sources,
                 context_settings={"help_option_names": ["-h", "--help"]})
    @click.option("--config", "config_path", type=click.Path(dir_okay=False), envvar=None,
                  help="Config file (default: $GPULEDGER_CONFIG, else "
                       "/etc/gpuledger/gpuledger.toml).")
    @click.version_option(package_name="gpuledger")
    @click.pass_context
    def cli(ctx: click.Context, config_path: str | None) -> None:
        """gpuledger: GPU-hours as signed, transferable tokens for Slurm clusters."""
        from .context import App

        ctx.obj = App(config_path)

    return cli


def _register(group: click.Group, sources: tuple[str, ...]) -> None:
    for dotted in sources:
        module_name, _, attr = dotted.partition(":")
        try:
            present = importlib.util.find_spec(module_name) is not None
        except ModuleNotFoundError:
            present = False
        if not present:
            continue  # that component is not part of this build
        module = importlib.import_module(module_name)
        for command in getattr(module, attr):
            group.add_command(command)


# The ledger's own commands. The ``gpuledger`` command adds the reports' and the Slurm
# plugin's above them (``slurm_plugin.climain``): the ledger imports nothing above it.
LEDGER_COMMANDS = (
    "ledger.cli.admin:COMMANDS",
    "ledger.cli.tokens:COMMANDS",
    "ledger.cli.holds:COMMANDS",
    "ledger.daemon.cli:COMMANDS",
)
cli = root(LEDGER_COMMANDS)


def main() -> None:
    """The ledger's commands alone (the daemon's ``serve`` starts its second process so)."""
    cli(prog_name="gpuledger")
