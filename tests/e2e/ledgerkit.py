"""A throwaway ledger and its daemon for the cluster tests (the submit and settle kits)."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from ledger import config as config_mod
from ledger.schema import set_keys
from ledger.service import Ledger

ACCOUNTS = ("physics", "chemistry")
RATES = (("h100", "1.0"), ("a100", "0.6"), ("default", "0.5"))


def init_ledger(gl: Callable[..., str], cfg: Path, socket: Path, *, database: str | None = None,
                settings: dict[str, dict] | None = None) -> Ledger:
    """`gpuledger init` at ``cfg`` with the daemon on ``socket`` (and ``settings``, section →
    key → value), a key, accounts and rates."""
    gl("init", "--cluster", "gpuledger", *(["--database", database] if database else []))
    cfg.write_text(set_keys(cfg.read_text(), {"daemon": {"socket": str(socket)},
                                              **(settings or {})}))
    gl("keys", "generate", "--kid", "k1")
    for account in ACCOUNTS:
        gl("account", "create", account)
    for gpu, rate in RATES:
        gl("rates", "set", gpu, rate)
    return Ledger.from_config(config_mod.load(cfg))


def start_daemon(gpuledger: str, cfg: Path, socket: Path, log: Path) -> subprocess.Popen:
    """`gpuledger serve` in the background; returns once its socket exists."""
    socket.parent.mkdir(mode=0o755, exist_ok=True)
    with open(log, "a") as err:  # the child keeps its own copy
        proc = subprocess.Popen([gpuledger, "--config", str(cfg), "serve"],
                                stdout=subprocess.DEVNULL, stderr=err)
    for _ in range(100):
        if socket.exists():
            return proc
        time.sleep(0.05)
    raise AssertionError("daemon did not start: " + log.read_text())
