"""A federation of alpha and beta on one ledger (issue 23, item 2).

Every sibling runs its own job_submit.lua on the user's original request (submit_uid 0, no
AdminComment from the origin), so every sibling that accepts a federated job holds its cost;
one copy runs, the others end REVOKED (no hook runs for them). The run that starts pays, and
its PrologSlurmctld returns the revoked copies' holds at once (ledger.settlement.
release_revoked); what it cannot see yet, each cluster's reconciler returns. The federated
job id is ``origin fed id << 26 | local id`` on every sibling.
"""

from __future__ import annotations

import re
import time

import pytest
from clusterkit import reconcile, refusal, settle

from slurm_plugin import marks

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def fed(site):
    site.federate()
    try:
        yield site
    finally:
        for c in site.clusters.values():
            c.cancel_all()
        site.unfederate()


@pytest.fixture
def f(fed):
    yield fed
    for c in fed.clusters.values():
        c.cancel_all()


def fed_ids(site) -> dict[str, int]:
    out = site.first.run("scontrol", "show", "fed").stdout
    return {m.group(1): int(m.group(2))
            for m in re.finditer(r"(?:Self|Sibling):\s+(\S+?):\S+ ID:(\d+)", out)}


def runner(site, job: str, timeout: float = 60) -> str:
    """The cluster whose copy of ``job`` runs (the others are REVOKED)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for c in site.clusters.values():
            if c.state(job) in ("RUNNING", "COMPLETING", "COMPLETED"):
                return c.name
        time.sleep(0.2)
    raise AssertionError(f"job {job} ran nowhere: "
                         + str({c.name: c.state(job) for c in site.clusters.values()}))


def copy_hold(site, cluster: str, job: str) -> str | None:
    """The hold the copy of ``job`` on ``cluster`` names (its AdminComment), from its live
    record or its accounting."""
    for text in [site[cluster].admin_comment(job)] + [r["admin_comment"]
                                                       for r in site[cluster].sacct(job)]:
        mark = marks.parse(text)
        if isinstance(mark, marks.HoldMark):
            return mark.hold_id
    return None


def test_one_federated_job_makes_one_charge_and_returns_the_sibling_hold_at_once(f):
    site = f
    ids = fed_ids(site)
    assert set(ids) == {"alpha", "beta"}
    token, tid = site.mint("1")
    ledger = site.ledger()
    charged = 0
    for origin in ("alpha", "beta"):
        job = site[origin].sbatch(token, "--gres=gpu:h100:1", "-t", "5", wrap="sleep 6")
        assert int(job) >> 26 == ids[origin] and int(job) & ((1 << 26) - 1) > 0
        ran = runner(site, job)
        other = next(c for c in site.clusters if c != ran)
        held = ledger.holds(token_id=tid, job_id=job)
        assert [(h.cluster, h.state) for h in held] == [(ran, "pending")]  # bound to it
        sibling = None
        deadline = time.monotonic() + 10
        while sibling is None and time.monotonic() < deadline:
            sibling = copy_hold(site, other, job)
            time.sleep(0.2)
        assert sibling, f"no hold named by {other}'s copy of {job}"
        v = ledger.hold(sibling)
        assert site[ran].state(job) == "RUNNING"  # returned while the run goes on
        assert (v.state, v.cluster, v.job_id, v.returned) == ("voided", other, None, v.amount)
        settle(site, {ran: [job]})
        (h,) = ledger.holds(token_id=tid, job_id=job)
        assert (h.state, h.cluster) == ("posted", ran)
        assert [c["node"] for c in ledger.charges(h.id)] == [f"{ran}1"]
        assert [c["key"] for c in ledger.charges(h.id)] == [f"{h.id}:{job}:0:{ran}1"]
        charged += h.charged
        assert site[other].state(job) == "REVOKED"
    assert ledger.inspect(tid).remaining == 3600 - charged
    assert len(ledger.holds(token_id=tid)) == 4  # each job held on both siblings
    reconcile(site)
    site.first.gl("verify")


def test_a_cluster_scoped_token_is_the_same_on_every_sibling(f):
    """alpha's token: from alpha the job is held on alpha and refused by beta's job_submit
    (its copy is never made), so it runs and pays on alpha only; from beta the origin refuses
    it, with the reason."""
    site = f
    token, tid = site.mint("1", "physics", "--clusters", "alpha")
    out = site["beta"].sbatch(token, "--gres=gpu:h100:1", "-t", "5", check=False)
    assert refusal(out) == f"token {tid} is not valid on cluster beta (only alpha)"
    job = site["alpha"].sbatch(token, "--gres=gpu:h100:1", "-t", "5", wrap="sleep 1")
    assert runner(site, job) == "alpha"
    settle(site, {"alpha": [job]})
    (h,) = site.ledger().holds(token_id=tid)
    assert (h.cluster, h.job_id, h.state) == ("alpha", job, "posted") and h.charged > 0
    assert site["beta"].sacct(job) == []  # beta never took a copy
    reconcile(site)


def test_a_user_scoped_token_holds_on_the_sibling_for_that_user(f):
    """A sibling's job_submit runs with submit_uid 0, but the job is alice's: her token
    (scoped to alice) is held on both siblings; bob's token is refused for her."""
    site = f
    token, tid = site.mint("1", "physics", "--users", "alice")
    job = site["alpha"].sbatch(token, "--gres=gpu:h100:1", "-t", "5", wrap="sleep 1")
    ran = runner(site, job)
    settle(site, {ran: [job]})
    holds = site.ledger().holds(token_id=tid)
    assert sorted((h.cluster, h.user, h.state) for h in holds) == sorted(
        [(ran, "alice", "posted"), (next(c for c in ("alpha", "beta") if c != ran), "alice",
                                    "voided")])
    bobs, bid = site.mint("1", "physics", "--users", "bob")
    out = site["alpha"].sbatch(bobs, "--gres=gpu:h100:1", "-t", "5", check=False)
    assert refusal(out) == f"token {bid} is not valid for user alice (only bob)"
    reconcile(site)


