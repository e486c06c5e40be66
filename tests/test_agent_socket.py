"""The agent's Unix socket: the line protocol, garbage input, peers, the real CLI."""

import asyncio
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from fakenvml import FakeClock, FakeNvmlLib, install
from fakenvml.scenario import two_h100

from slurm_plugin.agent import client
from slurm_plugin.agent.core import Agent
from slurm_plugin.agent.protocol import MAX_LINE
from slurm_plugin.agent.server import AgentServer
from slurm_plugin.agent.spool import Spool

ROOT = Path(__file__).resolve().parents[1]


class Running:
    """An AgentServer on its own thread and event loop."""

    def __init__(self, agent: Agent, path: str, allowed=None) -> None:
        self.server = AgentServer(agent, path, 3600.0, allowed_uids=allowed)
        self.loop = asyncio.new_event_loop()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 5
        while self.thread.is_alive():
            try:
                client.request({"op": "ping"}, path, timeout=1)
                break
            except client.AgentUnreachable:
                assert time.monotonic() < deadline, "server did not start"
                time.sleep(0.01)

    def _run(self) -> None:
        try:
            self.loop.run_until_complete(self.server.serve())
        except BaseException as exc:  # noqa: BLE001 - checked by the fixture
            self.error = exc

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.server.stop_event.set)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def short_dir():
    with tempfile.TemporaryDirectory(dir="/tmp", prefix="gla") as d:
        yield Path(d)


@pytest.fixture
def served(short_dir):
    clock = FakeClock()
    with install(FakeNvmlLib(two_h100(), clock)):
        agent = Agent(Spool(short_dir / "spool"), [("GPU-h100-0000",), ("GPU-h100-0001",)],
                      clock=clock)
        agent.start()
        path = str(short_dir / "agent.sock")
        run = Running(agent, path)
        yield agent, clock, path, short_dir
        run.stop()
        agent.stop()
    assert run.error is None
    assert not os.path.exists(path)


def talk(path: str, lines: list[bytes]) -> list[dict]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(path)
        f = s.makefile("rb")
        out = []
        for line in lines:
            s.sendall(line)
            out.append(json.loads(f.readline()))
        return out


def test_register_and_summary_through_the_socket(served):
    _agent, clock, path, d = served
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    b = client.register(31, 2, [1, 0], socket_path=path)
    assert [(x.index, x.uuid, x.measured) for x in b] == [
        (1, "GPU-h100-0001", True), (0, "GPU-h100-0000", True)]
    clock.advance(20_000)
    u = client.summary(31, 2, socket_path=path)
    assert u.source == "agent" and u.finished and (u.job_id, u.restart) == (31, 2)
    g1, g0 = u.gpus
    assert (g0.held_ms, g0.busy_ms) == (20_000, 5_000)  # GPM over (0, 20 s]: 10 s at 50 %
    assert g0.energy_mj == 70_000 * 10 + 400_000 * 10
    assert g1.busy_ms == 20_000 // 2  # utilization rates: 50 % read at the end
    assert client.summary(31, 2, socket_path=path) == u
    assert client.summary(99, 0, socket_path=path, spool_dir=str(d / "spool")) is None


def test_garbage_lines_get_error_replies(served):
    _, _, path, _ = served
    garbage = [
        b"not json\n",
        b"[1, 2]\n",
        b"\xff\xfe\x00\n",
        b'{"op": "nope"}\n',
        b'{"op": "register", "job_id": -1, "restart": 0, "gpus": [0]}\n',
        b'{"op": "register", "job_id": true, "restart": 0, "gpus": [0]}\n',
        b'{"op": "register", "job_id": 1, "restart": 0, "gpus": "0,1"}\n',
        b'{"op": "register", "job_id": 1, "restart": 0, "gpus": [0, 0]}\n',
        b'{"op": "register", "job_id": 1, "restart": 0, "gpus": [1.5]}\n',
        b'{"op": "summary", "job_id": 1, "restart": 0, "finish": "yes"}\n',
        b'{"op": "summary", "job_id": 1e400, "restart": 0}\n',
    ]
    replies = talk(path, garbage + [b'{"op": "ping"}\n'])
    for r in replies[:-1]:
        assert r["ok"] is False and r["error"].startswith("bad request"), r
    assert replies[-1] == {"ok": True}


def test_overlong_line_is_refused_and_server_lives_on(served):
    _, _, path, _ = served
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(path)
        s.sendall(b"x" * (MAX_LINE + 10) + b"\n")
        reply = json.loads(s.makefile("rb").readline())
    assert reply == {"ok": False, "error": "bad request: line too long"}
    assert talk(path, [b'{"op":"status"}\n'])[0]["gpus"] == ["GPU-h100-0000", "GPU-h100-0001"]


