"""Several clusters on one ledger: their job ids overlap, each run pays its own cluster's hold.

Two Slurm clusters sharing a ledger count job ids from their own FirstJobId, so alpha's job
7 and beta's job 7 are different jobs (found by the two-cluster lane, tests/lanes/
twocluster: beta's epilog charged alpha's hold and closed it, alpha's stayed pending). The
hooks run against the daemon's real handlers (``DirectClient``), one ledger object per
cluster on one database, as one daemon per controller; on the three databases.
"""

from __future__ import annotations

import logging

import pytest
from test_settle_logic import DirectClient, FakeSlurm, rec

from ledger import config as config_mod
from ledger import settlement
from ledger.errors import StateError
from ledger.service import Ledger
from ledger.views import HoldRequest
from slurm_plugin import ctld
from slurm_plugin.epilog import epilog
from slurm_plugin.hookconf import HookConfig
from slurm_plugin.hookenv import Hook, HookEnv
from slurm_plugin.prolog import prolog
from slurm_plugin.receipt import holds_for_job
from slurm_plugin.reconcile import Reconciler


class Site:
    """One ledger database, a daemon (handlers) and a fake Slurm per cluster."""

    def __init__(self, ledger: Ledger, clock, tmp_path):
        self.base, self.clock, self.tmp = ledger, clock, tmp_path
        self.token, _ = ledger.mint("physics", 36000)
        (tmp_path / "gres.conf").write_text("Name=gpu Type=h100 File=/dev/nvidia[0-1]\n")
        self.ledgers = {c: Ledger(ledger.engine, keys_dir=ledger.keys_dir, clock=ledger.clock,
                                  cluster=c) for c in ("alpha", "beta")}
        self.slurm = {c: FakeSlurm() for c in self.ledgers}

    def cfg(self, cluster: str):
        return config_mod.parse({"cluster": cluster, "database": {"url": "sqlite://"}},
                                self.tmp / f"{cluster}.toml")

    def hook(self, cluster: str, job: str, node: str, started: float = 0.0) -> Hook:
        env = HookEnv(job_id=job, node=node, restart=0, gpus=[0], token=None, user="alice",
                      account="physics", nodes=[node])
        d = self.tmp / cluster
        return Hook(env, self.cfg(cluster),
                    HookConfig(state_dir=d / "state", log_file=None,
                               agent_socket=str(d / "no-agent.sock"),
                               agent_spool=str(d / "no-agent-spool"),
                               gres_conf=str(self.tmp / "gres.conf"), close_wait_s=0,
                               spool_dir=d / "spool"),
                    logging.getLogger("test"), started)

    def reserve(self, cluster: str):
        """job_submit.lua on ``cluster``: its daemon holds (the hold records the cluster)."""
        return self.ledgers[cluster].reserve(
            self.token, HoldRequest(gpus=1, seconds=600, gpu_type="h100", user="alice"))

    def client(self, cluster: str) -> DirectClient:
        return DirectClient(self.ledgers[cluster])

    def start(self, cluster: str, job: str, hold, node: str, started: float) -> None:
        self.slurm[cluster].live[job] = rec(job, "RUNNING", hold, nodes=(node,),
                                            clock=self.clock)
        assert ctld.prolog_slurmctld(self.hook(cluster, job, node), self.slurm[cluster],
                                     self.client(cluster)) == 0
        prolog(self.hook(cluster, job, node, started))

    def end(self, cluster: str, job: str, node: str, now: float) -> None:
        epilog(self.hook(cluster, job, node), self.client(cluster), now=now)
        ctld.epilog_slurmctld(self.hook(cluster, job, node), self.client(cluster))


@pytest.fixture
def site(ledger, clock, tmp_path):
    return Site(ledger, clock, tmp_path)


def test_the_same_job_id_on_two_clusters_pays_two_holds(site):
    a, b = site.reserve("alpha"), site.reserve("beta")
    assert (a.cluster, b.cluster) == ("alpha", "beta")
    site.start("alpha", "7", a, "a1", 1000.0)
    site.start("beta", "7", b, "b1", 1000.0)  # bound and linked although alpha's 7 runs too
    site.end("alpha", "7", "a1", 1030.0)
    site.end("beta", "7", "b1", 1050.0)
    ledger = site.base
    ha, hb = ledger.hold(a.id), ledger.hold(b.id)
    assert (ha.state, ha.charged, ha.job_id) == ("posted", 30, "7")
    assert (hb.state, hb.charged, hb.job_id) == ("posted", 50, "7")
    assert [c["node"] for c in ledger.charges(a.id)] == ["a1"]
    assert [c["node"] for c in ledger.charges(b.id)] == ["b1"]
    assert ledger.linked_hold("7", 0, cluster="alpha") == a.id
    assert ledger.linked_hold("7", 0, cluster="beta") == b.id
    assert ledger.inspect(site.token).remaining == 36000 - 80
    assert ledger.verify_journal().ok


