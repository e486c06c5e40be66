"""Shared by the daemon tests: a live daemon on a temporary socket, and running as a user."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import tempfile
import threading
import traceback
from collections.abc import Callable
from io import StringIO
from pathlib import Path

from ledger.daemon.auth import Policy
from ledger.daemon.handlers import Handlers
from ledger.daemon.server import RequestLog, Server


class LiveDaemon:
    """A :class:`Server` on a socket in a world-traversable directory, in a thread."""

    def __init__(self, ledger, *, accounts=None, max_line: int = 16384, limits=None,
                 fast=None, free_accounts=()):
        self.dir = Path(tempfile.mkdtemp(prefix="gl-daemon-"))
        os.chmod(self.dir, 0o755)
        self.path = self.dir / "gpuledger.sock"
        self.ledger = ledger
        self.accounts = accounts or (lambda user: frozenset())
        self.max_line = max_line
        self.limits = limits
        self.fast = fast  # a FastReserve (ledger.daemon.fastpath), started by the caller
        self.free_accounts = free_accounts
        self.log = StringIO()
        self.server: Server | None = None
        self.thread: threading.Thread | None = None

    def start(self) -> LiveDaemon:
        handlers = Handlers(self.ledger, Policy("slurm"), accounts=self.accounts, fast=self.fast,
                            free_accounts=self.free_accounts)
        self.server = Server(handlers, self.path, max_line=self.max_line,
                             log=RequestLog(self.log), limits=self.limits)
        self.server.instruments.fast = self.fast
        self.server.bind()
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        if self.server:
            self.server.stop()
        if self.thread:
            self.thread.join(5)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def start_as(name: str, fn: Callable[[], object]) -> tuple[int, int, str]:
    """Fork a child that drops to ``name``'s uid/gid and runs ``fn``; :func:`join` it."""
    pw = pwd.getpwnam(name)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(r)
        try:
            os.setgroups([])
            os.setgid(pw.pw_gid)
            os.setuid(pw.pw_uid)
            os.environ["HOME"] = pw.pw_dir
            os.environ["USER"] = name
            out = {"result": fn()}
        except BaseException:  # noqa: BLE001 - report everything to the parent
            out = {"error": traceback.format_exc()}
        with os.fdopen(w, "w") as fh:
            json.dump(out, fh, default=str)
        os._exit(0)
    os.close(w)
    return pid, r, name


def join(child: tuple[int, int, str]) -> object:
    """The JSON-able result of a :func:`start_as` child; its traceback as a failure."""
    pid, r, name = child
    with os.fdopen(r) as fh:
        data = fh.read()
    os.waitpid(pid, 0)
    out = json.loads(data)
    if "error" in out:
        raise AssertionError(f"child as {name} failed:\n{out['error']}")
    return out["result"]


def as_user(name: str, fn: Callable[[], object]) -> object:
    """Run ``fn`` in a forked child with ``name``'s uid/gid; return its JSON-able result."""
    return join(start_as(name, fn))


def cli_as(name: str, args: list[str], env: dict[str, str] | None = None) -> dict:
    """Run the ``gpuledger`` CLI in-process as ``name``; exit code and output.

    Everything is imported before the fork: the user may not read this interpreter's files.
    """
    import click
    from click.testing import CliRunner

    from slurm_plugin.climain import cli

    cli.list_commands(click.Context(cli))  # registers (imports) every command before the fork

    def run():
        res = CliRunner().invoke(cli, args, env=env or {}, catch_exceptions=False)
        return {"code": res.exit_code, "output": res.output}

    return as_user(name, run)
