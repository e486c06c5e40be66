"""The settlement harness for the real one-node Slurm cluster (tests/cluster/up).

``Settle`` runs ``gpuledger serve`` on a throwaway SQLite ledger, points job_submit.lua at it
(/etc/gpuledger/job_submit.conf) and the prolog/epilog at it (/etc/gpuledger/gpuledger.toml),
installs the prolog/epilog wrappers in slurm.conf if they are not there yet, and restores both
files afterwards. Test modules import the ``st``/``s`` fixtures from here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import need

from ledgerkit import init_ledger, start_daemon

from ledger.schema import set_keys
from slurm_plugin import slurmjson

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
GL = str(BIN / "gpuledger")
SUBMIT_CONF = Path("/etc/gpuledger/job_submit.conf")
NODE_CONF = Path("/etc/gpuledger/gpuledger.toml")
LUA = Path("/etc/slurm/job_submit.lua")
SOCKET = Path("/run/gpuledger-settle/gl.sock")
HOOKS = ("prolog", "epilog", "prolog-slurmctld", "epilog-slurmctld")
# The sh entry outside the venv, as the roles install it — but in a folder of the tests' own:
# the quickstart's /usr/local/sbin/gpuledger-* are links to its entry, and writing through
# them replaced that entry with a wrapper that exec'ed itself (every hook hung).
HOOK_DIR = Path("/var/lib/gpuledger-test/hooks")
ENTRY = HOOK_DIR / "gpuledger-hook"
WRAPPERS = {h: HOOK_DIR / f"gpuledger-{h}" for h in HOOKS}
CONF_KEYS = {"prolog": "Prolog", "epilog": "Epilog", "prolog-slurmctld": "PrologSlurmctld",
             "epilog-slurmctld": "EpilogSlurmctld"}
UP_VARS = {"prolog": "GPULEDGER_PROLOG", "epilog": "GPULEDGER_EPILOG",
           "prolog-slurmctld": "GPULEDGER_PROLOG_SLURMCTLD",
           "epilog-slurmctld": "GPULEDGER_EPILOG_SLURMCTLD"}
DONE = ("COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
        "PREEMPTED", "BOOT_FAIL", "DEADLINE")


def sh(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, check=False, **kw)


def node_name() -> str:
    """The test cluster's one node (the playbook names it after the short hostname)."""
    out = sh(["sinfo", "-h", "-N", "-o", "%N"]).stdout.split()
    return out[0] if out else ""


def cluster_ready(wait_s: float = 90) -> bool:
    """Whether the test cluster's node can run jobs, waiting out passing states: a node
    is ``comp`` for a while after the jobs of a previous test (their epilogs still run)."""
    if not shutil.which("sinfo") or os.geteuid() != 0:
        return False
    deadline = time.monotonic() + wait_s
    while True:
        out = sh(["sinfo", "-h", "-o", "%t"])
        if out.returncode == 0 and re.search(r"idle|mix|alloc", out.stdout):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(1)


def _install(path: Path, text: str) -> None:
    """Write an executable file by replacing it (never writing through a link)."""
    if path.is_symlink() or not path.exists() or path.read_text() != text:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.chmod(0o755)
        tmp.replace(path)


def ensure_hooks() -> None:
    HOOK_DIR.mkdir(parents=True, exist_ok=True)
    HOOK_DIR.chmod(0o755)
    _install(ENTRY, (REPO / "slurm_plugin/hooks/gpuledger-hook").read_text())
    ctld_venv = slurm_user_venv()
    for hook, path in WRAPPERS.items():
        venv = ctld_venv if hook.endswith("slurmctld") else BIN.parent
        _install(path, f'#!/bin/sh\nGPULEDGER_VENV={venv} exec {ENTRY} {hook}\n')
    if hooks_configured():
        return
    cluster_up()
    if not hooks_configured():  # slurmctld drops a hook path that did not exist at its start
        sh(["scontrol", "reconfigure"])
        time.sleep(2)
    assert hooks_configured(), sh(["scontrol", "show", "config"]).stdout