def test_each_cluster_closes_its_own_hold(site):
    """EpilogSlurmctld's finish on beta does not close alpha's hold of the same job id."""
    a, b = site.reserve("alpha"), site.reserve("beta")
    site.start("alpha", "9", a, "a1", 1000.0)
    site.start("beta", "9", b, "b1", 1000.0)
    site.end("beta", "9", "b1", 1010.0)
    assert site.base.hold(b.id).state == "posted"
    assert site.base.hold(a.id).state == "pending"  # alpha's run is still going
    state, view = settlement.finish(site.base, ["9"], "9", ["a1"], cluster="alpha")
    assert (state, view.id) == ("waiting", a.id)


def test_a_hold_binds_only_on_the_cluster_it_was_reserved_on(site):
    """A mark of alpha's hold on a beta job (a misrouted job_submit.conf): the bind is refused
    and PrologSlurmctld cancels the job, never charging alpha's hold for beta's run."""
    a = site.reserve("alpha")
    site.slurm["beta"].live["11"] = rec("11", "RUNNING", a, nodes=("b1",), clock=site.clock)
    ctld.prolog_slurmctld(site.hook("beta", "11", "b1"), site.slurm["beta"], site.client("beta"))
    (job, why), = site.slurm["beta"].cancelled
    assert job == "11" and "reserved on cluster alpha, not beta" in why
    assert site.base.hold(a.id).job_id is None
    with pytest.raises(StateError, match="reserved on cluster alpha, not beta"):
        site.base.bind(a.id, "11", cluster="beta")


def test_a_link_from_before_clusters_counts_only_for_its_own_hold(site):
    """``job:<id>:<restart>`` links (no cluster: a ledger from before) are still read, but
    only for a hold of no cluster or of the cluster asking."""
    ledger = site.base
    old = ledger.reserve(site.token, HoldRequest(gpus=1, seconds=600, user="alice"))
    assert old.cluster is None
    ledger.bind(old.id, "21")
    ledger.link_job(old.id, "21", 0, user="alice")
    assert ledger.linked_hold("21", 0) == old.id
    assert ledger.linked_hold("21", 0, cluster="alpha") == old.id  # a hold of no cluster
    b = site.reserve("beta")
    ledger.bind(b.id, "22", cluster="beta")
    ledger.link_job(b.id, "22", 0, user="alice")  # written without the cluster (old daemon)
    assert ledger.linked_hold("22", 0, cluster="beta") == b.id
    assert ledger.linked_hold("22", 0, cluster="alpha") is None  # beta's hold, not alpha's
    assert ledger.verify_journal().ok


def test_lookups_by_job_id_are_per_cluster(site):
    a, b = site.reserve("alpha"), site.reserve("beta")
    site.base.bind(a.id, "31", cluster="alpha")
    site.base.bind(b.id, "31", cluster="beta")
    assert [h.id for h in site.base.holds(job_id="31", cluster="alpha")] == [a.id]
    assert [h.id for h in site.base.holds(job_id="31", cluster="beta")] == [b.id]
    assert {h.id for h in site.base.holds(job_id="31")} == {a.id, b.id}
    assert [h.id for h in holds_for_job(site.base, "31", cluster="beta")] == [b.id]
    assert settlement.job_hold(site.base, ["31"], cluster="alpha").id == a.id


def test_the_reconciler_settles_only_its_own_clusters_holds(site):
    """Each controller's reconciler reads its own Slurm: beta's job 41 in beta's accounting
    settles beta's hold; alpha's hold of job 41, with no record in alpha's Slurm yet, waits."""
    a, b = site.reserve("alpha"), site.reserve("beta")
    site.base.bind(a.id, "41", cluster="alpha")
    site.base.bind(b.id, "41", cluster="beta")
    site.slurm["beta"].acct.append(rec("41", "COMPLETED", b, nodes=("b1",), elapsed=20,
                                       clock=site.clock))
    site.slurm["alpha"].live["41"] = rec("41", "RUNNING", a, nodes=("a1",), clock=site.clock)
    for cluster in ("beta", "alpha"):
        Reconciler(site.ledgers[cluster], site.slurm[cluster], grace_s=0).run()
    hb, ha = site.base.hold(b.id), site.base.hold(a.id)
    assert (hb.state, hb.charged) == ("posted", 20)
    assert (ha.state, ha.charged) == ("pending", 0)


# -- federation: every sibling holds, the run that starts pays --------------------------------

