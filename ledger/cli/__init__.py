"""The ``gpuledger`` command: a thin click front over the library.

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
    """The root group: commands are registered on first use (``_register``), so importing
    ``ledger.cli`` loads neither the optional components nor the modules that import it."""

    _registered = False

    def _ensure(self) -> None:
        if not ErrorHandlingGroup._registered:
            ErrorHandlingGroup._registered = True
            _register()

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


@click.group(cls=ErrorHandlingGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", type=click.Path(dir_okay=False), envvar=None,
              help="Config file (default: $GPULEDGER_CONFIG, else /etc/gpuledger/gpuledger.toml).")
@click.version_option(package_name="gpuledger")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None) -> None:
    """gpuledger: GPU-hours as signed, transferable tokens for Slurm clusters."""
    from .context import App

    ctx.obj = App(config_path)


def _register() -> None:
    from . import admin, holds, tokens

    for module in (admin, tokens, holds):
        for command in module.COMMANDS:
            cli.add_command(command)
    for dotted in _OPTIONAL:
        module_name, _, attr = dotted.partition(":")
        try:
            present = importlib.util.find_spec(module_name) is not None
        except ModuleNotFoundError:
            present = False
        if not present:
            continue  # that component is not part of this build
        module = importlib.import_module(module_name)
        for command in getattr(module, attr):
            cli.add_command(command)


# Commands that live beside their components (daemon, Slurm hooks, agent, reports).
_OPTIONAL = (
    "ledger.daemon.cli:COMMANDS",
    "slurm_plugin.cli:COMMANDS",
    "reports.cli:COMMANDS",
)


def main() -> None:
    cli(prog_name="gpuledger")
