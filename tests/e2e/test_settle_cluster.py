"""Settlement on the real one-node Slurm cluster: sbatch → job_submit.lua → prolog → epilog.

Needs the cluster from ``tests/cluster/up`` and root. The fixture runs ``gpuledger serve`` on
a throwaway SQLite ledger, points job_submit.lua at it (/etc/gpuledger/job_submit.conf) and
the prolog/epilog at it (/etc/gpuledger/gpuledger.toml), installs the prolog/epilog wrappers
in slurm.conf if they are not there yet (``tests/cluster/up`` with GPULEDGER_PROLOG/EPILOG;
they exit at once for jobs that are not gpuledger's, so they stay installed), and restores
both files afterwards. Every job is cancelled at the end.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import need

from ledger import config as config_mod
from ledger.service import Ledger

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
GL = str(BIN / "gpuledger")
SUBMIT_CONF = Path("/etc/gpuledger/job_submit.conf")
NODE_CONF = Path("/etc/gpuledger/gpuledger.toml")
LUA = Path("/etc/slurm/job_submit.lua")
SOCKET = Path("/run/gpuledger-settle/gl.sock")
WRAPPERS = {h: Path(f"/usr/local/sbin/gpuledger-{h}") for h in ("prolog", "epilog")}
DONE = ("COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
        "PREEMPTED", "BOOT_FAIL", "DEADLINE")


def sh(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, check=False, **kw)


def cluster_ready() -> bool:
    if not shutil.which("sinfo") or os.geteuid() != 0:
        return False
    out = sh(["sinfo", "-h", "-o", "%t"])
    return out.returncode == 0 and bool(re.search(r"idle|mix|alloc", out.stdout))


def ensure_hooks() -> None:
    for hook, path in WRAPPERS.items():
        text = f'#!/bin/sh\nexec {BIN}/gpuledger-{hook} "$@"\n'
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
            path.chmod(0o755)
    cfg = sh(["scontrol", "show", "config"]).stdout
    if f"Prolog                  = {WRAPPERS['prolog']}" in cfg and \
            f"Epilog                  = {WRAPPERS['epilog']}" in cfg:
        return
    env = {**os.environ, "GPULEDGER_PROLOG": str(WRAPPERS["prolog"]),
           "GPULEDGER_EPILOG": str(WRAPPERS["epilog"])}
    out = sh([str(REPO / "tests/cluster/up")], env=env)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]


def field(job: str, name: str) -> str:
    out = sh(["scontrol", "show", "job", "-o", job]).stdout
    m = re.search(rf"(?:^| ){name}=(\S*)", out)
    return m.group(1) if m else ""


class Settle:
    def __init__(self, root: Path):
        self.root = root
        self.cfg = root / "gpuledger.toml"
        self.jobs: list[str] = []
        self.daemon: subprocess.Popen | None = None
        self.home = root / "home"
        self.home.mkdir()
        self.home.chmod(0o755)

    def gl(self, *args: str, check: bool = True) -> str:
        out = sh([GL, "--config", str(self.cfg), *args])
        if check:
            assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    def setup(self) -> None:
        self.gl("init", "--cluster", "gpuledger",
                "--database", f"sqlite:///{self.root / 'ledger.db'}")
        text = self.cfg.read_text().replace('"/run/gpuledger/gpuledger.sock"', f'"{SOCKET}"')
        text += (f'\n[hooks]\nstate_dir = "{self.root / "jobs"}"\n'
                 f'log_file = "{self.root / "hooks.log"}"\ngrace_seconds = 0\n')
        self.cfg.write_text(text)
        self.gl("keys", "generate", "--kid", "k1")
        for a in ("physics", "chemistry"):
            self.gl("account", "create", a)
        for gpu, rate in (("h100", "1.0"), ("a100", "0.6"), ("default", "0.5")):
            self.gl("rates", "set", gpu, rate)
        self.ledger = Ledger.from_config(config_mod.load(self.cfg))

    def start_daemon(self) -> None:
        SOCKET.parent.mkdir(mode=0o755, exist_ok=True)
        with open(self.root / "daemon.log", "a") as err:  # the child keeps its own copy
            self.daemon = subprocess.Popen([GL, "--config", str(self.cfg), "serve"],
                                           stdout=subprocess.DEVNULL, stderr=err)
        for _ in range(100):
            if SOCKET.exists():
                return
            time.sleep(0.05)
        raise AssertionError((self.root / "daemon.log").read_text())

    def stop_daemon(self) -> None:
        if self.daemon and self.daemon.poll() is None:
            self.daemon.terminate()
            self.daemon.wait(10)
        self.daemon = None
        SOCKET.unlink(missing_ok=True)

    def submit_conf(self, mode: str = "reject") -> None:
        SUBMIT_CONF.write_text(f"socket = {SOCKET}\ntimeout = 1.0\n"
                               f"on_ledger_unavailable = {mode}\n")
        time.sleep(1.1)  # slurmctld reloads the script when its mtime moves (whole seconds)
        os.utime(LUA)

    def mint(self, hours: str = "20") -> tuple[str, str]:
        token = self.gl("token", "mint", "--account", "physics", "--hours", hours)
        return token, self.ledger.token_id_of(token)

    def sbatch(self, token: str, *args: str, wrap: str = "sleep 2", hold=False) -> str:
        cmd = ["runuser", "-u", "alice", "--", "env", f"HOME={self.home}", "sbatch",
               "-o", "/dev/null", "--chdir=/tmp", f"--gpu-token={token}",
               *(["--hold"] if hold else []), *args, "--wrap", wrap]
        out = sh(cmd)
        m = re.search(r"Submitted batch job (\d+)", out.stdout)
        assert m, out.stderr
        self.jobs.append(m.group(1))
        return m.group(1)

    def wait(self, job: str, states=DONE, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = sh(["scontrol", "show", "job", "-o", job]).stdout
            found = re.findall(r"JobState=(\S+)", out)
            if found and all(s in states for s in found):
                return found[0]
            if not found and "RUNNING" not in states:
                return "GONE"
            time.sleep(0.3)
        raise AssertionError(f"job {job} not in {states} after {timeout}s: {found}")

    def hold_of(self, job: str):
        m = re.fullmatch(r"gpuledger:hold=(hold_[0-9a-f]+);token=(tok_[0-9a-f]+)",
                         field(job, "AdminComment"))
        assert m, f"job {job}: AdminComment={field(job, 'AdminComment')!r}"
        return self.ledger.hold(m.group(1))

    def settled(self, hold_id: str, timeout: float = 60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            h = self.ledger.hold(hold_id)
            if h.state != "pending":
                return h
            time.sleep(0.3)
        raise AssertionError(f"hold {hold_id} still pending; log:\n{self.log()}")

    def log(self) -> str:
        p = self.root / "hooks.log"
        return p.read_text() if p.exists() else ""

    def elapsed(self, job: str) -> int:
        out = sh(["sacct", "-n", "-X", "-P", "-o", "ElapsedRaw", "-j", job]).stdout.split()
        return int(out[-1])

    def reconcile(self) -> dict:
        return json.loads(self.gl("reconcile", "--json"))

    def epilog_by_hand(self, job: str, gpus: str, token: str, restart: int = 0):
        env = {"PATH": os.environ["PATH"], "SLURM_JOB_ID": job, "SLURMD_NODENAME": "vm",
               "SLURM_JOB_GPUS": gpus, "SPANK_GPULEDGER_TOKEN": token,
               "SLURM_JOB_RESTART_COUNT": str(restart), "GPULEDGER_CONFIG": str(NODE_CONF)}
        out = subprocess.run([str(BIN / "gpuledger-epilog")], env=env, capture_output=True, check=False,
                             text=True)
        assert out.returncode == 0
        return out

    def verify(self) -> None:
        assert self.ledger.verify_journal().ok

    def cancel_all(self) -> None:
        if self.jobs:
            sh(["scancel", *self.jobs])
        self.jobs.clear()


@pytest.fixture(scope="module")
def st():
    need(cluster_ready(), "Slurm test cluster (tests/cluster/up)")
    root = Path(tempfile.mkdtemp(prefix="gl-settle-"))
    root.chmod(0o755)
    s = Settle(root)
    saved = {p: (p.read_text() if p.exists() else None) for p in (SUBMIT_CONF, NODE_CONF)}
    try:
        ensure_hooks()
        s.setup()
        NODE_CONF.write_text(s.cfg.read_text().replace('dir = "keys"',
                                                       f'dir = "{root / "keys"}"'))
        s.start_daemon()
        s.submit_conf()
        yield s
    finally:
        s.cancel_all()
        s.stop_daemon()
        for p, text in saved.items():
            if text is None:
                p.unlink(missing_ok=True)
            else:
                p.write_text(text)
        os.utime(LUA)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def s(st):
    if st.daemon is None:
        st.start_daemon()
    yield st
    st.cancel_all()


def per_gpu_seconds(charge: dict) -> list[float]:
    return [g["held_ms"] / 1000 for g in charge["usage"]["gpus"]]


def test_job_that_ends_early_pays_what_it_ran(s):
    token, tid = s.mint()
    before = s.ledger.inspect(tid).remaining
    job = s.sbatch(token, "--gres=gpu:h100:2", "-t", "10", wrap="sleep 3")
    hold = s.hold_of(job)
    assert hold.amount == 2 * 600
    s.wait(job)
    h = s.settled(hold.id)
    charges = s.ledger.charges(hold.id)
    assert len(charges) == 1 and charges[0]["key"] == f"{hold.id}:{job}:0:vm"
    elapsed = s.elapsed(job)
    for held in per_gpu_seconds(charges[0]):
        assert abs(held - elapsed) <= 1.5, (held, elapsed)  # prolog→epilog vs Slurm's seconds
    assert h.charged == sum(g["charge"] for g in charges[0]["usage"]["gpus"])
    assert 2 * (elapsed - 1) <= h.charged <= 2 * (elapsed + 2)
    assert h.returned == h.amount - h.charged and h.state == "posted"
    assert s.ledger.inspect(tid).remaining == before - h.charged
    s.verify()
    receipt = json.loads(s.gl("job", "show", job, "--json"))
    r = receipt["holds"][0]
    assert (r["id"], r["charged"], r["returned"]) == (hold.id, h.charged, h.returned)
    assert [j["kind"] for j in r["journal"]] == ["reserve", "bind", "charge", "void"]
    assert {g["index"] for g in r["charges"][0]["gpus"]} == {0, 1}
    assert "GPU" in s.gl("job", "show", job)


def test_scancel_while_running_charges_what_ran(s):
    token, _ = s.mint()
    job = s.sbatch(token, "--gres=gpu:a100:1", "-t", "30", wrap="sleep 120")
    hold = s.hold_of(job)
    s.wait(job, ("RUNNING",))
    time.sleep(3)
    sh(["scancel", job])
    s.wait(job)
    h = s.settled(hold.id)
    elapsed = s.elapsed(job)
    assert abs(h.charged - round(elapsed * 0.6)) <= 2, (h.charged, elapsed)
    assert h.charged < 0.6 * 30 and h.returned == 1080 - h.charged


def test_cancel_while_pending_is_voided_by_reconcile(s):
    token, tid = s.mint()
    before = s.ledger.inspect(tid).remaining
    job = s.sbatch(token, "--gres=gpu:h100:1", "-t", "10", hold=True)
    hold = s.hold_of(job)
    sh(["scancel", job])
    s.wait(job)
    time.sleep(1)
    assert s.ledger.hold(hold.id).state == "pending"  # no epilog ran
    out = s.reconcile()
    assert hold.id in out["voided"], out
    h = s.ledger.hold(hold.id)
    assert (h.state, h.charged, h.returned) == ("voided", 0, 600)
    assert s.ledger.inspect(tid).remaining == before + 0
    assert s.reconcile()["voided"] == []  # a second pass changes nothing


def test_epilog_run_twice_charges_once(s):
    token, _ = s.mint()
    job = s.sbatch(token, "--gres=gpu:h100:1", "-t", "5", wrap="sleep 1")
    hold = s.hold_of(job)
    s.wait(job)
    h1 = s.settled(hold.id)
    out = s.epilog_by_hand(job, "0", token)
    h2 = s.ledger.hold(hold.id)
    assert (h2.charged, h2.returned, h2.state) == (h1.charged, h1.returned, "posted")
    assert len(s.ledger.charges(hold.id)) == 1
    assert "nothing charged" in out.stderr
    s.verify()


def test_requeue_charges_each_run_once(s):
    token, tid = s.mint()
    before = s.ledger.inspect(tid).remaining
    job = s.sbatch(token, "--gres=gpu:h100:1", "-t", "10", wrap="sleep 6")
    hold = s.hold_of(job)
    s.wait(job, ("RUNNING",))
    time.sleep(2)
    assert sh(["scontrol", "requeue", job]).returncode == 0
    s.wait(job, ("PENDING",))
    time.sleep(1)
    sh(["scontrol", "update", f"jobid={job}", "starttime=now"])
    s.wait(job)
    h = s.settled(hold.id)
    charges = s.ledger.charges(hold.id)
    assert sorted(c["restart"] for c in charges) == [0, 1], charges
    assert {c["key"] for c in charges} == {f"{hold.id}:{job}:0:vm", f"{hold.id}:{job}:1:vm"}
    assert h.charged == sum(c["amount"] for c in charges) and h.state == "posted"
    assert 7 <= h.charged <= 14  # ~2 s then ~6 s on one h100
    assert s.ledger.inspect(tid).remaining == before - h.charged
    s.verify()


def test_array_charges_every_task_and_returns_the_rest_after_the_last(s):
    token, tid = s.mint()
    before = s.ledger.inspect(tid).remaining
    job = s.sbatch(token, "--gres=gpu:h100:1", "-t", "5", "--array=0-9", wrap="sleep 1")
    hold = s.hold_of(f"{job}_0") if field(job, "AdminComment") == "" else s.hold_of(job)
    assert hold.tasks == 10 and hold.amount == 3000
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and sh(["squeue", "-h", "-j", job]).stdout.strip():
        time.sleep(0.5)
    h = s.settled(hold.id)
    charges = s.ledger.charges(hold.id)
    assert len(charges) == 10 and len({c["job_id"] for c in charges}) == 10
    assert h.charged == sum(c["amount"] for c in charges)
    assert h.returned == 3000 - h.charged and h.state == "posted"
    assert s.ledger.inspect(tid).remaining == before - h.charged
    s.verify()


def test_epilog_failure_is_settled_by_reconcile_from_sacct(s):
    token, _ = s.mint()
    job = s.sbatch(token, "--gres=gpu:h100:2", "-t", "10", wrap="sleep 3")
    hold = s.hold_of(job)
    s.wait(job, ("RUNNING",))
    good = NODE_CONF.read_text()
    NODE_CONF.write_text(good.replace("sqlite:///", "sqlite:////nonexistent/"))
    try:
        s.wait(job)
    finally:
        NODE_CONF.write_text(good)
    assert s.ledger.hold(hold.id).state == "pending"
    assert "left for the reconciler" in s.log()
    out = s.reconcile()
    assert hold.id in out["settled"] and out["charged_runs"] >= 1, out
    h = s.ledger.hold(hold.id)
    assert h.charged == 2 * s.elapsed(job) and h.state == "posted"
    s.epilog_by_hand(job, "0,1", token)  # a late epilog charges nothing more
    assert s.ledger.hold(hold.id).charged == h.charged and len(s.ledger.charges(hold.id)) == 1
    s.verify()


def _slurmd_pids() -> list[int]:
    out = sh(["pgrep", "-x", "slurmd"]).stdout.split()
    return [int(p) for p in out]


def _stepd_pids(job: str) -> list[int]:
    out = sh(["pgrep", "-f", rf"^slurmstepd: \[{job}\."]).stdout.split()
    return [int(p) for p in out]


def test_slurmd_crash_mid_job_is_settled_by_reconcile(s):
    token, tid = s.mint()
    before = s.ledger.inspect(tid).remaining
    job = s.sbatch(token, "--gres=gpu:h100:1", "-t", "10", wrap="sleep 300")
    hold = s.hold_of(job)
    s.wait(job, ("RUNNING",))
    time.sleep(2)
    good = NODE_CONF.read_text()
    try:
        NODE_CONF.unlink()  # the node's epilog, if one runs on restart, cannot settle
        for pid in _slurmd_pids() + _stepd_pids(job):
            os.kill(pid, signal.SIGKILL)
        time.sleep(2)
        assert sh(["slurmd"]).returncode == 0  # no systemd here: slurmd daemonizes itself
        time.sleep(3)
        sh(["scancel", job])
        s.wait(job, timeout=180)
    finally:
        NODE_CONF.write_text(good)
        up = sh([str(REPO / "tests/cluster/up")], env={
            **os.environ, "GPULEDGER_PROLOG": str(WRAPPERS["prolog"]),
            "GPULEDGER_EPILOG": str(WRAPPERS["epilog"])})
        assert up.returncode == 0, up.stderr[-2000:]
    out = s.reconcile()
    h = s.ledger.hold(hold.id)
    assert h.state == "posted" and hold.id in out["settled"] + out["voided"], out
    assert 0 < h.charged <= s.elapsed(job) + 2
    assert s.ledger.inspect(tid).remaining == before - h.charged
    assert s.reconcile()["charged_runs"] == 0
    s.verify()


def test_token_revoked_after_submission_cancels_job_in_prolog(s):
    token, tid = s.mint()
    job = s.sbatch(token, "--gres=gpu:h100:1", "-t", "5", hold=True)
    hold = s.hold_of(job)
    s.gl("token", "revoke", tid, "--reason", "leaked")
    sh(["scontrol", "release", job])
    state = s.wait(job)
    assert state in ("CANCELLED", "GONE")
    h = s.ledger.hold(hold.id)
    assert (h.state, h.charged) == ("voided", 0) and h.job_id == job
    assert "revoked" in field(job, "Comment") or "revoked" in s.log()


def test_ledger_unavailable_at_submit_prolog_reserves_or_cancels(s):
    s.stop_daemon()
    s.submit_conf("accept")
    try:
        token, tid = s.mint()
        job = s.sbatch(token, "--gres=gpu:h100:1", "-t", "5", wrap="sleep 1", hold=True)
        assert field(job, "AdminComment") == "gpuledger:deferred"
        poor, _ = s.mint(hours="0.01")
        job2 = s.sbatch(poor, "--gres=gpu:h100:1", "-t", "5", wrap="sleep 1", hold=True)
        sh(["scontrol", "release", job, job2])
        s.wait(job)
        s.wait(job2)
    finally:
        s.submit_conf("reject")
        s.start_daemon()
    hold = s.hold_of(job)
    h = s.settled(hold.id)
    assert h.token_id == tid and h.job_id == job and h.amount == 300 and h.charged > 0
    assert field(job2, "JobState") == "CANCELLED"
    assert "needs" in field(job2, "Comment") or "refused" in s.log()
    assert s.ledger.holds(job_id=job2) == []
    s.verify()


def test_hundred_jobs_with_epilogs_and_reconcile_loop_concurrently(s):
    token, tid = s.mint(hours="50")
    face = s.ledger.inspect(tid).face
    stop = threading.Event()
    passes = []

    def reconcile_loop():
        while not stop.is_set():
            passes.append(s.reconcile())
            time.sleep(0.5)

    def submit_loop(n):
        return [s.sbatch(token, "--gres=gpu:1", "-t", "2", wrap="true") for _ in range(n)]

    rt = threading.Thread(target=reconcile_loop)
    rt.start()
    try:
        with ThreadPoolExecutor(4) as pool:
            jobs = [j for js in pool.map(submit_loop, [25] * 4) for j in js]
        assert len(jobs) == 100
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and any(
                sh(["squeue", "-h", "-j", ",".join(jobs)]).stdout.strip() for _ in [0]):
            time.sleep(1)
    finally:
        stop.set()
        rt.join()
    final = s.reconcile()
    assert final["errors"] == [] and len(passes) >= 2
    holds = s.ledger.holds(token_id=tid)
    assert len(holds) == 100 and all(h.state != "pending" for h in holds), \
        [h.state for h in holds]
    charged = sum(c["amount"] for h in holds for c in s.ledger.charges(h.id))
    assert charged == sum(h.charged for h in holds)
    assert s.ledger.inspect(tid).remaining == face - charged
    assert all(len({c["key"] for c in s.ledger.charges(h.id)}) == len(s.ledger.charges(h.id))
               for h in holds)
    assert s.gl("verify")  # exit 0
    s.verify()
