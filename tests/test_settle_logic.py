"""Prolog, epilog and reconciler rules against a fake Slurm, on the three databases."""

from __future__ import annotations

import logging

import pytest

from ledger import config as config_mod
from ledger.views import HoldRequest
from slurm_plugin import marks, settle
from slurm_plugin.epilog import epilog
from slurm_plugin.hookconf import HookConfig
from slurm_plugin.hookenv import Hook, HookEnv
from slurm_plugin.prolog import prolog
from slurm_plugin.reconcile import Reconciler
from slurm_plugin.slurm import JobRecord


class FakeSlurm:
    def __init__(self):
        self.live: dict[str, JobRecord] = {}
        self.acct: list[JobRecord] = []
        self.cancelled: list[tuple[str, str]] = []
        self.comments: dict[str, str] = {}

    def job(self, job_id):
        return self.live.get(job_id)

    def array_tasks(self, array_job_id):
        return [r for r in self.live.values() if r.array_job_id == array_job_id]

    def live_jobs(self):
        return list(self.live.values())

    def finished_jobs(self, since, job_ids=None):
        return list(self.acct)

    def cancel(self, job_id, reason):
        self.cancelled.append((job_id, reason))

    def set_admin_comment(self, job_id, text):
        self.comments[job_id] = text
        self.live[job_id].admin_comment = text


def rec(job_id, state, hold=None, *, nodes=("n1",), restarts=0, gpus=None, elapsed=100,
        clock=None, array=None, task=None, comment=None):
    return JobRecord(job_id=job_id, display_id=job_id, state=state, restarts=restarts,
                     nodes=list(nodes), start=clock.now if (nodes and clock) else None,
                     elapsed_s=elapsed, gpus=gpus or {"h100": 1}, array_job_id=array,
                     array_task=task, gpu_idx={n: {0: "h100"} for n in nodes},
                     admin_comment=comment or (marks.hold_comment(hold.id, hold.token_id)
                                               if hold else ""),
                     time_limit_s=600, user="alice", account="physics")


@pytest.fixture
def world(ledger, clock, tmp_path):
    token, _ = ledger.mint("physics", 36000)
    cfg = config_mod.parse({"database": {"url": "sqlite://"}}, tmp_path / "gpuledger.toml")
    return ledger, clock, token, cfg, FakeSlurm(), tmp_path


def hook(world, job_id, node="n1", gpus=(0,), restart=0, token=None, started=0.0):
    _ledger, _clock, _tok, cfg, _fake, tmp = world
    env = HookEnv(job_id=job_id, node=node, restart=restart, gpus=list(gpus),
                  token=token, comment=None)
    return Hook(env, cfg, HookConfig(state_dir=tmp / "state" / node, log_file=None,
                                     agent_socket=str(tmp / "no-agent.sock"),
                                     agent_spool=str(tmp / "no-agent-spool")),
                logging.getLogger("test"), started)


def reserve(world, gpus=1, seconds=600, tasks=1):
    ledger, _clock, token, *_ = world
    return ledger.reserve(token, HoldRequest(gpus=gpus, seconds=seconds, gpu_type="h100",
                                             tasks=tasks))


def test_multi_node_job_settles_once_when_every_node_reported(world):
    ledger, clock, _token, _cfg, fake, _ = world
    hold = reserve(world, gpus=2)
    fake.live["7"] = rec("7", "RUNNING", hold, nodes=("n1", "n2"), gpus={"h100": 2},
                         clock=clock)
    for node in ("n1", "n2"):
        prolog(hook(world, "7", node, started=1000.0), fake, ledger)
    assert ledger.hold(hold.id).job_id == "7"
    fake.live["7"].state = "COMPLETING"
    epilog(hook(world, "7", "n1"), fake, ledger, now=1030.0)
    h = ledger.hold(hold.id)
    assert (h.state, h.charged) == ("pending", 30)
    epilog(hook(world, "7", "n1"), fake, ledger, now=1090.0)  # a repeat: charges nothing
    assert ledger.hold(hold.id).charged == 30
    epilog(hook(world, "7", "n2"), fake, ledger, now=1031.0)
    h = ledger.hold(hold.id)
    assert (h.state, h.charged, h.returned) == ("posted", 61, 1200 - 61)
    usage = {c["node"]: c["usage"] for c in ledger.charges(hold.id)}
    assert usage["n1"]["gpus"][0]["held_ms"] == 30000 and usage["n1"]["source"] == "held"
    assert usage["n2"]["policy"] == "allocated" and usage["n2"]["version"] == 2
    assert [g["measured"] for g in usage["n2"]["gpus"]] == [False]


