"""Measured charging end to end: real Slurm, the real agent, a fake libnvidia-ml.

The node agent (``gpuledger agent``, unchanged) runs in its own process over fake GPUs
(``tests/fakenvml/live.py``: ctypes callbacks under the real nvidia-ml-py) that match the
cluster's fake device files by minor number. Each job sets its GPUs' load by appending
``<epoch_ms> <util> <power_mw> <mem>`` lines to a control file, so the test knows exactly
what the GPUs did. The prolog registers the job with the agent, the epilog asks it for
the summary and settles under the ``measured`` policy (floor 0.25) — the charge must be
what the trace says, not the held time.
"""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import pytest
from settlekit import NODE_CONF, REPO, s, sh, st  # noqa: F401 - st and s are fixtures

from ledger import config as config_mod
from ledger.schema import set_keys

sys.path.insert(0, str(REPO / "tests"))
from fakenvml.live import read_phases

from ledger.charging import charge_for
from slurm_plugin.agent.models import GpuUsage

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(600)]

CONTROL = Path("/run/gl-fakenvml")
AGENT_SOCKET = Path("/run/gpuledger-settle/agent.sock")
INTERVAL = 0.2
GIB = 2**30
IDLE_MW = 70_000
EPOCH_MS = 1_700_000_000_000  # the fake energy counters integrate from here