def test_an_update_reprices_every_siblings_hold_and_a_cancel_returns_both(f):
    """job_modify runs on the siblings too (as SlurmUser): a new time limit re-prices each
    copy's hold; cancelled while pending, each cluster's reconciler returns its copy's."""
    site = f
    token, tid = site.mint("1")
    job = site["alpha"].sbatch(token, "--gres=gpu:h100:1", "-t", "5", "--begin=now+600")
    ledger = site.ledger()
    deadline = time.monotonic() + 15
    while len(ledger.holds(token_id=tid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    holds = ledger.holds(token_id=tid)
    assert sorted(h.cluster for h in holds) == ["alpha", "beta"]
    assert all(h.amount == 300 for h in holds)
    out = site["alpha"].run("scontrol", "update", f"jobid={job}", "TimeLimit=10")
    assert out.returncode == 0, out.stderr
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and not all(
            ledger.hold(h.id).amount == 600 for h in holds):
        time.sleep(0.2)
    assert [ledger.hold(h.id).amount for h in holds] == [600, 600]
    assert ledger.inspect(tid).remaining == 3600 - 1200
    site["alpha"].run("scancel", job)
    site["alpha"].wait(job)
    reconcile(site)
    assert all(ledger.hold(h.id).state == "voided" for h in holds)
    assert ledger.inspect(tid).remaining == 3600


def test_a_held_job_is_held_by_the_sibling_when_released(f):
    """sbatch -H goes to the origin only; the sibling's job_submit runs at release."""
    site = f
    token, tid = site.mint("1")
    job = site["alpha"].sbatch(token, "--gres=gpu:h100:1", "-t", "5", "--hold",
                               wrap="sleep 1")
    ledger = site.ledger()
    assert [h.cluster for h in ledger.holds(token_id=tid)] == ["alpha"]
    assert site["alpha"].run("scontrol", "release", job).returncode == 0
    ran = runner(site, job)
    settle(site, {ran: [job]})
    holds = ledger.holds(token_id=tid)
    paid = [h for h in holds if h.state == "posted"]
    assert len(paid) == 1 and paid[0].cluster == ran and paid[0].job_id == job
    assert all(h.state == "voided" for h in holds if h is not paid[0])
    reconcile(site)
    assert ledger.inspect(tid).remaining == 3600 - paid[0].charged
