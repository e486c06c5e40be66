"""`gpuledger status` against real components: a running daemon and a dead one, the
database (and a broken URL), the metrics endpoint, a real agent over the fake NVML
library, systemd timers as a `systemctl` reports them, the last verify."""

from __future__ import annotations

import json
import os
import socket
import stat
import tempfile
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from daemon_helpers import LiveDaemon
from fakenvml import FakeClock, FakeNvmlLib, install
from fakenvml.scenario import two_h100
from test_agent_socket import Running
from test_metrics import free_listener

from ledger import config, configfiles, schema, verifyrecord
from ledger.daemon.dbmetrics import LedgerFigures
from ledger.daemon.endpoint import Endpoint, Exposition
from slurm_plugin import status
from slurm_plugin.agent.core import Agent
from slurm_plugin.agent.spool import Spool
from slurm_plugin.climain import cli


def write_config(tmp_path: Path, ledger, sock: Path, **sections) -> Path:
    path = tmp_path / "gpuledger.toml"
    text = schema.set_keys(configfiles.render("sqlite:///x.db"), {
        "database": {"url": str(ledger.engine.url)}, "keys": {"dir": str(ledger.keys_dir)},
        "daemon": {"socket": str(sock)}, "metrics": {"listen": ""},
        "agent": {"socket": str(tmp_path / "no-agent.sock")}, **sections})
    path.write_text(text)
    return path


def run(path: Path, *args: str):
    return CliRunner().invoke(cli, ["--config", str(path), "status", *args])


def lines(output: str) -> dict[str, tuple[str, str]]:
    out = {}
    for line in output.splitlines():
        if line.startswith("Error:"):
            continue
        name, rest = line.split("  ", 1)
        state, _, detail = rest.strip().partition("  ")
        out[name.strip()] = (state.strip(), detail.strip())
    return out


REAL_SYSTEMD = status.Systemd


class NoSystemd(status.Systemd):
    def available(self) -> bool:
        return False


@pytest.fixture(autouse=True)
def no_systemd(monkeypatch):
    """This machine's systemd (if any) is not the one under test."""
    monkeypatch.setattr(status, "Systemd", NoSystemd)


def test_status_against_a_running_daemon_and_a_dead_one(sqlite_ledger, tmp_path):
    d = LiveDaemon(sqlite_ledger).start()
    try:
        path = write_config(tmp_path, sqlite_ledger, d.path)
        r = run(path)
        got = lines(r.output)
        assert r.exit_code == 0, r.output
        assert got["daemon"][0] == "OK" and str(d.path) in got["daemon"][1]
        assert got["database"][0] == "OK" and "journal head" in got["database"][1]
        assert got["metrics"] == ("SKIP", "off ([metrics] listen is empty)")
        assert got["agent"][0] == "SKIP"
        assert got["timers"][0] == "SKIP"
        data = json.loads(run(path, "--json").output)
        assert data["healthy"] is True
        assert {c["name"]: c["status"] for c in data["components"]}["daemon"] == "OK"
    finally:
        d.close()
    # killed (kill -9 leaves its socket behind): nobody answers there
    dead = Path(tempfile.mkdtemp(prefix="gl-dead-")) / "gl.sock"
    left = socket.socket(socket.AF_UNIX)
    left.bind(str(dead))
    left.close()
    path = write_config(tmp_path, sqlite_ledger, dead)
    r = run(path)
    assert r.exit_code == 1
    state, detail = lines(r.output)["daemon"]
    assert state == "FAIL" and "cannot reach the gpuledger daemon" in detail
    assert r.output.rstrip().endswith("Error: not healthy: daemon")
    r = run(path, "--json")
    data = json.loads(r.stdout)  # and the Error: line on stderr, as in text mode
    assert data["healthy"] is False and r.stderr == "Error: not healthy: daemon\n"
    # stopped cleanly (no socket): absent here unless this host is to run one
    dead.unlink()
    assert lines(run(path).output)["daemon"][0] == "SKIP"
    r = run(path, "--expect", "daemon")
    assert r.exit_code == 1 and lines(r.output)["daemon"][0] == "FAIL"


def test_a_broken_database_url_fails_the_database_line(sqlite_ledger, tmp_path):
    path = write_config(tmp_path, sqlite_ledger, tmp_path / "none.sock",
                        database={"url": "postgresql+psycopg://nobody@127.0.0.1:1/none"})
    r = run(path)
    assert r.exit_code == 1
    state, detail = lines(r.output)["database"]
    assert state == "FAIL" and "127.0.0.1" in detail and "\n" not in detail


def test_the_metrics_line_asks_readyz(sqlite_ledger, tmp_path):
    d = LiveDaemon(sqlite_ledger).start()
    listener = free_listener()
    port = listener.getsockname()[1]
    endpoint = Endpoint(Exposition(LedgerFigures(sqlite_ledger), d.server.instruments, "main"),
                        listener).start()
    try:
        path = write_config(tmp_path, sqlite_ledger, d.path,
                            metrics={"listen": f"127.0.0.1:{port}"})
        got = lines(run(path).output)
        assert got["metrics"] == ("OK", f"http://127.0.0.1:{port}/readyz: ok")
    finally:
        endpoint.stop()
        d.close()
    r = run(path)
    assert r.exit_code == 1 and lines(r.output)["metrics"][0] == "FAIL"