def test_array_remainder_returns_after_the_last_task(world):
    ledger, clock, _token, _cfg, fake, _ = world
    hold = reserve(world, tasks=3)
    for i, jid in enumerate(("20", "21", "22")):
        fake.live[jid] = rec(jid, "RUNNING", hold, array="20", task=str(i), clock=clock)
        prolog(hook(world, jid, started=0.0), fake, ledger)
    assert ledger.hold(hold.id).job_id == "20"
    for jid, now in (("20", 10.0), ("21", 20.0)):
        fake.live[jid].state = "COMPLETING"
        epilog(hook(world, jid), fake, ledger, now=now)
        fake.live[jid].state = "COMPLETED"
        assert ledger.hold(hold.id).state == "pending"
    fake.live["22"].state = "COMPLETING"
    epilog(hook(world, "22"), fake, ledger, now=30.0)
    h = ledger.hold(hold.id)
    assert (h.state, h.charged, h.returned) == ("posted", 60, 1800 - 60)
    assert len(ledger.charges(hold.id)) == 3


def test_requeued_run_is_charged_and_the_hold_stays_open(world):
    ledger, clock, _token, _cfg, fake, _ = world
    hold = reserve(world)
    fake.live["30"] = rec("30", "RUNNING", hold, clock=clock)
    prolog(hook(world, "30", restart=0, started=0.0), fake, ledger)
    fake.live["30"].state, fake.live["30"].restarts = "COMPLETING", 1  # slurmd counts it first
    epilog(hook(world, "30", restart=1), fake, ledger, now=40.0)
    assert ledger.hold(hold.id).state == "pending"
    assert [c["restart"] for c in ledger.charges(hold.id)] == [0]
    fake.live["30"].state = "RUNNING"
    prolog(hook(world, "30", restart=1, started=100.0), fake, ledger)
    fake.live["30"].state = "COMPLETING"
    epilog(hook(world, "30", restart=1), fake, ledger, now=150.0)
    h = ledger.hold(hold.id)
    assert (h.state, h.charged) == ("posted", 90)
    assert sorted(c["key"] for c in ledger.charges(hold.id)) == [
        f"{hold.id}:30:0:n1", f"{hold.id}:30:1:n1"]


def test_prolog_cancels_a_job_whose_token_was_revoked(world):
    ledger, clock, token, _cfg, fake, _ = world
    hold = reserve(world)
    ledger.revoke(token, "leaked")
    fake.live["40"] = rec("40", "RUNNING", hold, clock=clock)
    prolog(hook(world, "40"), fake, ledger)
    assert fake.cancelled and fake.cancelled[0][0] == "40" and "revoked" in fake.cancelled[0][1]
    assert ledger.hold(hold.id).state == "voided"


def test_prolog_completes_or_refuses_a_deferred_reservation(world):
    ledger, clock, token, _cfg, fake, _ = world
    fake.live["50"] = rec("50", "RUNNING", comment=marks.DEFERRED, clock=clock)
    prolog(hook(world, "50", token=token), fake, ledger)
    mark = marks.parse(fake.comments["50"])
    hold = ledger.hold(mark.hold_id)
    assert (hold.job_id, hold.amount, hold.gpu_type) == ("50", 600, "h100")
    poor, _ = ledger.mint("physics", 10)
    fake.live["51"] = rec("51", "RUNNING", comment=marks.DEFERRED, clock=clock)
    prolog(hook(world, "51", token=poor), fake, ledger)
    assert fake.cancelled[-1][0] == "51" and "needs" in fake.cancelled[-1][1]
    assert ledger.holds(job_id="51") == []