FED = str(1 << 26 | 4217)  # a federated job id: origin 1 (alpha), alpha's local id 4217


class FedSlurm(FakeSlurm):
    """A cluster's Slurm in a federation: sacct -M answers from the siblings' records."""

    def __init__(self, copies: list):
        super().__init__()
        self.copies = copies
        self.copies_asked: list[tuple[str, list[str]]] = []

    def sibling_copies(self, job_id, clusters):
        self.copies_asked.append((job_id, list(clusters)))
        return [c for c in self.copies if c.job_id == job_id and c.cluster in clusters]


def fed_start(site, runs_on: str, own, other_copy, other_cluster: str):
    """PrologSlurmctld of the federated job on ``runs_on``; ``other_copy`` is the sibling's
    accounting record of its copy."""
    slurm = FedSlurm([other_copy])
    site.slurm[runs_on] = slurm
    record = rec(FED, "RUNNING", own, nodes=("b1",), clock=site.clock)
    record.cluster, record.fed_siblings = runs_on, ("alpha", "beta")
    slurm.live[FED] = record
    assert ctld.prolog_slurmctld(site.hook(runs_on, FED, "b1"), slurm, site.client(runs_on)) == 0
    return slurm


def copy_of(site, hold, cluster: str, state: str = "REVOKED"):
    r = rec(FED, state, hold, nodes=(), clock=site.clock)
    r.cluster = cluster
    return r


def test_a_federated_run_returns_the_revoked_siblings_hold_at_once(site):
    """Both siblings' job_submit held the job (origin alpha, copy on beta); it starts on
    beta: beta's hold is bound, alpha's copy is REVOKED and its hold returned at start."""
    a, b = site.reserve("alpha"), site.reserve("beta")
    assert site.base.inspect(site.token).remaining == 36000 - 1200
    slurm = fed_start(site, "beta", b, copy_of(site, a, "alpha"), "alpha")
    assert slurm.copies_asked == [(FED, ["alpha"])]
    ha, hb = site.base.hold(a.id), site.base.hold(b.id)
    assert (ha.state, ha.charged, ha.returned, ha.job_id) == ("voided", 0, 600, None)
    assert (hb.state, hb.job_id) == ("pending", FED)
    assert site.base.inspect(site.token).remaining == 36000 - 600  # one copy held: one job
    prolog(site.hook("beta", FED, "b1", 1000.0))
    site.end("beta", FED, "b1", 1040.0)
    assert site.base.hold(b.id).charged == 40
    assert site.base.inspect(site.token).remaining == 36000 - 40
    assert site.base.verify_journal().ok


def test_a_pending_sibling_copy_is_left_to_its_reconciler(site):
    """A copy not yet REVOKED in accounting is not touched at start; its own cluster's
    reconciler returns the hold once Slurm has revoked it (no hook runs for a revoked
    copy)."""
    a, b = site.reserve("alpha"), site.reserve("beta")
    fed_start(site, "beta", b, copy_of(site, a, "alpha", "PENDING"), "alpha")
    assert site.base.hold(a.id).state == "pending"
    site.slurm["alpha"].acct.append(copy_of(site, a, "alpha"))
    summary = Reconciler(site.ledgers["alpha"], site.slurm["alpha"], grace_s=600).run()
    assert summary.voided == [a.id] and summary.charged == 0
    assert site.base.hold(b.id).state == "pending"  # beta's is beta's to settle


def test_22_05s_revoked_copy_without_an_id_is_found_by_its_mark(site):
    """22.05's squeue prints a copy revoked on a non-origin sibling with a null job id
    (slurmjson reads it as ""): the reconciler finds its hold by the AdminComment."""
    a = site.reserve("alpha")
    revoked = copy_of(site, a, "alpha")
    revoked.job_id = revoked.display_id = ""
    site.slurm["alpha"].live[""] = revoked
    summary = Reconciler(site.ledgers["alpha"], site.slurm["alpha"], grace_s=600).run()
    assert summary.voided == [a.id] and site.base.hold(a.id).returned == 600