class FakeAgent:
    """`gpuledger agent` in a child process over live fake GPUs (minors 0-3 as in gres.conf)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.spool = root / "agent-spool"
        self.log = root / "agent.log"
        self.proc: subprocess.Popen | None = None

    def start(self, *extra: str) -> None:
        cmd = [sys.executable, str(REPO / "tests/fakenvml/live.py"), "--control", str(CONTROL),
               "--epoch-ms", str(EPOCH_MS), "--gpus", "h100:0,h100:1,a100:2,a100:3", "--",
               "--socket", str(AGENT_SOCKET), "--spool", str(self.spool),
               "--interval", str(INTERVAL), *extra]
        with open(self.log, "a") as err:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        from slurm_plugin.agent import client

        for _ in range(200):
            try:
                if client.request({"op": "ping"}, str(AGENT_SOCKET), timeout=1).get("ok"):
                    return
            except client.AgentUnreachable:
                pass
            assert self.proc.poll() is None, self.log.read_text()
            time.sleep(0.05)
        raise AssertionError(f"agent did not answer:\n{self.log.read_text()}")

    def kill(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(10)
        self.proc = None
        if sig == signal.SIGKILL:
            AGENT_SOCKET.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def agent(st):
    CONTROL.mkdir(exist_ok=True)
    CONTROL.chmod(0o1777)  # jobs (as alice) create their GPUs' control files
    for f in CONTROL.iterdir():
        f.unlink()
    a = FakeAgent(st.root)
    a.start()
    good, daemon_good = NODE_CONF.read_text(), st.cfg.read_text()
    NODE_CONF.write_text(set_keys(good, {
        "hooks": {"agent_socket": str(AGENT_SOCKET), "agent_spool": str(a.spool)}}))
    # the charge policy is the ledger's (the daemon prices what the nodes measured)
    st.cfg.write_text(set_keys(daemon_good, {"charge": {"policy": "measured"}}))
    assert config_mod.load(st.cfg).charge.policy == "measured"
    st.stop_daemon()
    st.start_daemon()
    try:
        yield a
    finally:
        NODE_CONF.write_text(good)
        st.cfg.write_text(daemon_good)
        st.stop_daemon()
        st.start_daemon()
        a.kill()


def ctl(gpu_var: str, util: int, power_w: int, mem: int) -> str:
    """Shell line: set the load of the GPU whose Slurm index is in $gpu_var."""
    return (f'echo "$(date +%s%3N) {util} {power_w * 1000} {mem}" '
            f'>> {CONTROL}/gpu${gpu_var}')


def job_script(*steps: str) -> str:
    gpus = 'g0=${SLURM_JOB_GPUS%%,*}; g1=${SLURM_JOB_GPUS##*,}'
    return "; ".join([gpus, *steps])


def expected(minor: int, since_ms: int) -> tuple[int, int]:
    """(busy ms, energy above idle in mJ) of the phases a job wrote since `since_ms`."""
    phases = [(t, p) for t, p in read_phases(CONTROL / f"gpu{minor}") if t >= since_ms]
    busy_x100 = extra_uj = 0
    for (t, p), (t_next, _) in zip(phases, phases[1:]):
        busy_x100 += p.util_pct * (t_next - t)
        extra_uj += (p.power_mw - IDLE_MW) * (t_next - t)
    assert phases and phases[-1][1].util_pct == 0, phases  # every job ends idle
    return busy_x100 // 100, extra_uj // 1000


def usage_of(charge: dict) -> list[GpuUsage]:
    return [GpuUsage.from_dict(g) for g in charge["usage"]["gpus"]]


def test_measured_charge_follows_the_gpu_trace(s, agent):
    token, tid = s.mint()
    before = s.ledger.inspect(tid).remaining
    since = time.time_ns() // 1_000_000
    job = s.sbatch(token, "--gres=gpu:h100:2", "-t", "10", wrap=job_script(
        "sleep 1",
        ctl("g0", 100, 700, 8 * GIB), ctl("g1", 50, 400, 1 * GIB),
        "sleep 4",
        ctl("g0", 0, 70, 0),
        "sleep 2",
        ctl("g1", 0, 70, 0),
        "sleep 1"))
    hold = s.hold_of(job)
    assert hold.amount == 2 * 600
    assert s.wait(job) == "COMPLETED"
    h = s.settled(hold.id)
    charges = s.ledger.charges(hold.id)
    assert len(charges) == 1, charges
    record = charges[0]["usage"]
    assert record["policy"] == "measured" and record["version"] == 3, record
    assert [g["measured"] for g in record["gpus"]] == [True, True], record
    gpus = {u.index: u for u in usage_of(charges[0])}
    assert set(gpus) == {0, 1}
    for index, busy_trace in ((0, 4000), (1, 3000)):
        u = gpus[index]
        busy, extra_mj = expected(index, since)
        assert abs(busy - busy_trace) < 300, (index, busy)  # the job's own sleeps
        assert u.measured and u.gaps_ms == 0 and u.uuid == f"GPU-fake-h100-{index:04d}", u
        assert abs(u.busy_ms - busy) <= 30, (index, u.busy_ms, busy)  # GPM: exact up to rounding
        assert 7000 <= u.held_ms <= 8000 + 3000, u  # prolog -> epilog around an 8 s job
        idle_mj = IDLE_MW * u.held_ms // 1000
        # the agent's energy window is its sampling window: held time ± one interval at 70 W
        assert abs(u.energy_mj - (idle_mj + extra_mj)) <= IDLE_MW * 2 * INTERVAL, (u, extra_mj)
    assert gpus[0].peak_mem_bytes == 8 * GIB and gpus[1].peak_mem_bytes == 1 * GIB
    # The charge is the policy applied to what the agent measured, at the h100 rate (1.0):
    result = charge_for(list(gpus.values()), 1_000_000, "measured", Fraction(1, 4))
    assert charges[0]["amount"] == h.charged == result.total
    assert [ln.charge for ln in result.lines] == [math.ceil(gpus[0].busy_ms / 1000),
                                                  math.ceil(gpus[1].busy_ms / 1000)]
    assert 7 <= h.charged <= 9  # ⌈4 s at 100 %⌉ + ⌈6 s at 50 %⌉, not ~2 x 9 s held
    assert result.allocated_total >= 2 * 7 > h.charged
    assert h.returned == h.amount - h.charged and h.state == "posted"
    assert s.ledger.inspect(tid).remaining == before - h.charged
    s.verify()
    receipt = json.loads(s.gl("job", "show", job, "--json"))
    shown = receipt["holds"][0]["charges"][0]["gpus"]
    assert {g["index"]: g["busy_ms"] for g in shown} == {0: gpus[0].busy_ms, 1: gpus[1].busy_ms}
    eff = (gpus[0].busy_ms + gpus[1].busy_ms) / (gpus[0].held_ms + gpus[1].held_ms)
    assert receipt["holds"][0]["efficiency"] == pytest.approx(eff)
    text = s.gl("job", "show", job)
    assert "policy      measured" in text and f"efficiency  {eff:.1%} busy of held" in text, text


def test_a100_without_gpm_is_measured_from_utilization_rates(s, agent):
    """A100s have no GPM: the agent samples nvmlDeviceGetUtilizationRates each interval, so
    busy time is exact only to a sampling interval at each change of load."""
    token, _ = s.mint()
    since = time.time_ns() // 1_000_000
    job = s.sbatch(token, "--gres=gpu:a100:1", "-t", "10", wrap=job_script(
        "sleep 1", ctl("g0", 100, 400, 2 * GIB), "sleep 3", ctl("g0", 0, 70, 0), "sleep 1"))
    hold = s.hold_of(job)
    s.wait(job)
    h = s.settled(hold.id)
    (u,) = usage_of(s.ledger.charges(hold.id)[0])
    assert u.index in (2, 3)  # gres.conf: the a100s are /dev/nvidia2 and /dev/nvidia3
    busy, _ = expected(u.index, since)
    assert abs(busy - 3000) < 300, busy
    assert u.measured and u.gaps_ms == 0 and u.uuid == f"GPU-fake-a100-{u.index:04d}", u
    assert abs(u.busy_ms - busy) <= 2 * INTERVAL * 1000 + 50, (u.busy_ms, busy)
    assert u.peak_mem_bytes == 2 * GIB
    assert h.charged == math.ceil(max(u.busy_ms, math.ceil(u.held_ms / 4)) * 600_000 / 10**9)


def test_idle_gpu_pays_the_floor(s, agent):
    token, _ = s.mint()
    job = s.sbatch(token, "--gres=gpu:h100:1", "-t", "10", wrap=job_script("sleep 6"))
    hold = s.hold_of(job)
    s.wait(job)
    h = s.settled(hold.id)
    (u,) = usage_of(s.ledger.charges(hold.id)[0])
    assert u.measured and u.busy_ms == 0 and u.gaps_ms == 0, u
    assert h.charged == math.ceil(math.ceil(u.held_ms / 4) / 1000)  # floor 0.25 x held
    # below the default idle threshold (5 %) all along: idle in one stretch, to an interval
    assert u.held_ms - 2 * INTERVAL * 1000 <= u.idle_max_ms == u.idle_ms <= u.held_ms, u


def test_a_wholly_idle_job_is_cancelled_after_the_grace_then_flagged_and_refunded(s, agent):
    """[idle] flag_after_s = 2, cancel_after_s = 2 in the agent's file: the agent cancels
    (real scancel) a job whose GPU has been idle 4 s in one stretch — the busy phase before
    restarts the count — the epilog settles what it held, and the controller's `idle send`
    flags the settlement and refunds half of what its idle time cost, once."""
    import re

    from ledger import db
    from ledger.idle import parse
    from reports.idle import record, scan

    conf = agent.root / "agent-idle.toml"
    conf.write_text("[idle]\nthreshold_pct = 5\nflag_after_s = 2\ncancel_after_s = 2\n")
    agent.kill()
    agent.start("--config", str(conf))
    try:
        token, _ = s.mint()
        job = s.sbatch(token, "--gres=gpu:h100:1", "-t", "10", wrap=job_script(
            "sleep 1", ctl("g0", 100, 700, GIB), "sleep 3", ctl("g0", 0, 70, 0),
            "sleep 300"))
        hold = s.hold_of(job)
        state = s.wait(job, timeout=90)
    finally:
        agent.kill()
        agent.start()
    log = agent.log.read_text()
    assert state == "CANCELLED", (state, log)
    assert re.search(rf"gpuledger-agent\[{job}\]: cancelled: every GPU below 5 % for \d+ s "
                     r"\(idle cancel after 4 s\)", log), log
    h = s.settled(hold.id)
    (charge,) = s.ledger.charges(hold.id)
    (u,) = usage_of(charge)
    assert 4000 <= u.idle_max_ms <= u.idle_ms < u.held_ms < 60_000, u  # not the 300 s sleep
    assert u.busy_ms >= 2500, u
    policy = parse({"flag_after_s": 2, "refund_share": 0.5})
    with db.read(s.ledger.engine) as conn:
        mine = [f for f in scan(conn, policy, h.created) if f.job_id == job]
    assert len(mine) == 1 and mine[0].idle_ms == u.idle_ms and mine[0].refund > 0, mine
    assert record(s.ledger, policy, mine) == 1 and record(s.ledger, policy, mine) == 0
    assert s.ledger.hold(hold.id).refunded == mine[0].refund
    s.verify()


def test_agent_killed_mid_job_counts_the_gap_as_busy(s, agent):
    token, _ = s.mint()
    since = time.time_ns() // 1_000_000
    job = s.sbatch(token, "--gres=gpu:h100:1", "-t", "10", wrap=job_script(
        "sleep 1", ctl("g0", 100, 700, 2 * GIB), "sleep 2", ctl("g0", 0, 70, 0), "sleep 7"))
    hold = s.hold_of(job)
    s.wait(job, ("RUNNING",))
    time.sleep(4.5)  # the busy phase is over, the job idles
    agent.kill(signal.SIGKILL)
    time.sleep(2)
    agent.start()  # resumes the job from its spool; the outage is a gap
    s.wait(job)
    h = s.settled(hold.id)
    (u,) = usage_of(s.ledger.charges(hold.id)[0])
    busy, _ = expected(0, since)
    assert u.measured and 1800 <= u.gaps_ms <= 2000 + 1500, u
    # counted twice would be ~2 s off; the slack is the agent's sampling on a loaded host
    assert abs(u.busy_ms - busy) <= 250, (u.busy_ms, busy)
    assert h.charged == math.ceil(max(u.busy_ms + u.gaps_ms, math.ceil(u.held_ms / 4)) / 1000)
    assert "resumed job" in agent.log.read_text()


def test_agent_down_settles_on_held_time_unmeasured(s, agent):
    agent.kill()
    try:
        token, _ = s.mint()
        job = s.sbatch(token, "--gres=gpu:h100:1", "-t", "10", wrap="sleep 3")
        hold = s.hold_of(job)
        s.wait(job)
        h = s.settled(hold.id)
    finally:
        agent.start()
    charge = s.ledger.charges(hold.id)[0]
    (u,) = usage_of(charge)
    assert not u.measured and u.reason, u
    assert [g["measured"] for g in charge["usage"]["gpus"]] == [False]
    assert h.charged == math.ceil(u.held_ms / 1000) and u.held_ms >= 3000
    log = s.log()
    assert f"gpuledger-prolog[{job}]: GPU 0 will not be measured" in log, log
    assert f"gpuledger-epilog[{job}]: gpuledger-agent: agent unreachable for job {job}" in log, log