def test_reconciler_voids_settles_skips_and_is_idempotent(world):
    ledger, clock, _token, _cfg, fake, _ = world
    orphan = reserve(world)  # no job anywhere
    running = reserve(world)
    fake.live["61"] = rec("61", "RUNNING", running, clock=clock)
    crashed = reserve(world, gpus=2)  # epilog never ran; two runs in accounting
    fake.acct += [rec("62", "REQUEUED", crashed, gpus={"h100": 2}, elapsed=50, clock=clock),
                  rec("62", "NODE_FAIL", crashed, restarts=1, gpus={"h100": 2}, elapsed=20,
                      clock=clock)]
    fake.acct[0].superseded = True
    half = reserve(world, gpus=2)  # node n1 charged by its epilog, n2 never reported
    settle.post_node(ledger, half.id, "63", 0, "n1", 40, {"source": "held"})
    fake.acct.append(rec("63", "COMPLETED", half, nodes=("n1", "n2"), gpus={"h100": 2},
                         elapsed=40, clock=clock))
    pending_cancel = reserve(world)
    fake.acct.append(rec("64", "CANCELLED", pending_cancel, nodes=(), clock=clock))
    clock.advance(minutes=20)
    young = reserve(world)
    rec_ = Reconciler(ledger, fake, grace_s=600)
    dry = rec_.run(dry_run=True)
    assert ledger.hold(crashed.id).state == "pending" and dry.charged == 140 + 40
    s = rec_.run()
    assert set(s.voided) == {orphan.id, pending_cancel.id}
    assert set(s.settled) == {crashed.id, half.id}
    assert (s.skipped_active, s.waiting, s.errors) == (1, 1, [])
    c = ledger.hold(crashed.id)
    assert (c.state, c.charged) == ("posted", 2 * 50 + 2 * 20)
    h = ledger.hold(half.id)
    assert (h.state, h.charged) == ("posted", 80)
    assert ledger.hold(young.id).state == "pending"
    assert ledger.hold(running.id).state == "pending"
    again = Reconciler(ledger, fake, grace_s=600).run()
    assert again.charged == 0 and again.settled == [] and again.voided == []
    assert ledger.verify_journal().ok


def test_reconciler_leaves_other_clusters_alone(world):
    ledger, clock, token, _cfg, fake, _ = world
    hold = ledger.reserve(token, HoldRequest(gpus=1, seconds=60, gpu_type="h100",
                                             cluster="other"))
    clock.advance(hours=1)
    s = Reconciler(ledger, fake, grace_s=0, cluster="mine").run()
    assert s.examined == 0 and ledger.hold(hold.id).state == "pending"


def test_run_charge_splits_gpus_over_nodes(world):
    ledger, clock, _token, *_ = world
    from slurm_plugin.reconcile import run_charge
    hold = reserve(world)
    r = rec("70", "COMPLETED", hold, nodes=("a", "b"), gpus={"h100": 3, "a100": 2},
            elapsed=10, clock=clock)
    parts = {n: amount for n, amount, _ in run_charge(ledger.rates(), hold, r)}
    assert parts == {"a": 2 * 10 + 6, "b": 1 * 10 + 6}


def test_a_run_reported_after_the_hold_closed_is_logged_uncollected(world, caplog):
    """A late epilog for a closed hold cannot charge: it says so loudly, not 'for the reconciler'."""
    ledger, clock, _token, _cfg, fake, _ = world
    hold = reserve(world)
    fake.live["41"] = rec("41", "RUNNING", hold, clock=clock)
    prolog(hook(world, "41", "n1", started=1000.0), fake, ledger)
    ledger.void(hold.id, reason="closed by hand")
    fake.live["41"].state = "COMPLETING"
    with caplog.at_level(logging.INFO):
        epilog(hook(world, "41", "n1"), fake, ledger, now=1030.0)
    assert ledger.hold(hold.id).charged == 0 and ledger.charges(hold.id) == []
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("UNCOLLECTED: 30 GPU-s not charged" in m and hold.id in m for m in errors), errors