def slurm_user_venv() -> Path:
    """A virtualenv SlurmUser can run for the controller hooks: the tests' own if it can,
    else one on the system Python that finds this checkout through a .pth file (the
    controller hooks need only the standard library, tests/test_hook_entry.py checks it)."""
    if sh(["runuser", "-u", "slurm", "--", str(BIN / "python"), "-c", "pass"]).returncode == 0:
        return BIN.parent
    venv = Path("/var/lib/gpuledger-test/ctld-venv")
    if not (venv / "bin" / "python").exists():
        venv.parent.mkdir(parents=True, exist_ok=True)
        out = sh(["/usr/bin/python3", "-m", "venv", "--without-pip", str(venv)])
        assert out.returncode == 0, out.stderr
    for site in venv.glob("lib/python3*/site-packages"):
        (site / "gpuledger-checkout.pth").write_text(f"{REPO}\n")
    return venv


def hooks_configured() -> bool:
    """Whether slurm.conf names the four wrappers. Slurm 24.11 allows several Prolog/Epilog
    programs and prints them as ``Prolog[0] = …``; 22.05 prints ``Prolog = …``."""
    cfg = sh(["scontrol", "show", "config"]).stdout
    return all(re.search(rf"^{CONF_KEYS[h]}(?:\[\d+\])?\s*=\s*{re.escape(str(p))}\s*$", cfg, re.M)
               for h, p in WRAPPERS.items())


def cluster_up() -> None:
    """tests/cluster/up with the four hook wrappers in slurm.conf."""
    env = {**os.environ, **{UP_VARS[h]: str(p) for h, p in WRAPPERS.items()}}
    out = sh([str(REPO / "tests/cluster/up")], env=env)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]


# scontrol's names of the fields the tests read → squeue --json's keys (a job name may hold
# "AdminComment=…": the tests read Slurm as data, as the hooks do)
JSON_KEYS = {"AdminComment": "admin_comment", "Comment": "comment", "JobState": "job_state",
             "QOS": "qos", "Partition": "partition", "Restarts": "restart_cnt"}


def job_json(job: str) -> list[dict]:
    """squeue --json's records of ``job`` (its own id, or every task of an array)."""
    out = sh(["squeue", "--json", "--all", "--states", "all", "--jobs", job])
    if out.returncode:
        return []
    return [j for j in json.loads(out.stdout)["jobs"]
            if job in (str(j["job_id"]), str(j.get("array_job_id")))]


def _plain(value) -> str:
    if isinstance(value, list):  # 23.11+: [base state, flags…], named as Slurm names it
        value = slurmjson.state(value)  # (COMPLETED + COMPLETING is COMPLETING)
    if isinstance(value, dict):  # 23.02+: {"set", "infinite", "number"}
        value = value.get("number")
    return "" if value is None else str(value)