def test_release_revoked_checks_the_hold_is_the_copys(site):
    a, b = site.reserve("alpha"), site.reserve("beta")
    site.base.bind(b.id, FED, cluster="beta")
    with pytest.raises(StateError, match="reserved on cluster alpha, not beta"):
        settlement.release_revoked(site.base, a.id, FED, "beta", "gamma")
    with pytest.raises(StateError, match="runs on cluster beta"):
        settlement.release_revoked(site.base, b.id, FED, "beta", "beta")  # the running one
    with pytest.raises(StateError, match=f"belongs to job {FED}"):
        settlement.release_revoked(site.base, b.id, "99", "beta", "alpha")
    with pytest.raises(StateError, match="reserved for user alice, not bob"):
        settlement.release_revoked(site.base, a.id, FED, "alpha", "beta", user="bob")
    assert site.base.hold(a.id).state == site.base.hold(b.id).state == "pending"
    state, view = settlement.release_revoked(site.base, a.id, FED, "alpha", "beta",
                                             user="alice", account="physics")
    assert (state, view.state, view.returned) == ("closed", "voided", 600)
    again, _ = settlement.release_revoked(site.base, a.id, FED, "alpha", "beta")
    assert again == "none" and site.base.verify_journal().ok


def test_the_revoked_op_is_privileged(site):
    from ledger.daemon.auth import Peer

    a = site.reserve("alpha")
    handlers = DirectClient(site.ledgers["beta"]).handlers
    user = Peer(1, 1001, 1001, "alice", False)
    resp = handlers.handle(user, {"op": "revoked", "hold": a.id, "job": FED,
                                  "cluster": "alpha"})
    assert resp["reason"] == "forbidden" and site.base.hold(a.id).state == "pending"
    resp = DirectClient(site.ledgers["beta"]).request("revoked", hold=a.id, job=FED,
                                                      cluster="alpha")  # runs_on: beta's
    assert resp["state"] == "closed"


def test_the_reader_reads_clusters_and_a_null_job_id():
    """Slurm's own output (the 22.05 fixture) with the federation fields as 22.05 prints a
    revoked sibling copy: the cluster and viable siblings are read, a null id is ""."""
    import json
    from pathlib import Path

    from slurm_plugin import slurmjson

    fixtures = Path(__file__).parent / "fixtures" / "slurm" / "22.05"
    doc = json.loads((fixtures / "squeue.json").read_text())
    job = doc["jobs"][0]
    job.update(job_id=None, job_state="REVOKED", cluster="beta", federation_origin="alpha",
               federation_siblings_viable="alpha,beta")
    r = slurmjson.parse_squeue(json.dumps({**doc, "jobs": [job]}))[0]
    assert (r.job_id, r.cluster, r.fed_siblings, r.state) == ("", "beta", ("alpha", "beta"),
                                                              "REVOKED")
    acct = json.loads((fixtures / "sacct.json").read_text())
    acct["jobs"][0]["cluster"] = "alpha"
    assert slurmjson.parse_sacct(json.dumps(acct))[0].cluster == "alpha"


# -- reports: where the jobs ran --------------------------------------------------------------


def test_reports_and_the_site_summary_show_the_cluster(site):
    """An account's report has its usage by cluster and names the cluster of each least
    efficient job (job ids repeat across clusters); the site summary totals every cluster."""
    from datetime import timedelta

    from ledger import db
    from ledger.charge_record import ChargeRecord
    from reports.figures import build
    from reports.period import Month
    from reports.render import render_account, render_site

    def run(cluster, job, seconds, busy):
        hold = site.reserve(cluster)
        site.base.bind(hold.id, job, cluster=cluster)
        usage = ChargeRecord.from_dict({
            "version": 3, "source": "agent", "policy": "allocated", "node": "n",
            "gpus": [{"index": 0, "gpu_type": "h100", "held_ms": seconds * 1000,
                      "busy_ms": busy * 1000, "measured": True, "rate_ppm": 1_000_000,
                      "charge": seconds}]})
        site.base.post(hold.id, seconds, usage=usage, key=f"{hold.id}:{job}:0:n",
                       job_id=job, node="n", restart=0)

    run("alpha", "7", 300, 30)
    run("beta", "7", 120, 120)
    run("beta", "8", 60, 60)
    now = site.clock() + timedelta(minutes=5)
    with db.read(site.base.engine) as conn:
        s = build(conn, Month.containing(now), now)
    r = s.account("physics")
    lines = {u.key: (u.jobs, u.charged, u.returned) for u in r.by_cluster}
    assert lines == {"alpha": (1, 300, 300), "beta": (2, 180, 1020)}
    assert r.clustered and s.clustered
    assert {u.key: u.charged for u in s.by_cluster} == {"alpha": 300, "beta": 180}
    assert r.worst_jobs[0].where == "7 on alpha"  # the idlest: 270 s idle
    text, html = render_account(r).text, render_account(r).html
    assert "USAGE BY CLUSTER" in text and "7 on alpha" in text and "Usage by cluster" in html
    summary = render_site(s)
    assert "CLUSTERS (GPU-h)" in summary.text and "beta" in summary.text
    assert ">Clusters<" in summary.html
    assert [u["key"] for u in summary.json["by_cluster"]] == ["alpha", "beta"]
