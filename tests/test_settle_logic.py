"""Prolog, epilog, PrologSlurmctld/EpilogSlurmctld and reconciler rules against a fake Slurm,
on the three databases. The controller hooks talk to the daemon's real handlers."""

from __future__ import annotations

import json
import logging
from datetime import timedelta

import pytest

from ledger import config as config_mod
from ledger import settlement as settle
from ledger.daemon.auth import Peer, Policy
from ledger.daemon.client import DaemonUnavailable, response_error
from ledger.daemon.handlers import Handlers
from ledger.errors import StateError
from ledger.views import HoldRequest
from slurm_plugin import ctld, marks
from slurm_plugin.epilog import epilog
from slurm_plugin.hookcodes import REQUEUE
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
        self.asked: list[str] = []
        self.stepless: set[tuple[str, int]] = set()

    def job(self, job_id):
        self.asked.append(job_id)
        return self.live.get(job_id)

    def live_jobs(self):
        return list(self.live.values())

    def finished_jobs(self, since, job_ids=None):
        return list(self.acct)

    def cancel(self, job_id, reason):
        self.cancelled.append((job_id, reason))

    def owners(self, job_ids):
        return {r.job_id: (r.user, r.account) for r in self.acct if r.job_id in job_ids}

    def stepped_runs(self, job_ids):
        """Every finished run started a step, except those listed in ``stepless``."""
        return {(r.job_id, r.restarts or 0) for r in self.acct if r.job_id in job_ids
                and (r.job_id, r.restarts or 0) not in self.stepless}


class DirectClient:
    """The daemon's handlers without the socket, as SlurmUser (privileged) calls them."""

    def __init__(self, ledger, down: bool = False):
        self.handlers = Handlers(ledger, Policy("slurm"), accounts=lambda u: frozenset())
        self.peer = Peer(1, 64030, 64030, "slurm", True)
        self.down = down
        self.calls: list[tuple[str, dict]] = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def request(self, op, **fields):
        if self.down:
            raise DaemonUnavailable("cannot reach the gpuledger daemon")
        self.calls.append((op, fields))
        resp = self.handlers.handle(self.peer, {"op": op, **{k: str(v) for k, v in
                                                             fields.items()}})
        if resp.get("ok") != 1:
            raise response_error({k: str(v) for k, v in resp.items() if v is not None})
        return resp


def rec(job_id, state, hold=None, *, nodes=("n1",), restarts=0, gpus=None, elapsed=100,
        clock=None, array=None, task=None, comment=None, user="alice", account="physics"):
    return JobRecord(job_id=job_id, display_id=job_id, state=state, restarts=restarts,
                     nodes=list(nodes), start=clock.now if (nodes and clock) else None,
                     elapsed_s=elapsed, gpus={"h100": 1} if gpus is None else gpus, array_job_id=array,
                     array_task=task, gpu_idx={n: {0: "h100"} for n in nodes},
                     admin_comment=comment if comment is not None else (
                         marks.hold_comment(hold.id, hold.token_id) if hold else ""),
                     time_limit_s=600, user=user, account=account)


@pytest.fixture
def world(ledger, clock, tmp_path):
    token, _ = ledger.mint("physics", 36000)
    cfg = config_mod.parse({"database": {"url": "sqlite://"}}, tmp_path / "gpuledger.toml")
    gres = tmp_path / "gres.conf"
    gres.write_text("Name=gpu Type=h100 File=/dev/nvidia[0-1]\nName=gpu Type=a100 "
                    "File=/dev/nvidia2\n")
    return ledger, clock, token, cfg, FakeSlurm(), tmp_path


def hook(world, job_id, node="n1", gpus=(0,), restart=0, token=None, started=0.0, *,
         user="alice", account="physics", array=None, task=None, nodes=None, partition=None):
    _ledger, _clock, _tok, cfg, _fake, tmp = world
    env = HookEnv(job_id=job_id, node=node, restart=restart, gpus=list(gpus),
                  token=token, user=user, account=account, array_job_id=array,
                  array_task_id=task, nodes=list(nodes or [node]), partition=partition)
    return Hook(env, cfg, HookConfig(state_dir=tmp / "state" / node, log_file=None,
                                     agent_socket=str(tmp / "no-agent.sock"),
                                     agent_spool=str(tmp / "no-agent-spool"),
                                     gres_conf=str(tmp / "gres.conf"), close_wait_s=0,
                                     spool_dir=tmp / "spool" / node),
                logging.getLogger("test"), started)


