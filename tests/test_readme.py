"""The README's commands exist and parse: documentation checked by tests."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest

from slurm_plugin.climain import cli

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_commands() -> list[str]:
    text = README.read_text()
    blocks = re.findall(r"```sh\n(.*?)```", text, re.S)
    lines = [line.split("#")[0].strip() for b in blocks for line in b.splitlines()]
    return [line for line in lines if line.startswith("gpuledger ")]


def test_readme_has_commands():
    assert len(readme_commands()) >= 15


@pytest.mark.parametrize("line", readme_commands())
def test_readme_command_parses(line):
    args = shlex.split(line)[1:]
    command: click.Command = cli
    ctx = click.Context(cli, info_name="gpuledger")
    while isinstance(command, click.Group):
        name, args = args[0], args[1:]
        sub = command.get_command(ctx, name)
        assert sub is not None, f"{line}: no command {name!r}"
        command = sub
    command.make_context(command.name, list(args))  # raises on unknown options / missing args


def test_quickstart_is_two_commands_that_exist():
    text = README.read_text()
    block = re.search(r"## Quickstart.*?```sh\n(.*?)```", text, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]
    assert len(commands) == 2
    root = README.parent
    for c in commands:
        assert (root / c).is_file() and (root / c).stat().st_mode & 0o111, c


def test_every_component_command_is_registered():
    for name in ("serve", "balance", "quote", "jobs", "reconcile", "job", "agent", "report",
                 "alerts"):
        assert cli.get_command(click.Context(cli), name) is not None, name
