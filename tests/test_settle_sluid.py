"""Runs named by their SLUID (Slurm 25.11+): the per-run link, the charge key and the
deferred reservation key use it, so a job id seen again — the id counter wrapped, or a
controller that lost its state counts from 1 again — never pays from another job's hold.
Ledgers written before (``job:<id>:<restart>`` links, ``<hold>:<id>:<restart>:<node>``
charges) are still read. Fake Slurm and the daemon's real handlers, on the three databases.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from test_settle_logic import DirectClient, hook, rec, reserve, world  # noqa: F401

from ledger import settlement as settle
from slurm_plugin import ctld, marks
from slurm_plugin.epilog import epilog
from slurm_plugin.hookenv import HookEnv
from slurm_plugin.prolog import prolog
from slurm_plugin.reconcile import Reconciler

S1 = "s2MXM88KGAAR00"  # fixtures/slurm/derive.py run_sluid("2423", 0): a well-formed SLUID
S2 = "s2MXM88KGG6800"


def shook(world, job_id, sluid, **kw):
    h = hook(world, job_id, **kw)
    h.env = replace(h.env, sluid=sluid)
    return h


def start(world, job_id, sluid, **kw):
    ledger, _clock, _tok, _cfg, fake, _ = world
    started = kw.pop("started", 0.0)
    rc = ctld.prolog_slurmctld(shook(world, job_id, sluid, **kw), fake, DirectClient(ledger))
    prolog(shook(world, job_id, sluid, started=started, **kw))
    return rc


def test_hook_env_reads_the_sluid():
    base = {"SLURM_JOB_ID": "7", "SLURMD_NODENAME": "n1"}
    assert HookEnv.from_env({**base, "SLURM_JOB_SLUID": S1}).sluid == S1
    for junk in ("", "7", "s0000000000000", "$(reboot)", S1 + "X"):
        assert HookEnv.from_env({**base, "SLURM_JOB_SLUID": junk}).sluid is None
    assert HookEnv.from_env(base).sluid is None  # before 25.11


def test_a_run_with_a_sluid_is_linked_and_charged_by_it(world):
    ledger, clock, _token, _cfg, fake, _ = world
    hold = reserve(world)
    fake.live["7"] = rec("7", "RUNNING", hold, clock=clock)
    assert start(world, "7", S1, started=1000.0) == 0
    assert ledger.linked_hold("7", 0, sluid=S1) == hold.id
    assert ledger.linked_hold("7", 0) is None  # no job-id link written
    epilog(shook(world, "7", S1), DirectClient(ledger), now=1030.0)
    epilog(shook(world, "7", S1), DirectClient(ledger), now=1090.0)  # a repeat charges nothing
    ctld.epilog_slurmctld(shook(world, "7", S1), DirectClient(ledger))
    h = ledger.hold(hold.id)
    assert (h.state, h.charged) == ("posted", 30)
    assert [c["key"] for c in ledger.charges(hold.id)] == [f"{hold.id}:{S1}:n1"]
    assert (ledger.charges(hold.id)[0]["job_id"], ledger.charges(hold.id)[0]["restart"]) == (
        "7", 0)


def test_a_job_id_seen_again_pays_from_its_own_hold(world):
    """Job 123 ran and settled; the id counter starts again and a new job 123 (with its own
    SLUID) gets a new hold: its epilog charges the new hold, not the old settled one."""
    ledger, clock, _token, _cfg, fake, _ = world
    old = reserve(world)
    fake.live["123"] = rec("123", "RUNNING", old, clock=clock)
    assert start(world, "123", None) == 0  # before the upgrade: no SLUID, job:123:0 link
    epilog(hook(world, "123"), DirectClient(ledger), now=40.0)
    ctld.epilog_slurmctld(hook(world, "123"), DirectClient(ledger))
    assert ledger.hold(old.id).state == "posted"
    new = reserve(world)
    fake.live["123"] = rec("123", "RUNNING", new, clock=clock)
    assert start(world, "123", S2, started=100.0) == 0
    assert ledger.linked_hold("123", 0, sluid=S2) == new.id
    epilog(shook(world, "123", S2), DirectClient(ledger), now=160.0)
    ctld.epilog_slurmctld(shook(world, "123", S2), DirectClient(ledger))
    assert (ledger.hold(new.id).state, ledger.hold(new.id).charged) == ("posted", 60)
    assert ledger.hold(old.id).charged == 40  # untouched
    # an old job-id link still pays while its hold is pending (a run linked before upgrade)
    third = reserve(world)
    ledger.bind(third.id, "124", user="alice", account="physics")
    ledger.link_job(third.id, "124", 0, user="alice")
    assert ledger.linked_hold("124", 0, sluid=S1) == third.id


def test_deferred_runs_with_the_same_job_id_reserve_apart(world):
    ledger, clock, token, _cfg, fake, _ = world
    for sluid in (S1, S2):
        fake.live["500"] = rec("500", "RUNNING", comment=marks.DEFERRED, clock=clock)
        assert start(world, "500", sluid, token=token) == 0
    holds = ledger.holds(job_id="500")
    assert len({h.id for h in holds}) == 2
    assert ledger.linked_hold("500", 0, sluid=S1) != ledger.linked_hold("500", 0, sluid=S2)


def test_reconciler_charges_by_sluid_and_sees_either_key(world):
    ledger, clock, _token, _cfg, fake, _ = world
    both = reserve(world, gpus=2)
    # n1 charged by an epilog under the job-id key; sacct (25.11+) names the run with a SLUID
    settle.post_node(ledger, both.id, "70", 0, "n1", 40, {"source": "held"})
    r = rec("70", "COMPLETED", both, nodes=("n1", "n2"), gpus={"h100": 2}, elapsed=40,
            clock=clock)
    r.sluid = S1
    fake.acct.append(r)
    clock.advance(minutes=20)
    s = Reconciler(ledger, fake, grace_s=600).run()
    assert s.settled == [both.id] and s.errors == []
    keys = sorted(c["key"] for c in ledger.charges(both.id))
    assert keys == sorted([f"{both.id}:70:0:n1", f"{both.id}:{S1}:n2"])  # n1 not twice
    assert ledger.hold(both.id).charged == 80
    # and the other way round: an epilog charged under the SLUID, sacct has none (24.11)
    other = reserve(world)
    settle.post_node(ledger, other.id, "71", 0, "n1", 30, {"source": "held"}, sluid=S2)
    fake.acct.append(rec("71", "COMPLETED", other, elapsed=30, clock=clock))
    clock.advance(minutes=20)
    s = Reconciler(ledger, fake, grace_s=600).run()
    assert s.settled == [other.id] and ledger.hold(other.id).charged == 30


def test_daemon_bind_refuses_a_malformed_sluid(world):
    ledger = world[0]
    hold = reserve(world)
    client = DirectClient(ledger)
    with pytest.raises(Exception, match="field sluid is not a SLUID"):
        client.request("bind", hold=hold.id, job="7", user="alice", account="physics",
                       sluid="not-a-sluid")
    assert ledger.hold(hold.id).job_id is None  # refused before anything was bound
    client.request("bind", hold=hold.id, job="7", user="alice", account="physics", sluid=S1)
    assert ledger.linked_hold("7", 0, sluid=S1) == hold.id


def test_epilog_does_not_take_an_earlier_jobs_measurements(world):
    """The node's spool still holds a finished job 7 run 0 of an earlier job 7 (another
    SLUID): the new job 7's epilog settles on held time, not on those figures."""
    from slurm_plugin.agent.accounting import GpuState, JobState
    from slurm_plugin.agent.spool import Spool

    ledger, clock, _token, _cfg, fake, tmp = world
    spool = Spool(tmp / "no-agent-spool")
    spool.ensure()
    earlier = JobState(7, 0, 0, 3_600_000,
                       [GpuState(0, "GPU-x", True, None, busy_bp_ms=3_600_000 * 10_000,
                                 util_seen=True)], finished=True, sluid=S2)
    spool.write(7, 0, earlier.to_dict())
    hold = reserve(world, seconds=7200)
    fake.live["7"] = rec("7", "RUNNING", hold, clock=clock)
    start(world, "7", S1, started=1000.0)
    epilog(shook(world, "7", S1), DirectClient(ledger), now=1030.0)
    (charge,) = ledger.charges(hold.id)
    assert charge["amount"] == 30 and charge["usage"]["source"] == "held"