def reserve(world, gpus=1, seconds=600, tasks=1, token=None, user="alice"):
    ledger, _clock, tok, *_ = world
    return ledger.reserve(token or tok, HoldRequest(gpus=gpus, seconds=seconds,
                                                    gpu_type="h100", tasks=tasks, user=user))


def start(world, job_id, **kw):
    """PrologSlurmctld, then the node prolog on each node."""
    ledger, _clock, _tok, _cfg, fake, _ = world
    nodes = kw.pop("nodes", ("n1",))
    started = kw.pop("started", 0.0)
    rc = ctld.prolog_slurmctld(hook(world, job_id, nodes[0], nodes=nodes, **kw), fake,
                               DirectClient(ledger))
    node_kw = {k: v for k, v in kw.items() if k not in ("array", "task")}  # 22.05: not there
    for node in nodes:
        prolog(hook(world, job_id, node, started=started, nodes=nodes, **node_kw))
    return rc


def end(world, job_id, **kw):
    ledger = world[0]
    ctld.epilog_slurmctld(hook(world, job_id, kw.pop("node", "n1"), **kw), DirectClient(ledger))


def test_multi_node_job_settles_once_when_every_node_reported(world):
    ledger, clock, _token, _cfg, fake, _ = world
    hold = reserve(world, gpus=2)
    fake.live["7"] = rec("7", "RUNNING", hold, nodes=("n1", "n2"), gpus={"h100": 2},
                         clock=clock)
    assert start(world, "7", nodes=("n1", "n2"), started=1000.0) == 0
    assert ledger.hold(hold.id).job_id == "7"
    epilog(hook(world, "7", "n1"), DirectClient(ledger), now=1030.0)
    end(world, "7", nodes=["n1", "n2"])  # n2 has not charged: the hold stays open
    h = ledger.hold(hold.id)
    assert (h.state, h.charged) == ("pending", 30)
    epilog(hook(world, "7", "n1"), DirectClient(ledger), now=1090.0)  # a repeat: charges nothing
    assert ledger.hold(hold.id).charged == 30
    epilog(hook(world, "7", "n2"), DirectClient(ledger), now=1031.0)
    end(world, "7", nodes=["n1", "n2"])
    h = ledger.hold(hold.id)
    assert (h.state, h.charged, h.returned) == ("posted", 61, 1200 - 61)
    usage = {c["node"]: c["usage"] for c in ledger.charges(hold.id)}
    assert usage["n1"]["gpus"][0]["held_ms"] == 30000 and usage["n1"]["source"] == "held"
    assert usage["n2"]["policy"] == "allocated" and usage["n2"]["version"] == 3
    assert [g["measured"] for g in usage["n2"]["gpus"]] == [False]
    assert fake.asked == ["7"]  # one squeue call, on the controller, for the job alone


def test_node_hooks_call_no_slurm_command(world, monkeypatch):
    import subprocess

    def no(*a, **kw):
        raise AssertionError(f"a node hook ran {a}")

    ledger, clock, _token, _cfg, fake, _ = world
    hold = reserve(world)
    fake.live["8"] = rec("8", "RUNNING", hold, clock=clock)
    ctld.prolog_slurmctld(hook(world, "8"), fake, DirectClient(ledger))
    monkeypatch.setattr(subprocess, "run", no)
    monkeypatch.setattr(subprocess, "Popen", no)
    prolog(hook(world, "8", gpus=(2,), started=0.0))
    epilog(hook(world, "8", gpus=(2,)), DirectClient(ledger), now=10.0)
    charge = ledger.charges(hold.id)[0]
    assert charge["usage"]["gpus"][0]["gpu_type"] == "a100"  # from gres.conf, not scontrol


def test_array_remainder_returns_after_the_last_task(world):
    ledger, clock, _token, _cfg, fake, _ = world
    hold = reserve(world, tasks=3)
    for i, jid in enumerate(("20", "21", "22")):
        fake.live[jid] = rec(jid, "RUNNING", hold, array="20", task=str(i), clock=clock)
        start(world, jid, array="20", task=str(i))
    assert ledger.hold(hold.id).job_id == "20"
    assert fake.asked == ["20", "21", "22"]  # each task by its own id, never the whole array
    for jid, now in (("20", 10.0), ("21", 20.0)):
        epilog(hook(world, jid), DirectClient(ledger), now=now)  # the task's own id only, as on 22.05
        end(world, jid, array="20")
        assert ledger.hold(hold.id).state == "pending"
    epilog(hook(world, "22"), DirectClient(ledger), now=30.0)
    end(world, "22", array="20")
    h = ledger.hold(hold.id)
    assert (h.state, h.charged, h.returned) == ("posted", 60, 1800 - 60)
    assert len(ledger.charges(hold.id)) == 3


