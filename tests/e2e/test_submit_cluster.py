"""The submit path on the real one-node Slurm cluster: sbatch/salloc → job_submit.lua → daemon.

Needs the cluster from ``tests/cluster/up`` (JobSubmitPlugins=lua) and runs as root. The
fixture starts ``gpuledger serve`` on a throwaway ledger and socket, points the installed
job_submit.lua at it through /etc/gpuledger/job_submit.conf (restored afterwards), and
submits as the cluster's users alice and bob. GPU jobs are submitted ``--hold`` and
cancelled at the end.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import need
from daemon_helpers import cli_as
from ledgerkit import init_ledger, start_daemon
from settlekit import cluster_ready as node_ready
from settlekit import field


pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "slurm_plugin" / "lua" / "job_submit.lua"
INSTALLED = Path("/etc/slurm/job_submit.lua")
CONF = Path("/etc/gpuledger/job_submit.conf")
SOCKET = Path("/run/gpuledger-e2e/gpuledger.sock")
GPULEDGER = [str(Path(sys.executable).parent / "gpuledger")]
HOOK = "-- gpuledger:test-hook (tests replace this line to force a Lua error)"


def run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def cluster_ready() -> bool:
    if not node_ready():
        return False
    cfg = run(["scontrol", "show", "config"]).stdout
    return bool(re.search(r"JobSubmitPlugins\s*=\s*(job_submit/)?lua", cfg))


class Cluster:
    def __init__(self, root: Path):
        self.root = root
        self.cfg_path = root / "gpuledger.toml"
        self.jobs: list[str] = []
        self.daemon: subprocess.Popen | None = None
        self.empty_home = root / "home"
        self.empty_home.mkdir()
        os.chmod(self.empty_home, 0o755)

    # -- ledger and daemon ----------------------------------------------------------------------

    def gl(self, *args: str) -> str:
        out = run([*GPULEDGER, "--config", str(self.cfg_path), *args])
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    def setup_ledger(self) -> None:
        self.ledger = init_ledger(self.gl, self.cfg_path, SOCKET)

    def start_daemon(self) -> None:
        self.daemon = start_daemon(GPULEDGER[0], self.cfg_path, SOCKET, self.root / "daemon.log")

    def stop_daemon(self) -> None:
        if self.daemon and self.daemon.poll() is None:
            self.daemon.terminate()
            self.daemon.wait(10)
        self.daemon = None

    def mint(self, hours="10", account="physics", **opts: str) -> tuple[str, str]:
        args = ["token", "mint", "--account", account, "--hours", hours]
        for k, v in opts.items():
            args += [f"--{k.replace('_', '-')}", v]
        token = self.gl(*args)
        return token, self.ledger.token_id_of(token)

    # -- job_submit.lua -----------------------------------------------------------------------

    def configure(self, **conf: object) -> None:
        """Write job_submit.conf and make slurmctld reload the script (mtime must move)."""
        values = {"socket": SOCKET, "timeout": 1.0, "on_ledger_unavailable": "reject",
                  "free_accounts": "", **conf}
        CONF.parent.mkdir(parents=True, exist_ok=True)
        CONF.write_text("".join(f"{k} = {v}\n" for k, v in values.items()))
        self.install(SCRIPT.read_text())

    @staticmethod
    def install(text: str) -> None:
        time.sleep(1.1)  # slurmctld compares whole-second mtimes with its last load
        tmp = INSTALLED.with_suffix(".tmp")
        tmp.write_text(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, INSTALLED)

    # -- submitting -----------------------------------------------------------------------------

    def sbatch(self, user: str, *args: str, hold: bool = True, script: str | None = None):
        cmd = ["runuser", "-u", user, "--", "env", f"HOME={self.empty_home}", "sbatch",
               "-o", "/dev/null", "--chdir=/tmp", *(["--hold"] if hold else []), *args]
        if script is None:
            cmd += ["--wrap", "true"]
        else:
            cmd.append(script)
        start = time.monotonic()
        out = run(cmd)
        elapsed = time.monotonic() - start
        m = re.search(r"Submitted batch job (\d+)", out.stdout)
        if m:
            self.jobs.append(m.group(1))
        return out.returncode, out.stderr.strip(), (m.group(1) if m else None), elapsed

    def admin_comment(self, job: str) -> str:
        return field(job, "AdminComment")  # squeue --json: a job name cannot fake it

    def hold_of(self, job: str):
        comment = self.admin_comment(job)
        m = re.fullmatch(r"gpuledger:hold=(hold_[0-9a-f]+);token=(tok_[0-9a-f]+)", comment)
        assert m, f"job {job} AdminComment={comment!r}"
        return self.ledger.hold(m.group(1))

    def cancel_all(self) -> None:
        for i in range(0, len(self.jobs), 200):
            run(["scancel", *self.jobs[i:i + 200]])
        self.jobs.clear()


@pytest.fixture(scope="module")
def cluster():
    need(cluster_ready(), "Slurm test cluster (tests/cluster/up)")
    root = Path(tempfile.mkdtemp(prefix="gl-e2e-"))
    os.chmod(root, 0o755)
    c = Cluster(root)
    old_conf = CONF.read_text() if CONF.exists() else None
    old_lua = INSTALLED.read_text() if INSTALLED.exists() else None
    try:
        c.setup_ledger()
        c.start_daemon()
        c.configure()
        yield c
    finally:
        c.cancel_all()
        c.stop_daemon()
        if old_conf is None:
            CONF.unlink(missing_ok=True)
        else:
            CONF.write_text(old_conf)
        c.install(old_lua if old_lua is not None else SCRIPT.read_text())
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def fresh(cluster):
    """Each test starts with the good script, reject mode and a running daemon."""
    if cluster.daemon is None:
        cluster.start_daemon()
    yield cluster
    cluster.cancel_all()


def refusal(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.startswith("sbatch: error: gpu-token:")]
    assert lines, stderr
    return lines[0].removeprefix("sbatch: error: ")


# -- accepted jobs ---------------------------------------------------------------------------


# A request that names no GPU type may land on an h100: it is held at the highest rate.
@pytest.mark.parametrize("args,gpus,gtype,seconds,rate", [
    (["--gres=gpu:h100:2", "-t", "1:00:00"], 2, "h100", 3600, 1.0),
    (["--gres=gpu:1", "-t", "30"], 1, None, 1800, 1.0),
    (["--gpus=a100:2", "-t", "1:00:00"], 2, "a100", 3600, 0.6),
    (["--gpus-per-node=h100:2", "-N", "1", "-t", "10"], 2, "h100", 600, 1.0),
    (["--gpus-per-task=1", "-n", "2", "-t", "10"], 2, None, 600, 1.0),
    (["--gpus-per-socket=1", "--sockets-per-node=1", "-t", "10"], 1, None, 600, 1.0),
    (["--gres=gpu:h100:1"], 1, "h100", 3600, 1.0),  # partition gpu's DefaultTime 1 h
])
def test_accepted_job_holds_gpus_times_time_times_rate(fresh, args, gpus, gtype, seconds, rate):
    token, tid = fresh.mint()
    rc, err, job, _ = fresh.sbatch("alice", f"--gpu-token={token}", *args)
    assert rc == 0, err
    hold = fresh.hold_of(job)
    assert (hold.gpus, hold.gpu_type, hold.seconds, hold.tasks) == (gpus, gtype, seconds, 1)
    assert hold.amount == round(gpus * seconds * rate) and hold.token_id == tid
    assert (hold.user, hold.account, hold.state) == ("alice", "physics", "pending")
    assert token not in fresh.admin_comment(job)


def test_non_gpu_job_passes_untouched(fresh):
    before = len(fresh.ledger.holds())
    rc, err, job, _ = fresh.sbatch("alice", "-t", "5")
    assert rc == 0 and fresh.admin_comment(job) == "" and len(fresh.ledger.holds()) == before


def test_array_holds_ten_times_the_task(fresh):
    token, _ = fresh.mint()
    rc, err, job, _ = fresh.sbatch("alice", f"--gpu-token={token}", "--gres=gpu:h100:1",
                                   "-t", "6", "--array=0-9")
    assert rc == 0, err
    hold = fresh.hold_of(job)
    assert hold.tasks == 10 and hold.amount == 10 * 360


def test_sbatch_directive_with_token_file(fresh):
    token, tid = fresh.mint()
    tokfile = fresh.root / "alice.tok"
    tokfile.write_text(token + "\n")
    alice = pwd.getpwnam("alice")
    os.chown(tokfile, alice.pw_uid, alice.pw_gid)
    os.chmod(tokfile, 0o600)
    script = fresh.root / "job.sh"
    script.write_text(f"#!/bin/sh\n#SBATCH --gpu-token=@{tokfile}\n#SBATCH --gres=gpu:h100:1\n"
                      "#SBATCH -t 20\ntrue\n")
    os.chmod(script, 0o755)
    rc, err, job, _ = fresh.sbatch("alice", script=str(script))
    assert rc == 0, err
    hold = fresh.hold_of(job)
    assert hold.token_id == tid and hold.amount == 1200


def test_salloc_is_held_and_refused_like_sbatch(fresh):
    token, _ = fresh.mint(hours="1")
    cmd = ["runuser", "-u", "alice", "--", "env", f"HOME={fresh.empty_home}", "timeout", "6",
           "salloc", f"--gpu-token={token}", "--gres=gpu:h100:1", "-t", "10",
           "--begin=now+1hour", "true"]
    out = run(cmd)
    m = re.search(r"allocation (\d+)", out.stderr)
    assert m, out.stderr
    holds = [h for h in fresh.ledger.holds(user="alice") if h.seconds == 600 and h.gpus == 1]
    assert holds and holds[-1].amount == 600
    big = run(cmd[:-4] + ["-t", "2:00:00", "--begin=now+1hour", "true"])
    assert big.returncode != 0
    assert ("salloc: error: gpu-token: needs 2.000 GPU-h (1 x h100 x 2:00:00), token "
            in big.stderr) and "has 0.833 GPU-h left" in big.stderr  # first hold stays pending


# -- refusals, exact user-visible messages -----------------------------------------------------


def test_refusal_messages(fresh):
    now = datetime.now(UTC)
    ok, tid = fresh.mint(hours="10")
    rc, err, _, _ = fresh.sbatch("alice", f"--gpu-token={ok}", "--gres=gpu:h100:2", "-t", "10:00:00")
    assert rc != 0 and refusal(err) == (f"gpu-token: needs 20.000 GPU-h (2 x h100 x 10:00:00), "
                                        f"token {tid} has 10.000 GPU-h left: 10.000 GPU-h "
                                        "short; -t 5:00:00 would fit")
    assert "Job violates accounting/QOS policy" in err

    nbf = (now + timedelta(days=30)).replace(microsecond=0)
    later, ltid = fresh.mint(not_before=nbf.strftime("%Y-%m-%dT%H:%M:%S+00:00"))
    rc, err, _, _ = fresh.sbatch("alice", f"--gpu-token={later}", "--gres=gpu:1", "-t", "5")
    assert refusal(err) == f"gpu-token: token {ltid} is not valid before {nbf.isoformat()}"

    # minted in-process right before: a CLI start on a loaded machine can outlast a short expiry
    exp = datetime.now(UTC) + timedelta(seconds=3)
    soon, view = fresh.ledger.mint("physics", 10 * 3600, expires=exp,
                                   not_before=datetime(2020, 1, 1, tzinfo=UTC))
    stid = view.id
    time.sleep(max(0.0, (exp - datetime.now(UTC)).total_seconds()) + 1)
    rc, err, _, _ = fresh.sbatch("alice", f"--gpu-token={soon}", "--gres=gpu:1", "-t", "5")
    assert refusal(err) == f"gpu-token: token {stid} expired on {exp.date().isoformat()}"

    revoked, rtid = fresh.mint()
    fresh.gl("token", "revoke", revoked, "--reason", "leaked in a repo")
    rc, err, _, _ = fresh.sbatch("alice", f"--gpu-token={revoked}", "--gres=gpu:1", "-t", "5")
    assert refusal(err) == f"gpu-token: token {rtid} was revoked: leaked in a repo"

    rc, err, _, _ = fresh.sbatch("alice", f"--gpu-token={ok}", "-A", "chemistry",
                                 "--gres=gpu:1", "-t", "5")
    assert refusal(err) == f"gpu-token: token {tid} belongs to account physics, not chemistry"
    assert "Invalid account" in err

    bobs, btid = fresh.mint(users="bob")
    rc, err, _, _ = fresh.sbatch("alice", f"--gpu-token={bobs}", "--gres=gpu:1", "-t", "5")
    assert refusal(err) == f"gpu-token: token {btid} is not valid for user alice (only bob)"

    a100, atid = fresh.mint(gpu_types="a100")
    rc, err, _, _ = fresh.sbatch("alice", f"--gpu-token={a100}", "--gres=gpu:h100:1", "-t", "5")
    assert refusal(err) == (f"gpu-token: token {atid} is not valid for GPU type h100 "
                            f"(only a100)")

    rc, err, _, _ = fresh.sbatch("alice", f"--gpu-token={ok}", "-p", "nolimit", "--gres=gpu:1")
    assert refusal(err) == ("gpu-token: partition nolimit has no default or maximum time limit; "
                            "give the job one with -t/--time (e.g. -t 2:00:00)")

    rc, err, _, _ = fresh.sbatch("alice", "--gpu-token=garbage", "--gres=gpu:1", "-t", "5")
    assert refusal(err) == ("gpu-token: malformed token: not a gpuledger token "
                            "(expected prefix glt1.)")

    head, payload, sig = ok.split(".")
    forged = f"{head}.{payload}.{sig[:-4]}AAAA"
    rc, err, _, _ = fresh.sbatch("alice", f"--gpu-token={forged}", "--gres=gpu:1", "-t", "5")
    assert refusal(err) == "gpu-token: token signature does not verify (forged or altered)"

    rc, err, _, _ = fresh.sbatch("alice", "--gres=gpu:1", "-t", "5")
    assert rc != 0 and refusal(err).startswith(
        "gpu-token: this job asks for 1 GPU(s) but carries no GPU token; submit it with "
        "--gpu-token=@FILE")
    assert "Access/permission denied" in err
    assert [h for h in fresh.ledger.holds() if h.token_id in (ltid, stid, rtid, btid, atid)] == []


# -- modifications -----------------------------------------------------------------------------


def test_scontrol_update_timelimit_resizes_the_hold(fresh):
    token, _ = fresh.mint(hours="3")
    rc, err, job, _ = fresh.sbatch("alice", f"--gpu-token={token}", "--gres=gpu:h100:1",
                                   "-t", "1:00:00")
    hold = fresh.hold_of(job)
    assert hold.amount == 3600
    grow = run(["runuser", "-u", "alice", "--", "scontrol", "update", f"jobid={job}",
                "timelimit=2:00:00"])
    assert grow.returncode == 0, grow.stderr
    assert fresh.ledger.hold(hold.id).amount == 7200
    shrink = run(["scontrol", "update", f"jobid={job}", "timelimit=30"])
    assert shrink.returncode == 0 and fresh.ledger.hold(hold.id).amount == 1800
    too_long = run(["runuser", "-u", "alice", "--", "scontrol", "update", f"jobid={job}",
                    "timelimit=5:00:00"])
    assert too_long.returncode != 0
    assert fresh.ledger.hold(hold.id).amount == 1800
    assert "TimeLimit=00:30:00" in run(["scontrol", "show", "job", job]).stdout
    more_gpus = run(["runuser", "-u", "alice", "--", "scontrol", "update", f"jobid={job}",
                     "gres=gpu:h100:2"])
    assert more_gpus.returncode == 0, more_gpus.stderr
    assert fresh.ledger.hold(hold.id).gpus == 2 and fresh.ledger.hold(hold.id).amount == 3600


def slurm_release() -> tuple[int, int]:
    m = re.search(r"(\d+)\.(\d+)", run(["sinfo", "-V"]).stdout)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def ctld_log_tail(since: int) -> str:
    cfg = run(["scontrol", "show", "config"]).stdout
    m = re.search(r"SlurmctldLogFile\s*=\s*(\S+)", cfg)
    with open(m.group(1), "rb") as f:
        f.seek(since)
        return f.read().decode(errors="replace")


def ctld_log_size() -> int:
    cfg = run(["scontrol", "show", "config"]).stdout
    m = re.search(r"SlurmctldLogFile\s*=\s*(\S+)", cfg)
    return os.path.getsize(m.group(1))


def test_a_refused_update_is_explained_where_this_slurm_lets_it(fresh):
    """22.05 drops slurm.log_user() text from slurm_job_modify (and logs an error for each
    call): the reason goes to slurmctld's log. 23.02+ shows it to the user."""
    token, _ = fresh.mint(hours="3")
    rc, err, job, _ = fresh.sbatch("alice", f"--gpu-token={token}", "--gres=gpu:h100:1",
                                   "-t", "1:00:00")
    assert rc == 0, err
    since = ctld_log_size()
    too_long = run(["runuser", "-u", "alice", "--", "scontrol", "update", f"jobid={job}",
                    "timelimit=5:00:00"])
    assert too_long.returncode != 0
    time.sleep(0.5)
    log = ctld_log_tail(since)
    assert "Use of log.user() in job_modify is not supported" not in log
    if slurm_release() < (23, 2):
        assert "gpu-token: needs" not in too_long.stderr
        assert "change refused (not shown to the user by this Slurm): gpu-token: needs " in log
    else:
        assert "gpu-token: needs " in too_long.stderr, too_long.stderr


