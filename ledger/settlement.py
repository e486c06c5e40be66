"""Settlement: how a run's charges and its hold's close are keyed, posted and counted.

The ledger's own rules, used by the epilog (each node), the daemon's ``finish`` (the
controller's EpilogSlurmctld) and the reconciler (from Slurm accounting). Plain values in
(job id, restart, node names, SLUID), the Ledger's public API only: nothing here knows how
Slurm is read.

Every run of a job charges each of its nodes once, under the key
``<hold>:<sluid>:<node>`` where Slurm names the run with a SLUID (25.11+: the hooks'
``SLURM_JOB_SLUID``, scontrol's ``SLUID=``, sacct's SLUID/OriginalSLUID), else
``<hold>:<job id>:<restart>:<node>`` (``post(final=False, cap=True)``); whoever charges first
wins and every later attempt — a second epilog, the reconciler reading sacct — replays or
conflicts on that key and charges nothing. Whether a node of a run has charged is read from
the charge's job id, restart and node, so a charge under either form of the key counts (a
ledger from before the SLUID, an epilog and a reconciler that saw the run differently).
A hold is closed (the rest returned, ``void`` under the key ``close:<hold>``) only when
every Slurm record sharing it is finished and has charged all its nodes: the last node of
a multi-node job, the last task of an array, the last run of a requeued job.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .charge_record import ChargeRecord
from .charging import charge_gpus
from .errors import IdempotencyConflict, NotFound, StateError
from .nodecharge import NodeCharge
from .shares import node_shares
from .views import HoldView

if TYPE_CHECKING:
    from .service import Ledger


def charge_key(hold_id: str, job_id: str, restart: int, node: str,
               sluid: str | None = None) -> str:
    """The key one node of one run charges under: the run's SLUID when Slurm gave one (a job
    id that wrapped or a controller that lost its state cannot repeat it), else job id and
    restart count."""
    if sluid:
        return f"{hold_id}:{sluid}:{node}"
    return f"{hold_id}:{job_id}:{restart}:{node}"


def run_charged(charged: Collection[tuple[str, int, str]], job_id: str, restart: int,
                node: str) -> bool:
    """Whether ``node`` of run ``restart`` of ``job_id`` charged (``charged_runs``)."""
    return (job_id, restart, node) in charged


def close_key(hold_id: str) -> str:
    return f"close:{hold_id}"


@dataclass(frozen=True)
class PostResult:
    charged: bool  # this call charged (False: the key was charged before)
    amount: int
    hold: HoldView | None
    note: str = ""
    hold_id: str | None = None  # the hold the charge went to (or would have)


def charge_node(ledger: Ledger, rec: NodeCharge, policy: str, floor) -> PostResult:
    """Price and post one node's record of one run (``ledger.nodecharge``): the hold the
    ledger links to the run, the GPUs' types (the node's gres.conf, else the hold's), a
    share's fraction, the tiers of the partition it ran in and the hours it ran, the site's
    charge policy; then ``post_node`` under the run's key. Exactly once per (job, run, node):
    a record delivered twice (a spool replay, a lost answer) charges nothing the second time.
    Never raises for a business reason: the result's note says why nothing was charged."""
    owners = list(dict.fromkeys([rec.job_id] + ([rec.array_job_id] if rec.array_job_id
                                                  else []) + list(rec.owners)))
    hold = run_hold(ledger, rec.job_id, rec.restart, owners, user=rec.user, sluid=rec.sluid)
    if hold is None:
        other = [x for o in owners for x in ledger.holds(job_id=o)]
        if other:
            return PostResult(False, 0, None, f"REFUSED: hold {other[-1].id} of job "
                              f"{rec.job_id} belongs to user {other[-1].user}, not {rec.user}")
        return PostResult(False, 0, None, f"no hold bound to job {'/'.join(owners)}")
    types = {i: t for i, t in rec.gpu_types.items() if t}
    usage = list(rec.usage)
    if not types and hold.gpu_type:
        types = {u.index: hold.gpu_type for u in usage}
    shares = node_shares(hold.gres, hold.per_node, hold.gpus, hold.share, list(rec.gpus),
                         rec.gpu_shards)
    if shares:  # a share of one GPU: only that GPU's line is charged
        usage = [u for u in usage if u.index in shares]
    # tiers: the partition it ran in (Slurm says; else the hold's candidates, the largest),
    # the QOS it was held for, each second of the run by time of use
    run_ppm, split = ledger.tiers().terms(rec.partition or hold.partition, hold.qos,
                                          rec.start, rec.end)
    charged = charge_gpus(usage, types, ledger.rates(), hold.rate_ppm, policy, floor,
                          shares=shares, run_ppm=run_ppm, split=split, source=rec.source,
                          node=rec.node, restart=rec.restart, start=rec.start, end=rec.end)
    result = post_node(ledger, hold.id, rec.job_id, rec.restart, rec.node, charged.amount,
                       charged, sluid=rec.sluid)
    return PostResult(result.charged, result.amount, result.hold, result.note, hold.id)