def test_requeued_run_is_paid_from_a_hold_of_its_own(world):
    ledger, clock, token, _cfg, fake, _ = world
    hold = reserve(world)
    fake.live["30"] = rec("30", "RUNNING", hold, clock=clock)
    start(world, "30", restart=0, started=0.0, token=token)
    epilog(hook(world, "30", restart=1, token=token), DirectClient(ledger), now=40.0)
    end(world, "30", restart=1)  # run 0 ends (slurmctld has counted the requeue already)
    first = ledger.hold(hold.id)
    assert (first.state, first.charged) == ("posted", 40)
    assert start(world, "30", restart=1, started=100.0, token=token) == 0
    second = settle.job_hold(ledger, ["30"])
    assert second.id != hold.id and (second.amount, second.job_id) == (600, "30")
    epilog(hook(world, "30", restart=1, token=token), DirectClient(ledger), now=150.0)
    end(world, "30", restart=1)
    h = ledger.hold(second.id)
    assert (h.state, h.charged) == ("posted", 50)
    assert [c["key"] for c in ledger.charges(second.id)] == [f"{second.id}:30:1:n1"]


def test_prolog_slurmctld_cancels_a_job_whose_token_was_revoked(world):
    ledger, clock, token, _cfg, fake, _ = world
    hold = reserve(world)
    ledger.revoke(token, "leaked")
    fake.live["40"] = rec("40", "CONFIGURING", hold, clock=clock)
    ctld.prolog_slurmctld(hook(world, "40"), fake, DirectClient(ledger))
    assert fake.cancelled and fake.cancelled[0][0] == "40" and "revoked" in fake.cancelled[0][1]
    assert ledger.hold(hold.id).state == "voided"


def test_prolog_slurmctld_reprices_for_the_qos_slurm_runs_the_job_in(world):
    """job_submit held it at 1 (no --qos); the association's default QOS is premium (2x):
    the bind re-prices the hold; a token that cannot pay it gets the job cancelled."""
    ledger, clock, _token, _cfg, fake, _ = world
    ledger.set_multiplier("qos", "premium", 2_000_000)
    hold = reserve(world)
    fake.live["60"] = rec("60", "CONFIGURING", hold, clock=clock)
    fake.live["60"].qos = "premium"
    client = DirectClient(ledger)
    assert ctld.prolog_slurmctld(hook(world, "60"), fake, client) == 0
    assert client.calls[0][1]["qos"] == "premium" and fake.cancelled == []
    assert client.calls[0][1]["partition"] == ""  # the record names none
    h = ledger.hold(hold.id)
    assert (h.amount, h.qos, h.job_id) == (1200, "premium", "60")
    poor, _ = ledger.mint("physics", 700)
    thin = reserve(world, token=poor)
    fake.live["61"] = rec("61", "CONFIGURING", thin, clock=clock)
    fake.live["61"].qos = "premium"
    assert ctld.prolog_slurmctld(hook(world, "61"), fake, DirectClient(ledger)) == 0
    assert fake.cancelled == [("61", "gpu-token: the job runs in QOS premium (2x): needs "
                                     "0.167 GPU-h more, token " + thin.token_id + " has 0.028 "
                                     "GPU-h left; job cancelled before it ran")]
    assert ledger.hold(thin.id).state == "voided" and ledger.verify_journal().ok


