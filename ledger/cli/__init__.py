"""The ledger's click commands: a thin front over the library (the whole ``gpuledger``
command, with the reports' and the Slurm plugin's commands, is ``slurm_plugin.climain``).

Typed library errors become ``Error: <message>`` on stderr and exit status 1;
nothing here decides a business rule.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

import click
from sqlalchemy.exc import DBAPIError

from ..db import storage_error
from ..errors import ConfigError, LedgerError
from .context import App, pass_app  # noqa: F401  (re-exported for command modules)

DEBUG_ENV = "GPULEDGER_DEBUG"  # set: an unexpected exception shows its traceback
CONFIG_HELP = ("Config file (default: $GPULEDGER_CONFIG, else /etc/gpuledger/gpuledger.toml); "
               "before or after the command's name.")


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
            _config_everywhere(self)

    def list_commands(self, ctx):
        self._ensure()
        return super().list_commands(ctx)

    def get_command(self, ctx, cmd_name):
        self._ensure()
        return super().get_command(ctx, cmd_name)

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.UsageError as exc:  # the root's own options
            usage_error(exc)

    def invoke(self, ctx):
        """Every failure is one ``Error: …`` line on stderr and exit status 1: a usage
        mistake (with the --help to read), typed library errors by their text, a database
        or file error by what failed, anything else as an internal error (its traceback with
        $GPULEDGER_DEBUG set)."""
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:
            usage_error(exc)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except LedgerError as exc:
            fail(ctx, str(exc))
        except DBAPIError as exc:  # a driver error that escaped the library's own mapping
            fail(ctx, str(storage_error(exc)))
        except BrokenPipeError:
            sys.stderr.close()
            ctx.exit(1)
        except OSError as exc:  # a file the command had to read or write
            where = f"{exc.filename}: " if exc.filename else ""
            fail(ctx, f"{where}{exc.strerror or exc}")
        except Exception as exc:  # noqa: BLE001 - never a traceback, unless asked for
            if os.environ.get(DEBUG_ENV):
                raise
            fail(ctx, f"internal error ({type(exc).__name__}: {exc}); this is a bug: "
                      f"rerun with {DEBUG_ENV}=1 and report the traceback")


def usage_error(exc: click.UsageError) -> None:
    """A usage mistake as one line, exit status 1 (click prints four, exit 2); a group
    named without a command shows its help, as click does."""
    if isinstance(exc, click.exceptions.NoArgsIsHelpError):
        raise exc
    where = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx is not None else ""
    click.echo(f"Error: {' '.join(exc.format_message().split())}{where}", err=True)
    sys.exit(1)


def fail(ctx: click.Context, message: str) -> None:
    """One ``Error:`` line (the message's own line breaks made visible), exit status 1."""
    click.echo(f"Error: {' / '.join(message.splitlines()) or 'failed'}", err=True)
    ctx.exit(1)


def _late_config(ctx: click.Context, _param, value) -> None:
    """``--config`` after the command's name: the same as before it (both: the same file)."""
    if value is None:
        return
    app = ctx.find_object(App)
    if app is None:
        return
    if app.config_path and os.path.abspath(app.config_path) != os.path.abspath(value):
        raise ConfigError(f"--config given twice: {app.config_path} and {value}")
    app.config_path = value


def _config_everywhere(group: click.Group) -> None:
    """Every command takes ``--config`` too (``gpuledger token list --config F``); one with
    a ``--config`` of its own (``agent``: agent.toml) keeps it."""
    for cmd in list(group.commands.values()):
        if isinstance(cmd, click.Group):
            _config_everywhere(cmd)
        elif not any("--config" in getattr(p, "opts", ()) for p in cmd.params):
            cmd.params.append(click.Option(
                ["--config", "late_config"], type=click.Path(dir_okay=False),
                expose_value=False, is_eager=True, callback=_late_config, help=CONFIG_HELP))


def root(sources: tuple[str, ...]) -> click.Group:
    """A ``gpuledger`` root group with the commands of ``sources`` (``module:ATTR``); a
    source whose module is not part of this build is left out."""

    @click.group(cls=ErrorHandlingGroup, sources=sources,
                 context_settings={"help_option_names": ["-h", "--help"]})
    @click.option("--config", "config_path", type=click.Path(dir_okay=False), envvar=None,
                  help=CONFIG_HELP)
    @click.version_option(package_name="gpuledger")
    @click.pass_context
    def cli(ctx: click.Context, config_path: str | None) -> None:
        """gpuledger: GPU-hours as signed, transferable tokens for Slurm clusters."""
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