def post_node(ledger: Ledger, hold_id: str, job_id: str, restart: int, node: str, amount: int,
              usage: ChargeRecord, sluid: str | None = None) -> PostResult:
    """Charge one node of one run, at most once; never raises for a repeat.

    The result's amount is what the ledger charged under the node's key: less than asked
    when the hold could not take it all (the charge is capped at what is left)."""
    key = charge_key(hold_id, job_id, restart, node, sluid)
    if has_charge(ledger, key):  # one indexed row: the epilog's cost stays flat
        return PostResult(False, 0, None, "already charged")
    try:
        view = ledger.post(hold_id, amount, usage=usage, key=key, final=False, cap=True,
                           job_id=job_id, node=node, restart=restart)
    except IdempotencyConflict:
        return PostResult(False, 0, None, "already charged (other figures)")
    except StateError as exc:
        if has_charge(ledger, key):
            return PostResult(False, 0, None, "already charged")
        # The hold closed before this run reported (e.g. the reconciler settled the job from
        # sacct first): nothing can take this charge any more; say so loudly, don't retry.
        return PostResult(False, 0, None, f"UNCOLLECTED: {amount} GPU-s not charged ({exc})")
    charged = charge_amount(ledger, key) or 0
    note = "" if charged == amount else \
        (f"capped: {amount} GPU-s asked, {charged} GPU-s left on the hold; "
         f"{amount - charged} GPU-s recorded as owed (journal kind 'debt', alerted)")
    return PostResult(True, charged, view, note)


def charged_runs(ledger: Ledger, hold_id: str, job_id: str | None = None
                 ) -> set[tuple[str, int, str]]:
    """(job id, restart, node) of every charge on the hold (of ``job_id`` only, if given):
    what the reconciler checks before charging, whatever key form a charge was made under."""
    return ledger.charged_runs(hold_id, job_id)


def has_charge(ledger: Ledger, key: str) -> bool:
    """Whether a charge key was taken (one indexed row; an epilog's cost stays flat)."""
    return charge_amount(ledger, key) is not None


def charge_amount(ledger: Ledger, key: str) -> int | None:
    """What was charged under ``key`` (one indexed row), None when nothing was."""
    return ledger.charge_amount(key)


def run_hold(ledger: Ledger, job_id: str, restart: int, owners: list[str],
             user: str | None = None, sluid: str | None = None) -> HoldView | None:
    """The hold paying for run ``restart`` of ``job_id``: the ledger's link for that run
    (PrologSlurmctld wrote it; an array task's nodes know only the task's id; by the run's
    SLUID where Slurm gives one), else the hold bound to the job (``job_hold``, settled ones
    too). Never a hold of another user."""
    linked = ledger.linked_hold(job_id, restart, sluid=sluid)
    if linked is not None:
        try:
            hold = ledger.hold(linked)
        except NotFound:
            hold = None
        if hold is not None and (user is None or hold.user in (None, user)):
            return hold
    return job_hold(ledger, owners, user=user, settled=True)


def job_hold(ledger: Ledger, owners: list[str], user: str | None = None,
             settled: bool = False) -> HoldView | None:
    """The pending hold the ledger binds to this job (its own id first, then its array's).

    The ledger is the authority on which hold belongs to which job: PrologSlurmctld bound
    it from the AdminComment job_submit wrote. A hold of another user is never returned.
    ``settled``: with no pending hold, the last one bound (a late epilog then reports its
    usage as uncollected instead of dropping it silently).
    """
    fallback = None
    for owner in owners:
        holds = [h for h in ledger.holds(job_id=owner)
                 if user is None or h.user in (None, user)]
        pending = [h for h in holds if h.state == "pending"]
        if pending:
            return pending[-1]
        fallback = fallback or (holds[-1] if holds else None)
    return fallback if settled else None


def job_progress(ledger: Ledger, hold_id: str, job_id: str) -> tuple[set[str], int]:
    """(nodes that charged the hold for ``job_id``, how many jobs charged it): two queries."""
    return ledger.job_progress(hold_id, job_id)


def finish(ledger: Ledger, owners: list[str], job_id: str, nodes: list[str],
           reason: str = "job finished") -> tuple[str, HoldView | None]:
    """A run of ``job_id`` ended (EpilogSlurmctld): close its hold once it is complete.

    ``waiting``: some node of the run has not charged yet (its epilog may still run);
    ``open``: the run charged but other array tasks have not; ``closed``: the rest returned;
    ``none``: no pending hold for this job. A requeued run closes its hold too: the next run
    is paid from a hold of its own (PrologSlurmctld reserves it).
    """
    hold = job_hold(ledger, owners)
    if hold is None:
        return "none", None
    charged_nodes, jobs = job_progress(ledger, hold.id, job_id)
    if not set(nodes) <= charged_nodes:
        return "waiting", hold
    if hold.tasks > 1 and jobs < hold.tasks:
        return "open", hold
    closed = close(ledger, hold.id, reason)
    return ("closed", closed) if closed is not None else ("open", hold)


def close(ledger: Ledger, hold_id: str, reason: str) -> HoldView | None:
    try:
        return ledger.void(hold_id, key=close_key(hold_id), reason=reason)
    except StateError:
        return None  # closed meanwhile by someone else
    except NotFound:
        return None