def test_prolog_slurmctld_reprices_a_one_run_hold_to_the_gpus_slurm_allocated(world):
    """job_submit held an estimate; Slurm gave the run 3 GPUs on 3 nodes (-n 3 without -N on
    a site whose estimate was capped lower, say): the bind re-prices the hold to 3 GPUs. A
    run that got fewer pays less; an untyped hold that got an a100 is priced as one; a token
    that cannot pay the difference gets the job cancelled, never run on a smaller hold."""
    ledger, clock, _token, _cfg, fake, _ = world
    hold = reserve(world)  # 1 x h100 x 600 s
    fake.live["62"] = rec("62", "CONFIGURING", hold, clock=clock, nodes=("n1", "n2", "n3"),
                          gpus={"h100": 3})
    client = DirectClient(ledger)
    assert ctld.prolog_slurmctld(hook(world, "62"), fake, client) == 0
    assert client.calls[0][1]["alloc_gpus"] == 3 and client.calls[0][1]["alloc_type"] == "h100"
    h = ledger.hold(hold.id)
    assert (h.gpus, h.amount, h.job_id, fake.cancelled) == (3, 1800, "62", [])
    big = reserve(world, gpus=4)
    fake.live["63"] = rec("63", "CONFIGURING", big, clock=clock, gpus={"h100": 2})
    assert ctld.prolog_slurmctld(hook(world, "63"), fake, DirectClient(ledger)) == 0
    assert (ledger.hold(big.id).gpus, ledger.hold(big.id).amount) == (2, 1200)
    ledger.set_rate("a100", 600_000)
    untyped = ledger.reserve(world[2], HoldRequest(gpus=1, seconds=600, user="alice"))
    fake.live["64"] = rec("64", "CONFIGURING", untyped, clock=clock, gpus={"a100": 1})
    assert ctld.prolog_slurmctld(hook(world, "64"), fake, DirectClient(ledger)) == 0
    h = ledger.hold(untyped.id)
    assert (h.gpu_type, h.rate_ppm, h.amount) == ("a100", 600_000, 360)
    poor, _ = ledger.mint("physics", 700)
    thin = reserve(world, token=poor)
    fake.live["65"] = rec("65", "CONFIGURING", thin, clock=clock, gpus={"h100": 2})
    assert ctld.prolog_slurmctld(hook(world, "65"), fake, DirectClient(ledger)) == 0
    assert fake.cancelled and fake.cancelled[-1][0] == "65"
    assert "needs 0.167 GPU-h more" in fake.cancelled[-1][1]
    assert ledger.hold(thin.id).state == "voided" and ledger.verify_journal().ok


def test_a_hold_answered_but_never_written_is_reserved_at_start_or_the_job_cancelled(world):
    """The daemon answered hold X from memory and died before writing it (fast_reserve):
    the job names a hold the ledger does not know; it pays now from its token, or is
    cancelled — it never runs unpaid."""
    ledger, clock, token, _cfg, fake, _ = world
    ghost = marks.hold_comment("hold_" + "0" * 20, ledger.token_id_of(token))
    fake.live["70"] = rec("70", "CONFIGURING", comment=ghost, clock=clock)
    assert ctld.prolog_slurmctld(hook(world, "70", token=token), fake, DirectClient(ledger)) == 0
    hold = settle.job_hold(ledger, ["70"])
    assert (hold.job_id, hold.amount, hold.state) == ("70", 600, "pending")
    assert fake.cancelled == []
    poor, _ = ledger.mint("physics", 10)
    fake.live["71"] = rec("71", "CONFIGURING", comment=marks.hold_comment(
        "hold_" + "1" * 20, ledger.token_id_of(poor)), clock=clock)
    ctld.prolog_slurmctld(hook(world, "71", token=poor), fake, DirectClient(ledger))
    assert fake.cancelled[-1][0] == "71" and "needs" in fake.cancelled[-1][1]
    assert ledger.holds(job_id="71") == [] and ledger.verify_journal().ok


def test_prolog_slurmctld_completes_or_refuses_a_deferred_reservation(world):
    ledger, clock, token, _cfg, fake, _ = world
    fake.live["50"] = rec("50", "CONFIGURING", comment=marks.DEFERRED, clock=clock)
    assert ctld.prolog_slurmctld(hook(world, "50", token=token), fake,
                                 DirectClient(ledger)) == 0
    hold = settle.job_hold(ledger, ["50"])
    assert (hold.job_id, hold.amount, hold.gpu_type, hold.user) == ("50", 600, "h100", "alice")
    poor, _ = ledger.mint("physics", 10)
    fake.live["51"] = rec("51", "CONFIGURING", comment=marks.DEFERRED, clock=clock)
    ctld.prolog_slurmctld(hook(world, "51", token=poor), fake, DirectClient(ledger))
    assert fake.cancelled[-1][0] == "51" and "needs" in fake.cancelled[-1][1]
    assert ledger.holds(job_id="51") == []