def test_client_that_hangs_up_mid_line(served):
    _, _, path, _ = served
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(path)
        s.sendall(b'{"op": "reg')
    assert talk(path, [b'{"op":"ping"}\n']) == [{"ok": True}]


def test_peer_not_allowed(short_dir, caplog):
    clock = FakeClock()
    with install(FakeNvmlLib(two_h100(), clock)):
        agent = Agent(Spool(short_dir / "s"), [("GPU-h100-0000",)], clock=clock)
        agent.start()
        path = str(short_dir / "a.sock")
        run = Running(agent, path, allowed={os.geteuid() + 4242})
        try:
            b = client.register(1, 0, [0], socket_path=path)
        finally:
            run.stop()
            agent.stop()
    assert not b[0].measured and "permission denied" in b[0].reason
    assert agent.jobs == {}
    assert "refused peer uid" in caplog.text


def test_register_when_agent_down_is_unmeasured(short_dir):
    b = client.register(5, 0, [0, 1], socket_path=str(short_dir / "none.sock"))
    assert [(x.index, x.uuid, x.measured) for x in b] == [(0, None, False), (1, None, False)]
    assert b[0].reason.startswith("agent unreachable")


def test_second_agent_on_same_socket_refused_stale_socket_replaced(served):
    agent, _, path, d = served
    with pytest.raises(RuntimeError, match="another agent"):
        asyncio.run(AgentServer(agent, path, 1.0).serve())
    stale = str(d / "stale.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(stale)
    s.close()  # a socket file nobody listens on
    run = Running(agent, stale)
    try:
        assert talk(stale, [b'{"op":"ping"}\n']) == [{"ok": True}]
    finally:
        run.stop()


def test_cli_agent_process_end_to_end(short_dir):
    """`agent` as a process: no NVML on this host (or no such GPU): held time only."""
    sock, spool = short_dir / "cli.sock", short_dir / "spool"
    cfg = short_dir / "agent.toml"
    cfg.write_text(f'[agent]\ndevices = ["GPU-not-here"]\nspool = "{spool}"\n')
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-c", "from slurm_plugin.agent.cli import agent; agent()",
         "--config", str(cfg), "--socket", str(sock), "--interval", "0.1"],
        cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                client.request({"op": "ping"}, str(sock), timeout=1)
                break
            except client.AgentUnreachable:
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.05)
        b = client.register(77, 0, [0], socket_path=str(sock))
        time.sleep(0.3)
        u = client.summary(77, 0, socket_path=str(sock))
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert not b[0].measured and b[0].uuid is None
    assert u.source == "agent" and u.gpus[0].held_ms >= 300 and not u.gpus[0].measured
    assert "gpuledger-agent: listening on" in err and not sock.exists()
    lines = err.splitlines()
    assert all(re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z ", ln) for ln in lines), err
    assert "gpuledger-agent: stopped after" in lines[-1]
    assert json.loads((spool / "job-77.0.json").read_text())["finished"] is True


def test_cli_rejects_bad_interval(short_dir):
    from click.testing import CliRunner

    from slurm_plugin.agent.cli import agent

    r = CliRunner().invoke(agent, ["--interval", "0", "--spool", str(short_dir)])
    assert r.exit_code != 0 and "interval must be between" in r.output


def test_protocol_carries_the_sluid_and_refuses_a_malformed_one():
    from slurm_plugin.agent.protocol import dispatch

    seen = []

    class Stub:
        def register(self, job_id, restart, gpus, sluid=None):
            seen.append(("register", sluid))
            return []

        def summary(self, job_id, restart, finish=True, sluid=None):
            seen.append(("summary", sluid))
            return None

    s = "s2MXM88KGAAR00"
    assert dispatch(Stub(), {"op": "register", "job_id": 1, "restart": 0, "gpus": [0],
                             "sluid": s})["ok"]
    assert dispatch(Stub(), {"op": "register", "job_id": 1, "restart": 0, "gpus": [0]})["ok"]
    dispatch(Stub(), {"op": "summary", "job_id": 1, "restart": 0, "sluid": s})
    assert seen == [("register", s), ("register", None), ("summary", s)]
    from slurm_plugin.agent.protocol import BadRequest
    for bad in ("x", 7, "s0000000000000"):
        with pytest.raises(BadRequest):
            dispatch(Stub(), {"op": "register", "job_id": 1, "restart": 0, "gpus": [0],
                              "sluid": bad})
