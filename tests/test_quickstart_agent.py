"""docs/quickstart-agent.sh, which the quickstart demo runs so that its job is measured: it
takes over from a running agent, starts the unchanged `gpuledger agent` over the fake
libnvidia-ml (tests/fakenvml/live.py) with the node's own agent config and GPUs from its
gres.conf, the agent measures what a job writes to the GPU's control file, and `stop` puts
the real agent back. Everything runs on private paths: no system service is touched."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import need

from slurm_plugin.agent import client

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "docs" / "quickstart-agent.sh"
GIB = 2**30

pytestmark = pytest.mark.timeout(120)


def ping(sock: Path) -> bool:
    try:
        return bool(client.request({"op": "ping"}, str(sock), timeout=1).get("ok"))
    except client.AgentUnreachable:
        return False


def wait_for(sock: Path, what: str) -> None:
    for _ in range(200):
        if ping(sock):
            return
        time.sleep(0.05)
    raise AssertionError(f"{what} does not answer on {sock}")


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


@pytest.fixture
def node(tmp_path):
    need(os.geteuid() == 0, "root (the script refuses to run as another user)")
    root = tmp_path / "node"
    root.mkdir(mode=0o700)
    # One GPU of type h100 whose device file is /dev/null (a character device, minor 3):
    # the script reads gres.conf as the agent does and makes the fake GPU minor 3. The
    # agent maps a GPU by a /dev/nvidiaN file's minor, which this host may not have: here
    # the config names the fake's UUID instead (the `devices` override).
    (root / "gres.conf").write_text("NodeName=n1 Name=gpu Type=h100 File=/dev/null\n")
    (root / "agent.toml").write_text(
        f'[agent]\nsocket = "{root}/run/agent.sock"\nspool = "{root}/spool"\n'
        f'interval = 0.2\ngres_conf = "{root}/gres.conf"\nnode_name = "n1"\n'
        'devices = ["GPU-fake-h100-0003"]\n')
    env = dict(os.environ, GPULEDGER_VENV=sys.prefix, AGENT_CONFIG=str(root / "agent.toml"),
               FAKE_CONTROL=str(root / "gpus"), FAKE_STATE=str(root / "state"),
               FAKE_LOG=str(root / "fake.log"), REAL_AGENT="take-over",
               REAL_AGENT_UNIT="gpuledger-test-no-such-unit.service",
               REAL_AGENT_PIDFILE=str(root / "real.pid"), REAL_AGENT_LOG=str(root / "real.log"))
    env.pop("FAKE_GPUS", None)
    started: list[int] = []
    yield root, env, started
    subprocess.run([str(SCRIPT), "stop"], env=env, capture_output=True, timeout=60, check=False)
    pidfile = root / "real.pid"
    if pidfile.exists():
        started.append(int(pidfile.read_text()))
    for pid in started:  # only the agents this test started, by their ids
        if "gpuledger" in cmdline(pid):
            os.kill(pid, signal.SIGTERM)


def script(env: dict, *args: str) -> str:
    run = subprocess.run([str(SCRIPT), *args], env=env, capture_output=True, text=True,
                         timeout=60, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    return run.stdout


def test_the_fake_agent_replaces_the_real_one_and_measures_a_job(node):
    root, env, started = node
    sock = root / "run" / "agent.sock"
    # the "real" agent, as the Ansible role starts it without systemd (its NVML may be
    # missing here: it still answers)
    with open(root / "real-first.log", "a") as log:
        real = subprocess.Popen([str(Path(sys.prefix) / "bin" / "gpuledger"), "agent",
                                 "--config", env["AGENT_CONFIG"]], stdout=log, stderr=log,
                                start_new_session=True)
    started.append(real.pid)
    (root / "real.pid").write_text(f"{real.pid}\n")
    wait_for(sock, "the real agent")

    out = script(env, "start")
    assert f"stopped the agent of {root}/real.pid (pid {real.pid})" in out, out
    assert real.wait(15) is not None
    assert f"GPUs h100:3, control files {root}/gpus/gpu<minor>" in out, out
    assert (root / "gpus" / "gpu3").stat().st_mode & 0o777 == 0o666
    fake = int((root / "state" / "agent.pid").read_text())
    assert "tests/fakenvml/live.py" in cmdline(fake)
    assert "already running" in script(env, "start")
    assert "fake-NVML agent running" in script(env, "status")

    # what a job does in the demo: 2 s at 90 % on its GPU, then idle
    (binding,) = client.register(4242, 0, [0], socket_path=str(sock))
    assert binding.measured and binding.uuid == "GPU-fake-h100-0003", binding
    control = root / "gpus" / "gpu3"
    time.sleep(0.5)
    with control.open("a") as f:
        f.write(f"{time.time_ns() // 1_000_000} 90 550000 {8 * GIB}\n")
    time.sleep(2.0)
    with control.open("a") as f:
        f.write(f"{time.time_ns() // 1_000_000} 0 70000 0\n")
    time.sleep(0.6)
    usage = client.summary(4242, 0, socket_path=str(sock), spool_dir=str(root / "spool"))
    assert usage is not None and usage.source == "agent", usage
    (gpu,) = usage.gpus
    assert gpu.measured and gpu.gaps_ms == 0, gpu
    assert abs(gpu.busy_ms - 1800) <= 150, gpu  # 90 % of 2 s, sampled by GPM every 0.2 s
    assert 2800 <= gpu.held_ms <= 4500 and gpu.peak_mem_bytes == 8 * GIB, gpu
    assert 0.35 < gpu.busy_ms / gpu.held_ms < 0.65, gpu

    out = script(env, "stop")
    assert f"stopped the fake-NVML agent (pid {fake})" in out, out
    assert "started the real agent again" in out, out
    assert not cmdline(fake)
    back = int((root / "real.pid").read_text())
    started.append(back)
    assert "gpuledger agent --config" in cmdline(back)
    wait_for(sock, "the real agent, started again")
    assert "not running" in script(env, "status")


def test_leave_never_touches_the_real_agent_and_bad_input_is_one_line(node):
    root, env, _ = node
    env = dict(env, REAL_AGENT="leave", FAKE_GPUS="h100:0")
    (root / "real.pid").write_text(f"{os.getpid()}\n")  # a live pid that is no agent
    out = script(env, "start")
    assert "stopped" not in out and "GPUs h100:0," in out, out
    assert (root / "real.pid").read_text() == f"{os.getpid()}\n"
    assert "started" not in script(env, "stop")

    bad = subprocess.run([str(SCRIPT), "restart"], env=env, capture_output=True, text=True,
                         check=False)
    assert bad.returncode == 1
    assert bad.stderr == f"quickstart-agent: usage: {SCRIPT} start|stop|status\n"
    bad = subprocess.run([str(SCRIPT), "start"], env=dict(env, REAL_AGENT="maybe"),
                         capture_output=True, text=True, check=False)
    assert bad.returncode == 1
    assert bad.stderr == "quickstart-agent: REAL_AGENT is 'maybe', not take-over or leave\n"