def test_a_deferred_job_with_a_blank_token_is_cancelled_not_run_unpaid(world):
    """A token of spaces (deferred while the ledger was down, before job_submit.lua trimmed
    tokens) is no token: the controller hook still sees the job and cancels it."""
    from slurm_plugin.hookenv import HookEnv
    ledger, clock, _token, _cfg, fake, _ = world
    env = HookEnv.from_env({"SLURM_JOB_ID": "52", "SPANK_GPULEDGER_TOKEN": "  \t "})
    assert env.token is None and env.may_be_ours  # the hook runs: it is not "not ours"
    assert not HookEnv.from_env({"SLURM_JOB_ID": "53"}).may_be_ours
    fake.live["52"] = rec("52", "CONFIGURING", comment=marks.DEFERRED, clock=clock)
    assert ctld.prolog_slurmctld(hook(world, "52", token=None), fake, DirectClient(ledger)) == 0
    assert fake.cancelled == [("52", "gpu-token: the job carries no token and has no hold; "
                                     "cancelled")]
    assert ledger.holds(job_id="52") == []


@pytest.mark.parametrize("failure", ["down", "internal"])
def test_deferred_job_that_cannot_be_paid_is_requeued_not_run(world, failure, monkeypatch):
    """Item: a deferred job never runs with no hold — ledger down or any non-refusal error."""
    ledger, clock, token, _cfg, fake, _ = world
    fake.live["52"] = rec("52", "CONFIGURING", comment=marks.DEFERRED, clock=clock)
    client = DirectClient(ledger, down=failure == "down")
    if failure == "internal":
        def boom(*a, **kw):
            raise RuntimeError("database went away")
        monkeypatch.setattr(ledger, "reserve", boom)
    rc = ctld.prolog_slurmctld(hook(world, "52", token=token), fake, client)
    assert rc == REQUEUE and fake.cancelled == []
    assert ledger.holds(job_id="52") == []


def test_a_forged_user_comment_binds_and_charges_nothing(world):
    """--comment=gpuledger:hold=<bob's hold> on alice's job: bob's hold is untouched."""
    ledger, clock, _token, _cfg, fake, _ = world
    bob_token, _ = ledger.mint("physics", 3600)
    bobs = reserve(world, token=bob_token, user="bob")
    forged = marks.hold_comment(bobs.id, bobs.token_id)
    # Slurm hands the user's --comment to every hook as SLURM_JOB_COMMENT; the AdminComment
    # (job_submit's) is empty for alice's CPU job, so nothing is gpuledger's.
    fake.live["80"] = rec("80", "RUNNING", comment="", clock=clock, gpus={})
    env = {"SLURM_JOB_ID": "80", "SLURM_JOB_COMMENT": forged, "SLURM_JOB_USER": "alice",
           "SLURM_JOB_GPUS": "0", "SLURMD_NODENAME": "n1"}
    e = HookEnv.from_env(env)
    assert not hasattr(e, "comment") and e.user == "alice"
    h = hook(world, "80")
    ctld.prolog_slurmctld(h, fake, DirectClient(ledger))
    prolog(h)
    epilog(hook(world, "80"), DirectClient(ledger), now=50.0)
    ctld.epilog_slurmctld(hook(world, "80"), DirectClient(ledger))
    b = ledger.hold(bobs.id)
    assert (b.state, b.job_id, b.charged) == ("pending", None, 0)
    # Even bound by mistake, alice's epilog never charges bob's hold ...
    ledger.bind(bobs.id, "81")
    fake.live["81"] = rec("81", "RUNNING", comment="", clock=clock)
    prolog(hook(world, "81"))
    epilog(hook(world, "81"), DirectClient(ledger), now=50.0)
    assert ledger.hold(bobs.id).charged == 0
    # ... and the ledger binds a hold only to its own user's and account's job, once.
    with pytest.raises(StateError, match="reserved for user bob, not alice"):
        ledger.bind(bobs.id, "81", user="alice", account="physics")
    with pytest.raises(StateError, match="belongs to job 81"):
        ledger.bind(bobs.id, "82", user="bob", account="physics")
    mine = reserve(world)
    with pytest.raises(StateError, match="reserved for account physics, not chemistry"):
        ledger.bind(mine.id, "83", user="alice", account="chemistry")