def test_the_agent_line_asks_a_running_agent(sqlite_ledger, tmp_path):
    with tempfile.TemporaryDirectory(dir="/tmp", prefix="gla") as short:
        sock = str(Path(short) / "agent.sock")
        clock = FakeClock()
        with install(FakeNvmlLib(two_h100(), clock)):
            agent = Agent(Spool(Path(short) / "spool"), [("GPU-h100-0000",), ("GPU-h100-0001",)],
                          clock=clock)
            agent.start()
            served = Running(agent, sock)
            try:
                path = write_config(tmp_path, sqlite_ledger, tmp_path / "none.sock",
                                    agent={"socket": sock})
                got = lines(run(path).output)
                assert got["agent"] == ("OK", f"{sock}: NVML ok, 2 GPU(s), 0 job(s)")
            finally:
                served.stop()
                agent.stop()
        r = run(path, "--expect", "agent")
        assert r.exit_code == 1 and lines(r.output)["agent"][0] == "FAIL"


FAKE_SYSTEMCTL = """#!/bin/sh
# systemctl as a test sees it: reconcile's last run failed, verify's succeeded.
case "$1" in
  is-system-running) echo running ;;
  show)
    case "$3" in
      gpuledger-reconcile.timer|gpuledger-verify.timer)
        echo LoadState=loaded; echo ActiveState=active; echo UnitFileState=enabled
        echo "LastTriggerUSec=Mon 2026-11-30 10:05:12 UTC" ;;
      gpuledger-reconcile.service)
        echo LoadState=loaded; echo ActiveState=failed; echo Result=exit-code
        echo ExecMainStatus=1 ;;
      gpuledger-verify.service)
        echo LoadState=loaded; echo ActiveState=inactive; echo Result=success ;;
      gpuledger-report.timer)
        echo LoadState=loaded; echo ActiveState=inactive; echo UnitFileState=disabled ;;
      *) echo LoadState=not-found; echo ActiveState=inactive ;;
    esac ;;
esac
"""


def test_timers_as_systemd_reports_them(tmp_path):
    fake = tmp_path / "systemctl"
    fake.write_text(FAKE_SYSTEMCTL)
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    systemd = REAL_SYSTEMD(str(fake))
    assert systemd.available()
    got = {c.name: c for c in status.check_timers(systemd)}
    assert set(got) == {"gpuledger-reconcile", "gpuledger-verify", "gpuledger-report"}
    assert got["gpuledger-reconcile"].status == "FAIL"
    assert "last run failed (exit-code, exit status 1)" in got["gpuledger-reconcile"].detail
    assert got["gpuledger-verify"].status == "OK"
    assert got["gpuledger-report"].status == "FAIL" and "inactive (disabled)" in \
        got["gpuledger-report"].detail
    assert status.check_timers(None)[0].status == "SKIP"


def test_the_verify_line_reads_the_last_verify(sqlite_ledger, tmp_path):
    cfg = config.load(write_config(tmp_path, sqlite_ledger, tmp_path / "none.sock"))
    assert status.check_verify(cfg).status == "SKIP"
    assert sqlite_ledger.verify_journal().ok  # records itself in the keys directory
    check = status.check_verify(cfg)
    assert check.status == "OK" and "journal rows sound" in check.detail
    assert status.check_verify(cfg, now=time.time() + 3 * 86400).status == "FAIL"
    verifyrecord.record(cfg.keys_dir, False, 9, 9, "row 4: hash does not match")
    check = status.check_verify(cfg)
    assert check.status == "FAIL" and "row 4: hash does not match" in check.detail
    assert os.stat(cfg.keys_dir / verifyrecord.RECORD).st_mode & 0o777 == 0o644


def test_a_node_checks_its_way_to_the_daemons_node_door(sqlite_ledger, tmp_path):
    from ledger.daemon.auth import Policy
    from ledger.daemon.handlers import Handlers
    from ledger.daemon.nodedoor import NodeDoor

    door = NodeDoor(Handlers(sqlite_ledger, Policy("slurm"), accounts=lambda u: frozenset()),
                    "127.0.0.1:0")
    door.bind()
    door.start()
    try:
        path = write_config(tmp_path, sqlite_ledger, tmp_path / "none.sock",
                            hooks={"daemon": f"127.0.0.1:{door.port}"})
        got = lines(run(path).output)
        state, detail = got["daemon (from this node)"]
        assert state == "OK" and detail.startswith(f"127.0.0.1:{door.port} answered in")
        assert got["daemon"][0] == "SKIP"  # no daemon socket on this host
    finally:
        door.stop()
    r = run(path)
    assert r.exit_code == 1
    state, detail = lines(r.output)["daemon (from this node)"]
    assert state == "FAIL" and "cannot reach the gpuledger daemon" in detail