def test_scontrol_update_to_a_dearer_gpu_type_reprices_the_hold(fresh):
    """a100 → h100 on a pending job: held again at the h100 rate, not capped at the old hold."""
    token, _ = fresh.mint(hours="3")
    rc, err, job, _ = fresh.sbatch("alice", f"--gpu-token={token}", "--gres=gpu:a100:1",
                                   "-t", "1:00:00")
    assert rc == 0, err
    hold = fresh.hold_of(job)
    assert (hold.gpu_type, hold.amount) == ("a100", 2160)
    up = run(["runuser", "-u", "alice", "--", "scontrol", "update", f"jobid={job}",
              "gres=gpu:h100:1"])
    assert up.returncode == 0, up.stderr
    after = fresh.ledger.hold(hold.id)
    assert (after.gpu_type, after.rate_ppm, after.amount) == ("h100", 1_000_000, 3600)


def test_every_candidate_partition_is_checked_on_submit_and_update(fresh):
    token, _ = fresh.mint(partitions="gpu")
    rc, err, job, _ = fresh.sbatch("alice", f"--gpu-token={token}", "--gres=gpu:h100:1",
                                   "-t", "10", "-p", "gpu,short")
    assert rc != 0 and job is None
    assert "not valid in partition short (only gpu)" in refusal(err)
    rc, err, job, _ = fresh.sbatch("alice", f"--gpu-token={token}", "--gres=gpu:h100:1",
                                   "-t", "10", "-p", "gpu")
    assert rc == 0, err
    hold = fresh.hold_of(job)
    moved = run(["runuser", "-u", "alice", "--", "scontrol", "update", f"jobid={job}",
                 "partition=short"])
    assert moved.returncode != 0
    assert "Partition=gpu " in run(["scontrol", "show", "job", job]).stdout
    assert fresh.ledger.hold(hold.id) == hold