def test_prolog_slurmctld_cancels_a_job_whose_hold_is_not_its_own(world):
    ledger, clock, _token, _cfg, fake, _ = world
    bob_token, _ = ledger.mint("physics", 3600)
    bobs = reserve(world, token=bob_token, user="bob")
    fake.live["84"] = rec("84", "CONFIGURING", bobs, clock=clock)  # an admin's slip
    ctld.prolog_slurmctld(hook(world, "84"), fake, DirectClient(ledger))
    assert fake.cancelled and "reserved for user bob" in fake.cancelled[0][1]
    assert ledger.hold(bobs.id).job_id is None


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


def test_reconciler_says_per_hold_what_it_did_and_why(world):
    ledger, clock, _token, _cfg, fake, _ = world
    orphan = reserve(world)
    running = reserve(world)
    fake.live["71"] = rec("71", "RUNNING", running, clock=clock)
    done = reserve(world, gpus=2)
    fake.acct.append(rec("72", "COMPLETED", done, gpus={"h100": 2}, elapsed=30, clock=clock))
    never = reserve(world)
    fake.acct.append(rec("73", "CANCELLED", never, nodes=(), clock=clock))
    clock.advance(minutes=20)
    young = reserve(world)
    dry = Reconciler(ledger, fake, grace_s=600).run(dry_run=True)
    s = Reconciler(ledger, fake, grace_s=600).run()
    for summary in (dry, s):
        by = {d.hold: d for d in summary.decisions}
        assert set(by) == {orphan.id, running.id, done.id, never.id, young.id}
        assert (by[orphan.id].action, by[orphan.id].job) == ("void", None)
        assert (by[done.id].job, by[running.id].job) == ("72", "71")
        assert "no Slurm job in the live table or in accounting after 1200 s" in by[orphan.id].why
        assert by[running.id].action == "running" and "job 71 is RUNNING" in by[running.id].why
        assert (by[done.id].action, by[done.id].charged) == ("settle", 2 * 30)
        assert "72 COMPLETED" in by[done.id].why
        assert by[never.id].action == "void" and "without running (73 CANCELLED)" in \
            by[never.id].why
        assert by[young.id].action == "wait" and "within the 600 s grace period" in \
            by[young.id].why
    assert s.to_dict()["holds"] == [d.to_dict() for d in s.decisions]
    assert ledger.hold(done.id).charged == 60 and ledger.hold(never.id).state == "voided"


def test_reconcile_prints_a_line_per_hold_it_settles_or_voids(world, monkeypatch):
    from click.testing import CliRunner

    import slurm_plugin.cli as plugin_cli
    from ledger.cli.context import App

    ledger, clock, _token, cfg, fake, _ = world
    orphan = reserve(world)
    running = reserve(world)
    fake.live["81"] = rec("81", "RUNNING", running, clock=clock)
    done = reserve(world)
    fake.acct.append(rec("82", "COMPLETED", done, elapsed=36, clock=clock))
    clock.advance(minutes=20)
    monkeypatch.setattr(plugin_cli, "CommandReader", lambda *a, **kw: fake)
    app = App(None)
    app.__dict__.update(config=cfg, ledger=ledger)

    def run(*args):
        return CliRunner().invoke(plugin_cli.reconcile, list(args), obj=app)

    dry = run("--dry-run")
    assert dry.exit_code == 0, dry.output
    lines = dry.output.splitlines()
    assert lines[0].startswith("3 pending hold(s): would settle 1, would void 1, 1 still running")
    assert f"{orphan.id} (job -): would void: no Slurm job in the live table" in dry.output
    assert f"{done.id} (job 82): would settle, 0.010 GPU-h charged: job over (82 COMPLETED)" \
        in dry.output
    assert running.id not in dry.output
    verbose = run("--dry-run", "--verbose")
    assert f"{running.id} (job 81): leave: job 81 is RUNNING" in verbose.output
    real = run("--json")
    holds = {h["hold"]: h for h in json.loads(real.output)["holds"]}
    assert holds[done.id]["action"] == "settle" and holds[done.id]["charged"] == 36
    assert holds[orphan.id]["action"] == "void" and holds[running.id]["action"] == "running"
    assert ledger.hold(done.id).state == "posted" and ledger.hold(orphan.id).state == "voided"


