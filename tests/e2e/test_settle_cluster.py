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
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from settlekit import (  # noqa: F401 - st and s are fixtures
    GL,
    LUA,
    NODE_CONF,
    cluster_up,
    field,
    node_name,
    s,
    sh,
    st,
)

from ledger.schema import set_keys

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(900)]


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
    assert len(charges) == 1 and charges[0]["key"] == f"{hold.id}:{job}:0:{node_name()}"
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


@pytest.mark.parametrize("gres,rate,shares,per_gpu", [("shard:h100:3", 1_000_000, 3, 4),
                                                       ("shard:a100:2", 600_000, 2, 4),
                                                       ("mps:a100:25", 600_000, 25, 100)])
def test_share_job_pays_its_share_of_the_gpu_it_ran_on(s, gres, rate, shares, per_gpu):
    """Held at s/S of the GPU's rate for the time limit; charged s/S x rate x the held time
    of the GPU Slurm gave it (scontrol's GRES=shard:N(IDX:i) = the prolog's SLURM_JOB_GPUS),
    rounded up to a whole GPU-second. The test cluster cuts each GPU into 4 shards and 100
    MPS shares."""
    kind = gres.split(":")[0]
    token, tid = s.mint()
    before = s.ledger.inspect(tid).remaining
    job = s.sbatch(token, f"--gres={gres}", "-t", "10", wrap="sleep 4")
    hold = s.hold_of(job)
    assert (hold.gres, hold.per_node, hold.share, hold.rate_ppm) == (kind, shares, per_gpu, rate)
    assert hold.amount == -(-shares * 600 * rate // (per_gpu * 1_000_000))
    s.wait(job, ("RUNNING", "COMPLETING", "COMPLETED"))
    detail = sh(["scontrol", "show", "job", "-d", job]).stdout
    idx = re.search(rf"GRES={kind}:(?:\w+:)?(\d+)\(IDX:(\d+)\)", detail)
    s.wait(job)
    h = s.settled(hold.id)
    [charge] = s.ledger.charges(hold.id)
    [gpu] = charge["usage"]["gpus"]
    if idx:  # seen while it ran: Slurm gave `shares` of GPU `idx`
        assert (int(idx.group(1)), int(idx.group(2))) == (shares, gpu["index"])
    assert (gpu["share"], gpu["gpu_type"], gpu["rate_ppm"]) == (f"{shares}/{per_gpu}",
                                                                gres.split(":")[1], rate)
    assert gpu["measured"] is False  # a share's busy time would be the whole GPU's
    assert charge["amount"] == gpu["charge"] == \
        -(-gpu["held_ms"] * rate * shares // (per_gpu * 10**9))
    assert abs(gpu["held_ms"] / 1000 - s.elapsed(job)) <= 1.5
    assert (h.charged, h.returned) == (charge["amount"], hold.amount - charge["amount"])
    assert s.ledger.inspect(tid).remaining == before - h.charged
    s.verify()


def test_a_partition_tier_prices_the_hold_and_the_charge(s):
    """partition short at 0.5: held 0.5 x 600 s, charged 0.5 x the held ms of the partition
    the job ran in (SLURM_JOB_PARTITION); the receipt shows the tier's cost."""
    s.gl("tiers", "set", "partition", "short", "0.5")
    try:
        token, _ = s.mint()
        job = s.sbatch(token, "-p", "short", "--gres=gpu:h100:1", "-t", "10", wrap="sleep 3")
        hold = s.hold_of(job)
        assert (hold.amount, hold.multiplier_ppm) == (300, 500_000)
        s.wait(job)
        h = s.settled(hold.id)
        [charge] = s.ledger.charges(hold.id)
        [gpu] = charge["usage"]["gpus"]
        assert gpu["tiers"] == [{"tier": "standard", "multiplier_ppm": 500_000,
                                 "ms": gpu["held_ms"], "amount": charge["amount"]}]
        assert charge["amount"] == -(-gpu["held_ms"] * 500_000 // 10**9) == h.charged
        receipt = json.loads(s.gl("job", "show", job, "--json"))
        assert receipt["holds"][0]["tiers"] == [{"tier": "standard", "multiplier_ppm": 500_000,
                                                 "ms": gpu["held_ms"], "amount": h.charged}]
        assert "tier" in s.gl("job", "show", job)
    finally:
        s.gl("tiers", "unset", "partition", "short")


def test_the_qos_slurm_runs_the_job_in_reprices_the_hold(s):
    """No --qos: job_submit holds at 1, and Slurm runs the job in its association's default
    QOS, which costs 2x here: PrologSlurmctld's bind re-prices the hold to it (a journaled
    resize) and the epilog charges 2x the held time."""
    token, _ = s.mint()
    job = s.sbatch(token, "--gres=gpu:h100:1", "-t", "10", wrap="sleep 3", hold=True)
    qos = field(job, "QOS")
    assert qos and qos != "(null)", qos
    s.gl("tiers", "set", "qos", qos, "2")
    try:
        hold = s.hold_of(job)
        assert (hold.amount, hold.multiplier_ppm) == (600, 1_000_000)
        sh(["scontrol", "release", job])
        s.wait(job)
        h = s.settled(hold.id)
        assert (h.qos, h.multiplier_ppm, h.amount) == (qos, 2_000_000, 1200)
        [charge] = s.ledger.charges(hold.id)
        [gpu] = charge["usage"]["gpus"]
        assert charge["amount"] == -(-gpu["held_ms"] * 2_000_000 // 10**9) == h.charged
    finally:
        s.gl("tiers", "unset", "qos", qos)
    s.verify()


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
    assert "left for the reconciler" in out.stderr  # the first epilog used the prolog's record
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
    # Each run is paid from its own hold: the first closes when run 0 ends, PrologSlurmctld
    # reserves the second with the job's token when run 1 starts.
    first = s.settled(hold.id)
    holds = s.ledger.holds(job_id=job)
    assert len(holds) == 2 and holds[0].id == hold.id, holds
    second = s.settled(holds[1].id)
    node = node_name()
    assert [c["key"] for c in s.ledger.charges(hold.id)] == [f"{hold.id}:{job}:0:{node}"]
    assert [c["key"] for c in s.ledger.charges(second.id)] == [f"{second.id}:{job}:1:{node}"]
    charged = first.charged + second.charged
    assert first.state == second.state == "posted" and second.amount == 600
    assert 7 <= charged <= 14  # ~2 s then ~6 s on one h100
    assert s.ledger.inspect(tid).remaining == before - charged
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
    """The node cannot reach the daemon: its record waits in the spool, the reconciler
    charges the run from sacct, and the record delivered afterwards charges nothing more."""
    token, _ = s.mint()
    job = s.sbatch(token, "--gres=gpu:h100:2", "-t", "10", wrap="sleep 3")
    hold = s.hold_of(job)
    s.wait(job, ("RUNNING",))
    good = NODE_CONF.read_text()
    NODE_CONF.write_text(set_keys(good, {"hooks": {"daemon": "127.0.0.1:9"}}))  # nobody there
    try:
        s.wait(job)
        time.sleep(1)
    finally:
        NODE_CONF.write_text(good)
    assert s.ledger.hold(hold.id).state == "pending"
    assert "kept in the spool for later" in s.log()
    out = s.reconcile()
    assert hold.id in out["settled"] and out["charged_runs"] >= 1, out
    h = s.ledger.hold(hold.id)
    assert h.charged == 2 * s.elapsed(job) and h.state == "posted"
    flushed = json.loads(sh([str(GL), "--config", str(NODE_CONF), "spool", "flush",
                             "--json"]).stdout)
    assert flushed == {"delivered": 0, "already": 1, "rejected": 0, "left": 0, "why": ""}
    assert s.ledger.hold(hold.id).charged == h.charged and len(s.ledger.charges(hold.id)) == 1
    s.epilog_by_hand(job, "0,1", token)  # a late epilog charges nothing more
    assert s.ledger.hold(hold.id).charged == h.charged and len(s.ledger.charges(hold.id)) == 1
    s.verify()


def test_a_charge_waits_in_the_node_spool_while_the_daemon_is_down(s):
    """The daemon dies mid-job: the epilog keeps its record (fsynced, 0600 root) and, once
    the daemon is back, `gpuledger spool flush` delivers it — charged once, at the node's
    own figures — and the reconciler closes the hold."""
    token, _ = s.mint()
    job = s.sbatch(token, "--gres=gpu:h100:1", "-t", "10", wrap="sleep 4")
    hold = s.hold_of(job)
    s.wait(job, ("RUNNING",))
    s.stop_daemon()
    try:
        s.wait(job)
        time.sleep(1)
        spool = s.root / "spool"
        waiting = [p for p in spool.iterdir() if p.name.endswith(".charge.json")]
        assert len(waiting) == 1 and (waiting[0].stat().st_mode & 0o777) == 0o600, waiting
        assert f".{job}.0." in waiting[0].name
        assert s.ledger.charges(hold.id) == []
    finally:
        s.start_daemon()
    flushed = json.loads(sh([str(GL), "--config", str(NODE_CONF), "spool", "flush",
                             "--json"]).stdout)
    assert (flushed["delivered"], flushed["left"]) == (1, 0), flushed
    charges = s.ledger.charges(hold.id)
    assert len(charges) == 1 and abs(charges[0]["amount"] - s.elapsed(job)) <= 2, charges
    assert not [p for p in (s.root / "spool").iterdir() if p.name.endswith(".charge.json")]
    out = s.reconcile()
    h = s.ledger.hold(hold.id)
    assert h.state == "posted" and out["charged_runs"] == 0, out
    assert h.charged == charges[0]["amount"]
    s.verify()


# Only this PID namespace: a host running this suite also sees the slurmd of
# any container on it (e.g. a systemd-nspawn trial), which is not ours to kill.
_OWN_PID_NS = ["--ns", str(os.getpid()), "--nslist", "pid"]


def _slurmd_pids() -> list[int]:
    out = sh(["pgrep", *_OWN_PID_NS, "-x", "slurmd"]).stdout.split()
    return [int(p) for p in out]


def _stepd_pids(job: str) -> list[int]:
    out = sh(["pgrep", *_OWN_PID_NS, "-f", rf"^slurmstepd: \[{job}\."]).stdout.split()
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
        cluster_up()
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
    finally:
        s.submit_conf("reject")
        s.start_daemon()
    # The ledger is back when they start: PrologSlurmctld reserves, or cancels the poor one.
    # (Still down at their start, they are requeued: test_deferred_job_never_runs_unpaid….)
    sh(["scontrol", "release", job, job2])
    s.wait(job)
    s.wait(job2)
    assert field(job, "AdminComment") == "gpuledger:deferred"  # the ledger binds it, not Slurm
    h = s.settled(s.bound_hold(job).id)
    assert h.token_id == tid and h.job_id == job and h.amount == 300 and h.charged > 0
    assert field(job2, "JobState") == "CANCELLED"
    assert "needs" in field(job2, "Comment") or "refused" in s.log()
    assert s.ledger.holds(job_id=job2) == []
    s.verify()


def test_deferred_job_never_runs_unpaid_while_the_ledger_is_down(s):
    """Accepted while the daemon was down, started while it is still down: requeued, not run;
    once the daemon is back it runs and pays."""
    s.stop_daemon()
    s.submit_conf("accept")
    token, tid = s.mint()
    try:
        job = s.sbatch(token, "--gres=gpu:h100:1", "-t", "5", wrap="sleep 1", hold=True)
        assert field(job, "AdminComment") == "gpuledger:deferred"
        sh(["scontrol", "release", job])
        # PrologSlurmctld's own line for this job, not "Requeue=1" (every job shows that)
        refused = re.compile(rf"gpuledger-prolog-slurmctld\[{job}\]: .*cannot reserve")
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not refused.search(s.log()):
            time.sleep(0.5)
        mine = [ln for ln in s.log().splitlines() if f"[{job}]" in ln]
        assert refused.search(s.log()), mine
        time.sleep(2)
        assert s.ledger.holds(job_id=job) == []
        runs = sh(["sacct", "-n", "-X", "-P", "-D", "-o", "State,ElapsedRaw", "-j", job]).stdout
        assert "COMPLETED" not in runs and "RUNNING" not in field(job, "JobState"), runs
    finally:
        s.submit_conf("reject")
        s.start_daemon()
    sh(["scontrol", "release", job])  # a requeued job may come back held
    s.wait(job, timeout=180)
    h = s.settled(s.bound_hold(job).id)
    assert (h.token_id, h.job_id, h.state) == (tid, job, "posted") and h.charged > 0
    s.verify()


def test_fast_reserve_answers_lost_in_a_daemon_crash_are_paid_at_start_or_cancelled(s):
    """[daemon] fast_reserve with a long batch window: job_submit gets its answers from
    memory, the daemon is killed (SIGKILL) before it writes them. Each job names a hold the
    ledger never had; when released, PrologSlurmctld reserves for it from its token and it
    runs and pays — or, its token spent meanwhile, is cancelled. Nothing runs unpaid."""
    good = s.cfg.read_text()
    s.stop_daemon()
    s.cfg.write_text(set_keys(good, {"daemon": {"fast_reserve": True,
                                                "fast_reserve_batch_ms": 30000}}))
    s.start_daemon()
    a, a_id = s.mint()
    b, b_id = s.mint()
    try:
        # a token's first reserve is the ledger's own (written before the answer) ...
        firsts = [s.sbatch(t, "--gres=gpu:h100:1", "-t", "10", wrap="sleep 1", hold=True)
                  for t in (a, b)]
        time.sleep(0.5)
        # ... then the daemon knows its balance and answers from memory
        fast = [s.sbatch(t, "--gres=gpu:h100:1", "-t", "10", wrap="sleep 1", hold=True)
                for t in (a, a, b)]
        lost = [field(j, "AdminComment").split("hold=")[1].split(";")[0] for j in fast]
        s.daemon.send_signal(signal.SIGKILL)
        s.daemon.wait(10)
    finally:
        s.stop_daemon()
        s.cfg.write_text(good)
        s.start_daemon()
    for h in lost:  # answered, never written
        with pytest.raises(Exception, match="unknown hold"):
            s.ledger.hold(h)
    for f in firsts:
        assert s.hold_of(f).state == "pending"  # written before they were answered
    # b keeps nothing but what its first job's hold returns (600 s less what it charges):
    # not enough for another 600 s
    s.ledger.split(b, s.ledger.inspect(b_id).remaining, account="physics")
    for j in firsts + fast:
        sh(["scontrol", "release", j])
    for j in firsts + fast[:2]:
        assert s.wait(j, timeout=180) == "COMPLETED", s.log()
        h = s.settled(s.bound_hold(j).id)
        assert h.state == "posted" and h.charged > 0 and h.job_id == j, h
    assert s.wait(fast[2], timeout=180) == "CANCELLED", s.log()
    assert all(h.state != "posted" for h in s.ledger.holds(job_id=fast[2]))
    log = s.log()
    assert f"hold {lost[0]} was never written; reserved hold" in log, log
    assert f"hold {lost[2]} was never written; reservation refused" in log, log
    s.verify()


def test_a_forged_comment_from_another_user_changes_nothing(s):
    """bob's jobs carry --comment=gpuledger:hold=<alice's hold>: alice's hold stays hers."""
    token, tid = s.mint()
    job = s.sbatch(token, "--gres=gpu:h100:1", "-t", "5", wrap="sleep 2", hold=True)
    hold = s.hold_of(job)
    forged = f"--comment=gpuledger:hold={hold.id};token={tid}"
    cpu = s.sbatch(None, forged, "-t", "5", wrap="sleep 1", user="bob", hold=False)
    bob_token, bob_tid = s.mint("5", "chemistry", "--users", "bob")
    gpu = s.sbatch(bob_token, forged, "-A", "chemistry", "--gres=gpu:a100:1", "-t", "5",
                   wrap="sleep 2", user="bob")
    s.wait(cpu)
    s.wait(gpu)
    bobs = s.settled(s.bound_hold(gpu).id)
    assert (bobs.token_id, bobs.user, bobs.account) == (bob_tid, "bob", "chemistry")
    assert bobs.charged > 0
    h = s.ledger.hold(hold.id)
    assert (h.state, h.job_id, h.charged) == ("pending", None, 0)  # untouched by bob's jobs
    assert s.ledger.holds(job_id=cpu) == []
    sh(["scontrol", "release", job])
    s.wait(job)
    h = s.settled(hold.id)
    assert (h.job_id, h.user, h.state) == (job, "alice", "posted") and h.charged > 0
    assert {c["job_id"] for c in s.ledger.charges(hold.id)} == {job}
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
    # Epilogs settle as jobs end; what one missed, the reconciler settles once slurmdbd has
    # the job's end (it can lag squeue by a few seconds): run it as its timer would.
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and any(
            h.state == "pending" for h in s.ledger.holds(token_id=tid)):
        time.sleep(3)
        assert s.reconcile()["errors"] == []
    holds = s.ledger.holds(token_id=tid)
    pending = [h.job_id for h in holds if h.state == "pending"]
    assert not pending, (pending, [
        ln for ln in s.log().splitlines() if any(f"[{j}]" in ln for j in pending)][-40:])
    # Every job is paid from one hold bound to it. With grace_seconds = 0 the reconciler
    # may void a hold between job_submit's reserve and the job record's creation (slurmctld
    # runs job_submit under a read lock and creates the job afterwards); such a hold charged
    # nothing, and PrologSlurmctld reserved the job a new hold (the run's own).
    by_job: dict[str, list] = {}
    for h in holds:
        by_job.setdefault(h.job_id, []).append(h)
    assert sorted(by_job) == sorted(jobs), sorted(set(by_job) ^ set(jobs))
    early = [h for hs in by_job.values() for h in hs[:-1]]
    assert all(h.state == "voided" and h.charged == 0 for h in early), early
    assert len(early) <= 5, early
    charged = sum(c["amount"] for h in holds for c in s.ledger.charges(h.id))
    assert charged == sum(h.charged for h in holds)
    assert s.ledger.inspect(tid).remaining == face - charged
    assert all(len({c["key"] for c in s.ledger.charges(h.id)}) == len(s.ledger.charges(h.id))
               for h in holds)
    assert s.gl("verify")  # exit 0
    s.verify()