@pytest.mark.parametrize("gres,amount,per_gpu", [
    ("shard:1", 75, 4),  # untyped: h100's 1.0 x 1/4 (4 shards per GPU here) x 300 s
    ("shard:h100:2", 150, 4),  # 1.0 x 2/4 x 300 s
    ("shard:a100:3", 135, 4),  # 0.6 x 3/4 x 300 s
    ("mps:30", 90, 100),  # untyped: 1.0 x 30/100 x 300 s
    ("mps:a100:45", 81, 100),  # 0.6 x 45/100 x 300 s
])
def test_shares_of_a_gpu_are_held_at_their_share(fresh, gres, amount, per_gpu):
    """A shard or an MPS share is a share of a GPU: never without a token, held at s/S of
    the GPU's rate."""
    rc, err, job, _ = fresh.sbatch("alice", f"--gres={gres}", "-t", "5")
    assert rc != 0 and job is None and "carries no GPU token" in refusal(err)
    token, _ = fresh.mint()
    rc, err, job, _ = fresh.sbatch("alice", f"--gpu-token={token}", f"--gres={gres}", "-t", "5")
    assert rc == 0, err
    hold = fresh.hold_of(job)
    assert (hold.gres, hold.share, hold.amount) == (gres.split(":")[0], per_gpu, amount)