def field(job: str, name: str) -> str:
    recs = [j for j in job_json(job) if str(j["job_id"]) == job] or job_json(job)
    return _plain(recs[0][JSON_KEYS[name]]) if recs else ""


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
            assert out.returncode == 0, (out.stderr + out.stdout[-3000:])  # --json errors are on stdout
        return out.stdout.strip()

    def setup(self) -> None:
        self.ledger = init_ledger(
            self.gl, self.cfg, SOCKET, database=f"sqlite:///{self.root / 'ledger.db'}",
            settings={"hooks": {"state_dir": str(self.root / "jobs"),
                                "log_file": str(self.root / "hooks.log"),
                                "grace_seconds": 0, "close_wait_seconds": 15}})
        log = self.root / "hooks.log"  # the controller hooks run as SlurmUser
        log.touch()
        log.chmod(0o666)

    def start_daemon(self) -> None:
        self.daemon = start_daemon(GL, self.cfg, SOCKET, self.root / "daemon.log")

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

    def mint(self, hours: str = "20", account: str = "physics", *opts: str) -> tuple[str, str]:
        token = self.gl("token", "mint", "--account", account, "--hours", hours, *opts)
        return token, self.ledger.token_id_of(token)

    def sbatch(self, token: str | None, *args: str, wrap: str = "sleep 2", hold=False,
               user: str = "alice", script: str | None = None) -> str:
        """Submit as ``user`` (``--wrap``, or the batch ``script`` when given)."""
        cmd = ["runuser", "-u", user, "--", "env", f"HOME={self.home}", "sbatch",
               "-o", "/dev/null", "--chdir=/tmp", *([f"--gpu-token={token}"] if token else []),
               *(["--hold"] if hold else []), *args, *([script] if script else ["--wrap", wrap])]
        out = sh(cmd)
        m = re.search(r"Submitted batch job (\d+)", out.stdout)
        assert m, out.stderr
        self.jobs.append(m.group(1))
        return m.group(1)

    def wait(self, job: str, states=DONE, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [_plain(j["job_state"]) for j in job_json(job)]
            if found and all(s in states for s in found):
                return found[0]
            if not found and "RUNNING" not in states:
                return "GONE"
            time.sleep(0.3)
        raise AssertionError(f"job {job} not in {states} after {timeout}s: {found}")

    def bound_hold(self, job: str, timeout: float = 30):
        """The hold the ledger binds to ``job`` (PrologSlurmctld binds it as the job starts)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            holds = self.ledger.holds(job_id=job)
            if holds:
                return holds[-1]
            time.sleep(0.3)
        raise AssertionError(f"no hold bound to job {job}; log:\n{self.log()}")

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
        env = {"PATH": os.environ["PATH"], "SLURM_JOB_ID": job, "SLURMD_NODENAME": node_name(),
               "SLURM_JOB_USER": "alice", "SLURM_JOB_ACCOUNT": "physics",
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


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def node_conf(cfg: Path, door: str, spool: Path) -> str:
    """A compute node's gpuledger.toml made from the controller's: its cluster, daemon
    sockets and hooks, where the daemon's node listener is and the spool; no [database],
    [keys], [smtp] or [reports] (what the gpuledger_node role renders)."""
    import tomllib

    from ledger.schema import toml_value

    data = tomllib.loads(cfg.read_text())
    hooks = {**data.get("hooks", {}), "daemon": door, "spool_dir": str(spool)}
    out = [f"cluster = {toml_value(data.get('cluster', ''))}"]
    for section, keys in (("daemon", data.get("daemon", {})), ("hooks", hooks)):
        out += ["", f"[{section}]"] + [f"{k} = {toml_value(v)}" for k, v in keys.items()]
    return "\n".join(out) + "\n"


@contextmanager
def settle_session(prefix: str = "gl-settle-") -> Iterator[Settle]:
    """A throwaway ledger and its daemon, with job_submit.lua and the hooks pointed at it;
    afterwards every job cancelled, the daemon stopped and the config files put back."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    root.chmod(0o755)
    s = Settle(root)
    NODE_CONF.parent.mkdir(parents=True, exist_ok=True)
    saved = {p: (p.read_text() if p.exists() else None) for p in (SUBMIT_CONF, NODE_CONF)}
    try:
        ensure_hooks()
        s.setup()
        # the nodes' door, as on a cluster of many hosts: the hooks' file has no database;
        # the epilog sends its record to the daemon over TCP with a MUNGE credential
        door = f"127.0.0.1:{free_port()}"
        s.cfg.write_text(set_keys(s.cfg.read_text(), {"daemon": {"node_listen": door}}))
        NODE_CONF.write_text(node_conf(s.cfg, door, root / "spool"))
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


@pytest.fixture(scope="module")
def st():
    need(cluster_ready(), "Slurm test cluster (tests/cluster/up)")
    with settle_session() as s:
        yield s


@pytest.fixture
def s(st):
    if st.daemon is None:
        st.start_daemon()
    yield st
    st.cancel_all()


