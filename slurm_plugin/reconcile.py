"""The reconciler: close every hold whose job is over, from what Slurm remembers.

For each pending hold it finds the Slurm records sharing it (bound job id, or the
AdminComment mark for holds job_submit took before the job had an id) in the live table
(``scontrol``) and in accounting (``sacct -D``, one record per run):

* no record at all, older than the grace period → void (cancelled while pending and
  purged, or refused after job_submit accepted);
* some record still pending/running/completing → leave it (its epilogs will settle);
* otherwise charge every run × node that no epilog charged, from sacct (elapsed × the
  run's GPUs of each type, split evenly over its nodes, at each type's rate — the epilog's
  formula, ``ledger.charging.charge_gpus``), under the epilog's own keys (the run's SLUID
  where Slurm prints it, else job id and restart; a node counts as charged under either),
  then close the hold.

A run that ended before its hold was created is another hold's (a requeued job pays each
run from a hold of its own). Deferred jobs (AdminComment ``gpuledger:deferred``) that ran
with no hold bound to them — only possible when PrologSlurmctld is missing or broken, as it
requeues a deferred job it cannot get paid for — are priced from sacct and recorded as
owed under ``debt:<job>:<run>`` (``Ledger.record_debt``: their token is unknown, so nothing
can be charged), and reported as an error (exit 1) naming the job, the account and the
GPU-seconds owed.

It also expires tokens past their date. Every write goes through keys the epilog uses
too, so it is safe beside running epilogs and beside another reconciler.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from types import SimpleNamespace

from ledger import settlement
from ledger.charge_record import ChargeRecord
from ledger.charging import charge_gpus
from ledger.errors import LedgerError
from ledger.service import Ledger
from ledger.shares import GPU
from ledger.tiers import Tiers
from ledger.views import HoldView

from . import marks
from .reader import SlurmReader
from .slurm import JobRecord
from .usage import held_only


@dataclass
class Decision:
    """What the reconciler did with one pending hold: ``void`` (released whole), ``settle``
    (charged what ran, then closed), ``wait`` (no job yet, within the grace period),
    ``running`` (its job is not over) or ``error`` (nothing changed; see ``why``)."""

    hold: str
    job: str | None
    action: str
    why: str
    charged: int = 0  # GPU-seconds this pass charged it (or would, in a dry run)

    def to_dict(self) -> dict:
        return {"hold": self.hold, "job": self.job, "action": self.action, "why": self.why,
                "charged": self.charged}


@dataclass
class Summary:
    examined: int = 0
    voided: list[str] = field(default_factory=list)
    settled: list[str] = field(default_factory=list)
    charged_runs: int = 0
    charged: int = 0  # GPU-seconds charged by this pass
    skipped_active: int = 0
    waiting: int = 0  # no job yet, within the grace period
    expired_tokens: int = 0
    debts: list[dict] = field(default_factory=list)  # deferred runs that had no hold
    errors: list[str] = field(default_factory=list)
    dry_run: bool = False
    # per pending hold: what this pass did with it (Decision.action) and why
    decisions: list[Decision] = field(default_factory=list)

    def decide(self, hold: HoldView, action: str, why: str, charged: int = 0,
               job: str | None = None) -> None:
        """``job``: the Slurm job found for the hold, where the hold names none yet."""
        self.decisions.append(Decision(hold.id, hold.job_id or job, action, why, charged))

    def to_dict(self) -> dict:
        return {"examined": self.examined, "voided": self.voided, "settled": self.settled,
                "charged_runs": self.charged_runs, "charged": self.charged,
                "skipped_active": self.skipped_active, "waiting": self.waiting,
                "expired_tokens": self.expired_tokens, "debts": self.debts,
                "errors": self.errors, "dry_run": self.dry_run,
                "holds": [d.to_dict() for d in self.decisions]}


def index_by_hold(records: Iterable[JobRecord]) -> dict[str, list[JobRecord]]:
    out: dict[str, list[JobRecord]] = defaultdict(list)
    for r in records:
        mark = marks.parse(r.admin_comment)
        if isinstance(mark, marks.HoldMark):
            out[mark.hold_id].append(r)
    return out


def index_by_job(records: Iterable[JobRecord]) -> dict[str, list[JobRecord]]:
    out: dict[str, list[JobRecord]] = defaultdict(list)
    for r in records:
        out[r.job_id].append(r)
        if r.array_job_id:
            out[r.array_job_id].append(r)
    return out


def merge_runs(live: list[JobRecord], acct: list[JobRecord]) -> list[JobRecord]:
    """One record per (job id, run): accounting's runs, the live table's state for the last."""
    runs: dict[tuple[str, int], JobRecord] = {}
    for r in acct:
        runs[(r.job_id, r.restarts or 0)] = r
    for r in live:
        runs[(r.job_id, r.restarts or 0)] = r  # the controller knows better while it has it
    return list(runs.values())


def run_charge(ledger_rates: dict[str, int], hold: HoldView, run: JobRecord,
               tiers: Tiers | None = None) -> list[tuple[str, int, ChargeRecord]]:
    """(node, amount, charge record) for one finished run, from Slurm's elapsed time: each
    node's share of the run's GPUs, held for the elapsed time and unmeasured, charged by the
    one charge formula (``ledger.charging.charge_gpus``, policy ``allocated``)."""
    elapsed = max(0, run.elapsed_s or 0)
    nodes = run.nodes or []
    out = []
    # tiers: sacct's record here has no partition: the hold's candidates (the largest); the
    # run's time by time of use from its start
    start = run.start.timestamp() if run.start else None
    run_ppm, split = (tiers or Tiers()).terms(
        getattr(hold, "partition", None), getattr(hold, "qos", None), start,
        start + elapsed if start is not None else None)
    tiered = {"run_ppm": run_ppm, "split": split}
    if getattr(hold, "gres", GPU) != GPU:
        # Shares of a GPU: Slurm's accounting does not say which GPU, so each node pays the
        # hold's own price (its type, or the highest rate; its share count).
        share = (hold.per_node or hold.gpus, hold.share)
        for node in nodes:
            gpus = held_only([0], elapsed * 1000, "settled from Slurm accounting")
            record = charge_gpus(gpus, {0: hold.gpu_type}, ledger_rates, hold.rate_ppm,
                                 "allocated", shares={0: share}, **tiered, source="sacct",
                                 node=node,
                                 restart=run.restarts or 0, elapsed_s=elapsed, state=run.state)
            out.append((node, record.amount, record))
        return out
    for node in nodes:
        types: dict[int, str | None] = {}
        for gtype, count in sorted(run.gpus.items(), key=lambda kv: kv[0] or ""):
            per_node = count // len(nodes) + (1 if nodes.index(node) < count % len(nodes) else 0)
            for _ in range(per_node):
                types[len(types)] = gtype
        gpus = held_only(list(types), elapsed * 1000, "settled from Slurm accounting")
        record = charge_gpus(gpus, types, ledger_rates, hold.rate_ppm, "allocated", **tiered,
                             source="sacct", node=node, restart=run.restarts or 0,
                             elapsed_s=elapsed, state=run.state)
        out.append((node, record.amount, record))
    return out


class Reconciler:
    def __init__(self, ledger: Ledger, reader: SlurmReader, *, grace_s: int = 600,
                 lookback_days: int = 30, now: Callable[[], datetime] | None = None,
                 cluster: str | None = None):
        self.cluster = cluster if cluster is not None else ledger.cluster
        self.ledger = ledger
        self.reader = reader
        self.grace = timedelta(seconds=grace_s)
        self.lookback = timedelta(days=lookback_days)
        self.now = now or ledger.clock
        self._tiers: Tiers | None = None

    def run(self, *, dry_run: bool = False,
            progress: Callable[[Iterable], Iterable] | None = None) -> Summary:
        s = Summary(dry_run=dry_run)
        if not dry_run:
            try:
                s.expired_tokens = len(self.ledger.expire())
            except LedgerError as exc:
                s.errors.append(f"expire: {exc}")
        holds = [h for h in self.ledger.holds(state="pending")
                 if not (self.cluster and h.cluster and h.cluster != self.cluster)]
        s.examined = len(holds)
        now = self.now()
        since = min((h.created for h in holds), default=now) - timedelta(days=1)
        since = max(since, now - self.lookback)
        live = self.reader.live_jobs()
        acct = self.reader.finished_jobs(since)
        self._deferred(live, acct, s, dry_run)
        if not holds:
            return s
        by_hold_live, by_hold_acct = index_by_hold(live), index_by_hold(acct)
        by_job_live, by_job_acct = index_by_job(live), index_by_job(acct)
        rates = self.ledger.rates()
        self._tiers = self.ledger.tiers()
        for hold in (progress(holds) if progress else holds):
            try:
                self._one(hold, now, rates, s, dry_run,
                          by_hold_live.get(hold.id, []) + _for_job(by_job_live, hold),
                          by_hold_acct.get(hold.id, []) + _for_job(by_job_acct, hold))
            except LedgerError as exc:
                s.errors.append(f"{hold.id}: {exc}")
                s.decide(hold, "error", str(exc))
        return s

    def _one(self, hold: HoldView, now: datetime, rates: dict[str, int], s: Summary,
             dry_run: bool, live: list[JobRecord], acct: list[JobRecord]) -> None:
        live, acct = _unique(live), _unique(acct)
        if not live and not acct:
            age = int((now - hold.created).total_seconds())
            if now - hold.created < self.grace:
                s.waiting += 1
                s.decide(hold, "wait", f"no Slurm job yet; held {age} s, within the "
                                       f"{int(self.grace.total_seconds())} s grace period")
                return
            s.voided.append(hold.id)
            if not dry_run:
                settlement.close(self.ledger, hold.id, "no Slurm job: cancelled while pending or "
                             "refused after submission")
            s.decide(hold, "void", f"no Slurm job in the live table or in accounting after "
                                   f"{age} s: cancelled while pending, or refused after "
                                   f"submission")
            return
        active = [r for r in merge_runs(live, acct) if r.active] or [r for r in live if r.active]
        if active:
            s.skipped_active += 1
            s.decide(hold, "running", f"job {active[0].job_id} is {active[0].state}: its "
                                      f"epilogs settle it", job=active[0].job_id)
            return
        runs = merge_runs(live, acct)
        before = s.charged
        charged = settlement.charged_runs(self.ledger, hold.id)
        for run in runs:
            if not run.ran or (run.end is not None and run.end < hold.created
                               and not run.active):
                continue  # never ran, or ran before this hold existed (another hold's run)
            for node, amount, usage in run_charge(rates, hold, run, self._tiers):
                key = settlement.charge_key(hold.id, run.job_id, run.restarts or 0, node, run.sluid)
                if settlement.run_charged(charged, run.job_id, run.restarts or 0, node):
                    continue  # an epilog charged it (under either form of the key)
                s.charged_runs += 1
                if dry_run:
                    s.charged += amount
                    continue
                result = settlement.post_node(self.ledger, hold.id, run.job_id, run.restarts or 0,
                                          node, amount, usage, sluid=run.sluid)
                s.charged += result.amount
                if result.note.startswith("UNCOLLECTED"):
                    s.errors.append(f"{hold.id}: {key}: {result.note}")
        ran = hold.charged or any(r.ran for r in runs)
        (s.settled if ran else s.voided).append(hold.id)
        if not dry_run:
            settlement.close(self.ledger, hold.id,
                             "settled by the reconciler from Slurm accounting")
        states = ", ".join(sorted({f"{r.job_id} {r.state}" for r in runs}))
        job = runs[0].job_id if runs else None
        if ran:
            s.decide(hold, "settle", f"job over ({states}); charged the runs no epilog "
                                     f"charged, from Slurm accounting, and returned the rest",
                     s.charged - before, job=job)
        else:
            s.decide(hold, "void", f"job over without running ({states}); released whole",
                     job=job)


    def _deferred(self, live: list[JobRecord], acct: list[JobRecord], s: Summary,
                  dry_run: bool) -> None:
        """Record deferred runs that had no hold as owed by their account; report them."""
        first = self.ledger.journal(limit=1)
        if not first:
            return
        born = datetime.fromisoformat(first[0]["time"].replace("Z", "+00:00"))
        # A run that started before this ledger existed is not its to settle.
        runs = [r for r in merge_runs(live, acct)
                if r.admin_comment == marks.DEFERRED and r.ran and not r.active
                and r.start is not None and r.start >= born]
        holdless = sorted(j for j in {r.job_id for r in runs}
                          if not self.ledger.holds(job_id=j))  # one query a job, not a run
        if not holdless:
            return
        # Given nodes is not running: a run PrologSlurmctld refused (cancelled) or requeued
        # had its nodes for a second and started no step. Only a run with a step ran.
        stepped = self.reader.stepped_runs(holdless)
        runs = [r for r in runs if (r.job_id, r.restarts or 0) in stepped]
        unpaid = sorted({r.job_id for r in runs})
        if not unpaid:
            return
        owners = self.reader.owners(unpaid)
        rates = self.ledger.rates()
        top = SimpleNamespace(rate_ppm=max(rates.values(), default=1_000_000))
        for run in runs:
            _user, account = owners.get(run.job_id, (None, None))
            parts = run_charge(rates, top, run)
            owed = sum(amount for _n, amount, _u in parts)
            debt = {"job_id": run.job_id, "restart": run.restarts or 0, "account": account,
                    "owed": owed, "charged": 0, "unpaid": owed}
            if account and not dry_run:
                try:
                    debt.update(self.ledger.record_debt(
                        account, owed, key=f"debt:{run.job_id}:{run.restarts or 0}",
                        job_id=run.job_id, reason="deferred job ran with no hold",
                        usage={"runs": [u.to_dict() for _n, _a, u in parts]}))
                except LedgerError as exc:
                    s.errors.append(f"job {run.job_id}: {exc}")
            s.debts.append(debt)
            if debt["unpaid"]:
                s.errors.append(
                    f"job {run.job_id} (run {debt['restart']}) was accepted while the ledger "
                    f"was down and ran with no hold: {debt['unpaid']} GPU-s owed by account "
                    f"{account or '?'} (journal kind 'debt'); settle it by hand")


def _for_job(index: dict[str, list[JobRecord]], hold: HoldView) -> list[JobRecord]:
    return index.get(hold.job_id, []) if hold.job_id else []


def _unique(records: list[JobRecord]) -> list[JobRecord]:
    seen, out = set(), []
    for r in records:
        k = (r.job_id, r.restarts, r.state, r.source)
        if k not in seen:
            seen.add(k)
            out.append(r)
    return out