def test_more_shards_than_a_gpu_has_is_refused_at_submit(fresh):
    """Slurm 22.05 takes a job's shards from one GPU per node: shard:5 would pend forever."""
    token, _ = fresh.mint()
    rc, err, job, _ = fresh.sbatch("alice", f"--gpu-token={token}", "--gres=shard:5", "-t", "5")
    assert rc != 0 and job is None
    assert "more shards than any GPU has (at most 4 per GPU" in refusal(err)
    rc, err, job, _ = fresh.sbatch("alice", f"--gpu-token={token}", "--gres=mps:101", "-t", "5")
    assert rc != 0 and job is None


def test_users_cannot_rewrite_the_hold_field(fresh):
    token, _ = fresh.mint()
    rc, err, job, _ = fresh.sbatch("alice", f"--gpu-token={token}", "--gres=gpu:1", "-t", "5")
    before = fresh.admin_comment(job)
    out = run(["runuser", "-u", "alice", "--", "scontrol", "update", f"jobid={job}",
               "admincomment=gpuledger:deferred"])
    assert out.returncode != 0
    assert fresh.admin_comment(job) == before


# -- the daemon away, a broken script ------------------------------------------------------


def test_daemon_stopped_reject_then_accept(fresh):
    token, _ = fresh.mint()
    fresh.stop_daemon()
    try:
        rc, err, _, elapsed = fresh.sbatch("alice", f"--gpu-token={token}", "--gres=gpu:1",
                                           "-t", "5")
        assert rc != 0 and refusal(err).startswith("gpu-token: the GPU ledger is unavailable")
        assert elapsed < 1.0 + 2.0  # timeout 1 s plus sbatch's own start-up
        rc, err, job, _ = fresh.sbatch("alice", "-t", "5")  # non-GPU jobs never notice
        assert rc == 0
        fresh.configure(on_ledger_unavailable="accept")
        rc, err, job, _ = fresh.sbatch("alice", f"--gpu-token={token}", "--gres=gpu:1", "-t", "5")
        assert rc == 0, err
        assert fresh.admin_comment(job) == "gpuledger:deferred"
    finally:
        fresh.configure()
        fresh.start_daemon()


