"""The files made from the configuration schema (``ledger.config``): job_submit.conf
(rendered from ``[submit]``, the only file job_submit.lua reads), the commented gpuledger.toml
``gpuledger init`` writes, and docs/config.md (``reference``; tests/test_config_doc.py keeps it
in step with the schema)."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

from . import schema
from .config import SECTIONS, Config
from .errors import ConfigError

# -- job_submit.conf -------------------------------------------------------------------------

def render_submit_conf(config: Config) -> str:
    """job_submit.conf for job_submit.lua's key = value reader, from [submit] (and the
    cluster, and the daemon's socket when [submit] names none)."""
    s = config.submit
    lines = [
        f"# Generated from {config.path} ([submit]) by `gpuledger config render-submit-conf`.",
        "# Do not edit: change gpuledger.toml and render again (docs/config.md).",
        f"socket = {config.submit_socket}",
        f"timeout = {s.timeout!r}",
        f"on_ledger_unavailable = {s.on_ledger_unavailable}",
        f"free_accounts = {','.join(s.free_accounts)}",
        f"cluster = {config.cluster or ''}",
    ]
    return "\n".join(lines) + "\n"


def write_submit_conf(config: Config, dest: Path, *, check: bool = False) -> bool:
    """Write ``dest`` (mode 0644, atomically) when it differs; whether it did (or would)."""
    text = render_submit_conf(config)
    try:
        if dest.read_text() == text:
            return False
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise ConfigError(f"cannot read {dest}: {exc.strerror}") from None
    if check:
        return True
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ConfigError(f"cannot write {dest}: {exc.strerror}") from None
    return True


# -- the file `gpuledger init` writes, and docs/config.md -----------------------------------

def render(url: str, cluster: str | None = None) -> str:
    """A fresh gpuledger.toml: the values given, every other setting commented at its
    default (or an example), each with its doc."""
    given = {("", "cluster"): cluster or "", ("database", "url"): url, ("keys", "dir"): "keys"}
    out = ["# gpuledger configuration (TOML). Written by `gpuledger init`; edit freely.",
           "# Every section and key: docs/config.md. After changing [submit], [daemon] socket",
           "# or cluster: `gpuledger config render-submit-conf` (job_submit.lua reads that).",
           ""]
    for s in SECTIONS:
        doc = " ".join((s.cls.__doc__ or "").split())
        if s.name:
            out += textwrap.wrap(doc, 88, initial_indent="# ", subsequent_indent="# ")
            out.append(f"{'# ' if s.optional else ''}[{s.name}]")
        for item in schema.items(s.cls):
            doc = item.spec.doc
            if item.spec.default_doc and (s.name, item.key) not in given:
                doc += f" (default: {item.spec.default_doc})"
            out += textwrap.wrap(doc, 88, initial_indent="# ", subsequent_indent="# ")
            if (s.name, item.key) in given:
                out.append(f"{item.key} = {schema.toml_value(given[(s.name, item.key)])}")
                continue
            value = item.default if item.default is not None else item.spec.example
            if value is None:
                out.append(f"# {item.key} =")
            else:
                out.append(f"# {item.key} = {schema.toml_value(value)}")
        out.append("")
    return "\n".join(out)


def reference() -> str:
    """docs/config.md: every section and key with its type, default and doc."""
    out = [
        "# Configuration reference",
        "",
        ("<!-- Generated from ledger/config.py by `gpuledger config reference`; "
         "tests/test_config_doc.py keeps it in step. -->"),
        "",
        "gpuledger reads one TOML file, `/etc/gpuledger/gpuledger.toml` (or `--config`, or",
        "`$GPULEDGER_CONFIG`; a path named there that does not exist is an error). An unknown",
        "section or key, a value of the wrong type or out of range is an error naming the",
        "file, the section and the key.",
        "",
        "- The daemon, the CLI, the Slurm hooks and the reports read it whole.",
        "- The node agent reads `[agent]` and `[idle]` from its own file",
        "  (`gpuledger agent --config /etc/gpuledger/agent.toml`), with the same checks.",
        "- job_submit.lua reads only `/etc/gpuledger/job_submit.conf`, which",
        "  `gpuledger config render-submit-conf` writes from `[submit]`, `cluster` and",
        "  `[daemon]` (the Ansible role runs it): after changing them, render it again.",
        "",
    ]
    for s in SECTIONS:
        title = f"[{s.name}]" if s.name else "Top level"
        out += [f"## {title}", "", " ".join((s.cls.__doc__ or "").split()), ""]
        if s.optional:
            out += ["Optional: without this table the section is off.", ""]
        out += ["| key | type | default | meaning |", "|---|---|---|---|"]
        for item in schema.items(s.cls):
            default, doc = (t.replace("|", "\\|") for t in (schema.default_text(item),
                                                               item.spec.doc))
            out.append(f"| `{item.key}` | {item.spec.kind.name} | `{default}` | {doc} |")
        out.append("")
    return "\n".join(out)


def write_new(path: Path, url: str, cluster: str | None = None) -> None:
    """Write a fresh config file (mode 0640); refuses to overwrite an existing one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    except FileExistsError:
        raise ConfigError(f"{path} already exists; edit it or pass another --config") from None
    with os.fdopen(fd, "w") as fh:
        fh.write(render(url, cluster))