def test_reconciler_records_a_deferred_run_that_had_no_hold_as_owed(world):
    """A deferred job that ran with no hold (no PrologSlurmctld): recorded as owed and reported
    loudly; a deferred job whose hold PrologSlurmctld reserved is settled as usual."""
    ledger, clock, token, _cfg, fake, _ = world
    fake.acct.append(rec("90", "COMPLETED", comment=marks.DEFERRED, elapsed=300, clock=clock))
    older = rec("89", "COMPLETED", comment=marks.DEFERRED, elapsed=300, clock=clock)
    older.start -= timedelta(days=2)  # before this ledger existed: another ledger's job
    fake.acct.append(older)
    fake.live["91"] = rec("91", "CONFIGURING", comment=marks.DEFERRED, clock=clock)
    ctld.prolog_slurmctld(hook(world, "91", token=token), fake, DirectClient(ledger))
    fake.acct.append(rec("91", "COMPLETED", comment=marks.DEFERRED, elapsed=50, clock=clock))
    del fake.live["91"]
    s = Reconciler(ledger, fake, grace_s=600).run()
    assert s.debts == [{"job_id": "90", "restart": 0, "account": "physics", "owed": 300,
                        "charged": 0, "unpaid": 300}]
    assert any("job 90" in e and "300 GPU-s owed by account physics" in e for e in s.errors)
    assert ledger.hold(settle.job_hold(ledger, ["91"], settled=True).id).charged == 50
    debts = [j for j in ledger.journal() if j["kind"] == "debt"]
    assert len(debts) == 1 and debts[0]["data"]["owed"] == 300
    again = Reconciler(ledger, fake, grace_s=600).run()
    assert again.debts == s.debts  # reported again, recorded once
    assert len([j for j in ledger.journal() if j["kind"] == "debt"]) == 1
    assert ledger.verify_journal().ok


def test_a_deferred_run_refused_or_requeued_by_prolog_slurmctld_owes_nothing(world):
    """Given nodes for a second, no step started: PrologSlurmctld cancelled the run (its token
    could not pay) or requeued it (ledger down). The script never ran: no debt, no error."""
    ledger, clock, _token, _cfg, fake, _ = world
    fake.acct.append(rec("95", "CANCELLED", comment=marks.DEFERRED, elapsed=1, clock=clock))
    fake.acct.append(rec("96", "REQUEUED", comment=marks.DEFERRED, elapsed=1, clock=clock))
    fake.acct[-1].superseded = True
    fake.acct.append(rec("96", "CANCELLED", comment=marks.DEFERRED, elapsed=1, restarts=1,
                         clock=clock))
    fake.stepless |= {("95", 0), ("96", 0), ("96", 1)}
    s = Reconciler(ledger, fake, grace_s=600).run()
    assert (s.debts, s.errors) == ([], [])
    assert not [j for j in ledger.journal() if j["kind"] == "debt"]
    fake.stepless.discard(("96", 1))  # the second run did start its script: that one is owed
    s = Reconciler(ledger, fake, grace_s=600).run()
    assert [(d["job_id"], d["restart"], d["owed"]) for d in s.debts] == [("96", 1, 1)]


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
    start(world, "41", started=1000.0)
    ledger.void(hold.id, reason="closed by hand")
    with caplog.at_level(logging.INFO):
        epilog(hook(world, "41", "n1"), DirectClient(ledger), now=1030.0)
    assert ledger.hold(hold.id).charged == 0 and ledger.charges(hold.id) == []
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("UNCOLLECTED: 30 GPU-s not charged" in m and hold.id in m for m in errors), errors


# -- shares of a GPU (shard, mps) --------------------------------------------------------------

SHARD_GRES = ("Name=gpu Type=h100 File=/dev/nvidia[0-1]\nName=gpu Type=a100 File=/dev/nvidia2\n"
              "Name=shard Count=4 File=/dev/nvidia0\nName=shard Count=8 File=/dev/nvidia1\n"
              "Name=shard Count=4 File=/dev/nvidia2\n")


def shares_world(world):
    from ledger.shares import GresFile
    ledger, *_rest, tmp = world
    (tmp / "gres.conf").write_text(SHARD_GRES)
    ledger.gres = GresFile(tmp / "gres.conf")