def test_slow_daemon_is_cut_off_at_the_timeout(fresh):
    token, _ = fresh.mint()
    fresh.stop_daemon()
    silent = socket.socket(socket.AF_UNIX)
    silent.bind(str(SOCKET))
    os.chmod(SOCKET, 0o666)
    silent.listen(16)
    try:
        fresh.configure(timeout=0.5)
        rc, err, _, elapsed = fresh.sbatch("alice", f"--gpu-token={token}", "--gres=gpu:1",
                                           "-t", "5")
        assert rc != 0 and "the GPU ledger is unavailable (timeout)" in refusal(err)
        assert 0.5 <= elapsed < 0.5 + 2.0
    finally:
        silent.close()
        SOCKET.unlink(missing_ok=True)
        fresh.configure()
        fresh.start_daemon()


def test_lua_error_refuses_the_job(fresh):
    token, _ = fresh.mint()
    text = SCRIPT.read_text()
    assert HOOK in text
    fresh.install(text.replace(HOOK, 'error("forced by test")'))
    try:
        rc, err, job, _ = fresh.sbatch("alice", f"--gpu-token={token}", "--gres=gpu:1", "-t", "5")
        assert rc != 0 and job is None
        assert "gpu-token: internal error in the GPU token check" in err
    finally:
        fresh.install(text)


