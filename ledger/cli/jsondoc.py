"""docs/cli-json.md: the JSON contract, written from the commands themselves (every leaf of
the ``gpuledger`` tree declares what its ``--json`` prints, or why it has none)."""

from __future__ import annotations

import click

from . import shapes

INTRO = """\
# JSON output of the `gpuledger` commands

<!-- Generated from the commands' declarations by `gpuledger json-reference`;
tests/test_cli_json.py keeps it in step and checks every command's output against it. -->

Every command that changes the ledger or reads it takes `--json` and then prints exactly one
JSON document on standard output. The contract:

- **Timestamps** are RFC 3339 in UTC with whole seconds and a `Z`: `2027-06-30T23:59:59Z`.
  One format everywhere (type `timestamp` below).
- **Typed values**: amounts are integers of GPU-seconds at the reference rate (`face`,
  `amount`, ...) with a GPU-hours number beside them (`face_hours`, three decimals); rates
  and multipliers are numbers (`1.5`) with their exact integer in parts per million
  (`rate_ppm`); flags are `true`/`false`; an unknown or unset value is `null`.
- **Errors**: exit status 1, nothing on standard output, one line `Error: <what and what to
  do>` on standard error, in `--json` mode as in text mode. Nothing was changed.
- **Refusals** (a token that cannot pay): exit status 1 and the `Error:` line on standard
  error, and on standard output the numbers, so a script need not parse the text: `hold
  reserve` prints a [refusal](#refusal), `quote` its [quote](#quote) with `covers: false`,
  `reason` and `message`.
- Fields may be added in later versions; none is removed or changes type without a note in
  the release's changes.

Tables (`token list`, `hold list`, `journal`, ...) take `-n/--noheader`, and
`-p/--parsable` or `-P/--parsable2` for `|`-separated lines as `sacctmgr` and `sreport`
print them (with and without a trailing `|`; a `|` inside a value is written `\\|`, an
empty value is empty).

A shape `T?` is T or `null`; a field marked *optional* may be absent.
"""


def leaves(group: click.Group, ctx: click.Context | None = None,
           path: tuple[str, ...] = ()) -> list[tuple[str, click.Command]]:
    """(``gpuledger a b``, command) for every command of the tree, in name order."""
    ctx = ctx or click.Context(group, info_name="gpuledger")
    out = []
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        if isinstance(cmd, click.Group):
            out += leaves(cmd, click.Context(cmd, parent=ctx, info_name=name), path + (name,))
        else:
            out.append((" ".join(("gpuledger",) + path + (name,)), cmd))
    return out


def shape_of(cmd: click.Command) -> str | None:
    return getattr(cmd.callback, "json_shape", None)


def exempt(cmd: click.Command) -> str | None:
    return getattr(cmd.callback, "json_exempt", None)


def reference(root: click.Group) -> str:
    out = [INTRO, "## Commands", "", "| command | `--json` prints |", "|---|---|"]
    named: list[str] = []
    without = []
    for path, cmd in leaves(root):
        shape = shape_of(cmd)
        if shape is None:
            without.append((path, exempt(cmd) or "(undeclared)"))
            continue
        out.append(f"| `{path}` | {shapes.shown(shape)} |")
        named += [n for n in shapes.objects_in(shape) if n not in named]
    out += ["", "Commands without `--json`:", ""]
    out += [f"- `{path}`: {why}" for path, why in without]
    out += ["", "## Objects", ""]
    for name in sorted(set(named) | {"refusal"}):
        spec = shapes.OBJECTS[name]
        out += [f"### {name}", "", spec.doc, "", "| field | type | meaning |", "|---|---|---|"]
        for f in spec.fields:
            doc = f.doc.replace("|", "\\|") + (" *(optional)*" if f.optional else "")
            out.append(f"| `{f.name}` | {shapes.shown(f.shape)} | {doc} |")
        out.append("")
    return "\n".join(out)