@pytest.mark.parametrize("gpu,charge", [
    (1, 38),  # ran on the h100 cut into 8: 3/8 x 1.0 x 100 s = 37.5, rounded up
    (2, 45),  # ran on the a100 cut into 4: 3/4 x 0.6 x 100 s (held at 3/4 of h100's 1.0)
])
def test_a_shard_job_is_charged_its_share_of_the_gpu_it_ran_on(world, gpu, charge):
    """The prolog sees the GPU (SLURM_JOB_GPUS) and gres.conf's shard count of it; the hold
    says how many shards per node: s_g / S_g x rate(type_g) x held seconds, rounded up."""
    ledger, clock, tok, _cfg, fake, _ = world
    shares_world(world)
    hold = ledger.reserve(tok, HoldRequest(gpus=3, seconds=600, gres="shard", user="alice"))
    assert (hold.share, hold.rate_ppm, hold.amount) == (4, 1_000_000, 3 * 600 // 4)
    fake.live["90"] = rec("90", "RUNNING", hold, clock=clock, gpus={})
    fake.live["90"].tres_per_node = "gres:shard:3"  # Slurm's TRES count no gres/gpu for shards
    start(world, "90", gpus=(gpu,), started=1000.0)
    epilog(hook(world, "90", gpus=(gpu,)), DirectClient(ledger), now=1100.0)
    [c] = ledger.charges(hold.id)
    [line] = c["usage"]["gpus"]
    assert c["amount"] == charge and line["index"] == gpu
    assert line["share"] == ("3/8" if gpu == 1 else "3/4") and line["measured"] is False


def test_an_mps_job_pays_its_percentage_and_the_reconciler_the_holds_price(world):
    ledger, clock, tok, *_ = world
    shares_world(world)
    from slurm_plugin.reconcile import run_charge
    hold = ledger.reserve(tok, HoldRequest(gpus=25, seconds=600, gres="mps", gpu_type="a100",
                                           user="alice"))
    assert (hold.share, hold.amount) == (100, 25 * 600 * 6 // 1000)
    # sacct says nothing of shares (no gres/shard, gres/mps TRES): each node pays the hold's
    # own price for the elapsed time
    r = rec("91", "COMPLETED", hold, nodes=("a",), gpus={}, elapsed=40, clock=clock)
    [(node, amount, record)] = run_charge(ledger.rates(), hold, r)
    assert (node, amount, record.gpus[0].share) == ("a", 25 * 40 * 6 // 1000, "25/100")


# -- tiers (partition, QOS, time of use) -----------------------------------------------------

def test_a_run_pays_the_tiers_of_the_partition_it_ran_in_and_its_qos(world):
    """Held at the worst candidate (gpu: 1.0, x2 premium); it ran in scavenger (0.25):
    100 s x 1.0 x 0.25 x 2 = 50; the reconciler, with no partition from sacct, charges the
    candidates' worst case."""
    ledger, clock, tok, _cfg, fake, _ = world
    ledger.set_multiplier("partition", "scavenger", 250_000)
    ledger.set_multiplier("qos", "premium", 2_000_000)
    hold = ledger.reserve(tok, HoldRequest(gpus=1, seconds=600, gpu_type="h100", user="alice",
                                           partition="gpu,scavenger", qos="premium"))
    assert (hold.amount, hold.multiplier_ppm) == (1200, 2_000_000)
    fake.live["95"] = rec("95", "RUNNING", hold, clock=clock)
    start(world, "95", started=1000.0)
    epilog(hook(world, "95", partition="scavenger"), DirectClient(ledger), now=1100.0)
    [c] = ledger.charges(hold.id)
    assert c["amount"] == 50
    assert c["usage"]["gpus"][0]["tiers"] == [
        {"tier": "standard", "multiplier_ppm": 500_000, "ms": 100_000, "amount": 50}]
    from slurm_plugin.reconcile import run_charge
    r = rec("95", "COMPLETED", hold, elapsed=100, clock=clock)
    [(_node, amount, _r)] = run_charge(ledger.rates(), hold, r, ledger.tiers())
    assert amount == 200


def test_a_deferred_shard_job_is_reserved_as_its_share(world):
    """A job accepted while the ledger was down asks for shards: PrologSlurmctld reserves
    the share its TresPerNode names (Slurm's TRES count no gres/gpu for it), not a GPU."""
    ledger, clock, token, _cfg, fake, _ = world
    shares_world(world)
    r = rec("52", "CONFIGURING", comment=marks.DEFERRED, clock=clock, gpus={None: 0})
    r.gpus, r.tres_per_node = {}, "gres:shard:h100:3"
    fake.live["52"] = r
    assert ctld.prolog_slurmctld(hook(world, "52", token=token), fake,
                                 DirectClient(ledger)) == 0
    hold = settle.job_hold(ledger, ["52"])
    assert (hold.gres, hold.per_node, hold.gpus, hold.share, hold.gpu_type, hold.amount) == \
        ("shard", 3, 3, 4, "h100", 3 * 600 // 4)