# -- concurrency ---------------------------------------------------------------------------------


def test_200_jobs_from_8_loops_never_overdraw_one_token(fresh):
    token, tid = fresh.mint(hours="2.5")  # 150 jobs of 1 x h100 x 1 minute
    results: list[int] = []
    lock = threading.Lock()

    def loop():
        for _ in range(25):
            rc, err, job, _ = fresh.sbatch("alice", f"--gpu-token={token}", "--gres=gpu:h100:1",
                                           "-t", "1")
            assert rc == 0 or "has 0.000 GPU-h left" in err or "is exhausted" in err, err
            with lock:
                results.append(rc)

    threads = [threading.Thread(target=loop) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 200
    holds = fresh.ledger.holds(token_id=tid, state="pending")
    assert results.count(0) == len(holds) == 150
    assert sum(h.amount for h in holds) == 150 * 60
    view = fresh.ledger.inspect(tid)
    assert view.remaining == 0 and view.held == 150 * 60
    assert fresh.ledger.verify_journal().ok


# -- user commands ----------------------------------------------------------------------------


def test_user_commands_as_alice_and_bob(fresh):
    alice_tok, atid = fresh.mint(users="alice")
    bob_tok, btid = fresh.mint(account="chemistry", users="bob")
    fresh.sbatch("alice", f"--gpu-token={alice_tok}", "--gres=gpu:h100:1", "-t", "7")
    fresh.sbatch("bob", f"--gpu-token={bob_tok}", "-A", "chemistry", "--gres=gpu:h100:1",
                 "-t", "11")
    env = {"GPULEDGER_SOCKET": str(SOCKET)}  # a user: no config file of their own
    alice = json.loads(cli_as("alice", ["balance", "--json"], env)["output"])
    assert atid in {t["id"] for t in alice["tokens"]} and btid not in {
        t["id"] for t in alice["tokens"]}
    assert "physics" in alice["slurm_accounts"]
    bob = json.loads(cli_as("bob", ["jobs", "--json"], env)["output"])
    assert bob["holds"] and {h["user"] for h in bob["holds"]} == {"bob"}
    assert any(h["seconds"] == 660 for h in bob["holds"])
    alice_jobs = json.loads(cli_as("alice", ["jobs", "--json"], env)["output"])
    assert {h["user"] for h in alice_jobs["holds"]} == {"alice"}
    quote = cli_as("alice", ["quote", "--gres=gpu:h100:4", "-t", "2:00:00", "--token",
                             alice_tok], env)
    assert quote["code"] == 0 and "8.000 GPU-h" in quote["output"]
    nosy = cli_as("bob", ["jobs", "--user", "alice"], env)
    assert nosy["code"] == 1 and "may only ask about themselves" in nosy["output"]
