"""The report model: every figure of an account's month and of the site, built from queries.

Amounts are integer GPU-seconds at the reference rate; measured times are
milliseconds of one GPU. The statement always reconciles:

    closing = opening + minted + received − sent − expired − charged + refunded − held_change

where ``held_change`` is the change in what running jobs hold in escrow and
``expired`` includes hold remainders forfeited because their token expired.
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from types import SimpleNamespace
from typing import Any

from sqlalchemy import Connection

from ledger.amounts import SECONDS_PER_HOUR, fmt_rate
from ledger.charge_record import ChargeRecord
from ledger.idle import record_idle
from ledger.token_ops import token_status

from . import queries as q
from .period import Month
from .projection import Projection, Spendable, project

HOUR_MS = 3_600_000
EXPIRY_WINDOW = timedelta(days=30)
TOP_N = 10


@dataclass
class Statement:
    opening: int = 0
    minted: int = 0
    received: int = 0
    sent: int = 0
    expired: int = 0
    charged: int = 0
    refunded: int = 0
    held_change: int = 0
    closing: int = 0
    held_at_end: int = 0

    def reconciles(self) -> bool:
        return (self.opening + self.minted + self.received - self.sent - self.expired
                - self.charged + self.refunded - self.held_change) == self.closing


@dataclass
class Tally:
    count: int = 0
    amount: int = 0

    def add(self, amount: int, count: int = 1) -> None:
        self.count += count
        self.amount += amount


@dataclass
class Activity:
    """Token life in the month (counts and GPU-seconds)."""

    minted: Tally = field(default_factory=Tally)
    split_in: Tally = field(default_factory=Tally)  # new tokens split from another account's
    split_out: Tally = field(default_factory=Tally)  # split off into another account
    split_internal: Tally = field(default_factory=Tally)
    transfer_in: Tally = field(default_factory=Tally)
    transfer_out: Tally = field(default_factory=Tally)
    transfer_internal: Tally = field(default_factory=Tally)
    expired: Tally = field(default_factory=Tally)  # tokens that expired (incl. empty ones)
    revoked: Tally = field(default_factory=Tally)  # remainders moved to the account pool

    @property
    def split(self) -> Tally:
        return Tally(self.split_in.count + self.split_out.count + self.split_internal.count,
                     self.split_in.amount + self.split_out.amount + self.split_internal.amount)

    @property
    def transferred(self) -> Tally:
        return Tally(self.transfer_in.count + self.transfer_out.count
                     + self.transfer_internal.count,
                     self.transfer_in.amount + self.transfer_out.amount
                     + self.transfer_internal.amount)


@dataclass
class TokenLine:
    id: str
    parent: str | None
    face: int
    remaining: int
    held: int
    expires: datetime
    status: str
    expires_soon: bool
    users: tuple[str, ...] = ()  # its owners (scoped users); empty: any user of the account

    @property
    def owners(self) -> str:
        return ", ".join(self.users) if self.users else "any user"


@dataclass
class Measure:
    """Measured busy and held GPU time (ms); ``held_all_ms`` includes unmeasured GPUs."""

    busy_ms: int = 0
    held_ms: int = 0
    held_all_ms: int = 0
    unmeasured_charges: int = 0  # charges with no usage figures at all
    idle_ms: int = 0  # GPU time below the site's idle threshold (ledger.idle)
    idle_cost: int = 0  # what that idle time cost (GPU-s)

    @classmethod
    def of_usage(cls, usage: Any) -> Measure:
        """The figures of one charge's usage record: busy and held of measured GPUs only."""
        m = cls()
        record = ChargeRecord.from_dict(usage)
        if record is None:
            m.unmeasured_charges = 1
            return m
        for g in record.gpus:
            m.held_all_ms += g.held_ms
            if g.measured:
                m.held_ms += g.held_ms
                m.busy_ms += g.busy_ms
        m.idle_ms, m.idle_cost = record_idle(record)
        return m

    def add(self, other: Measure) -> None:
        self.busy_ms += other.busy_ms
        self.held_ms += other.held_ms
        self.held_all_ms += other.held_all_ms
        self.unmeasured_charges += other.unmeasured_charges
        self.idle_ms += other.idle_ms
        self.idle_cost += other.idle_cost

    @property
    def efficiency(self) -> float | None:
        return self.busy_ms / self.held_ms if self.held_ms else None

    @property
    def coverage(self) -> float | None:
        return self.held_ms / self.held_all_ms if self.held_all_ms else None


@dataclass
class UsageLine:
    key: str  # user or GPU type ("-" when the job did not say)
    jobs: int = 0
    charged: int = 0
    returned: int = 0
    refunded: int = 0
    measure: Measure = field(default_factory=Measure)


@dataclass(order=True)
class JobLine:
    idle_ms: int
    job_id: str
    hold_id: str
    user: str
    gpus: int
    gpu_type: str
    held_ms: int
    busy_ms: int

    @property
    def busy_ratio(self) -> float:
        return self.busy_ms / self.held_ms if self.held_ms else 0.0


@dataclass
class AccountReport:
    account: str
    month: Month
    as_of: datetime
    report_to: tuple[str, ...]
    statement: Statement
    activity: Activity
    tokens: list[TokenLine]
    by_user: list[UsageLine]
    by_gpu_type: list[UsageLine]
    measure: Measure
    worst_jobs: list[JobLine]
    series: list[tuple[datetime, int]]  # balance at the start of each day, then at as_of
    projection: Projection
    jobs: int
    settlements: int
    previous_charged: int
    previous_settlements: int
    had_activity: bool
    by_tier: list[UsageLine] = field(default_factory=list)  # what each tier cost

    @property
    def tiered(self) -> bool:
        """Whether any charge paid a tier other than the standard rate."""
        return any(u.key != STANDARD_TIER for u in self.by_tier)

    @property
    def returned(self) -> int:
        return sum(u.returned for u in self.by_user)

    @property
    def change(self) -> float | None:
        """Relative change of net charges from the previous month (None: nothing before)."""
        if not self.previous_charged:
            return None
        return (self.statement.charged - self.statement.refunded - self.previous_charged) \
            / self.previous_charged


@dataclass
class ExpiringToken:
    id: str
    account: str
    remaining: int
    expires: datetime
    users: tuple[str, ...] = ()

    @property
    def owners(self) -> str:
        return ", ".join(self.users) if self.users else "any user"


@dataclass
class SiteReport:
    month: Month
    as_of: datetime
    accounts: list[AccountReport]
    top_accounts: list[AccountReport]
    top_users: list[tuple[str, str, UsageLine]]  # (account, user, line)
    measure: Measure
    expiring: list[ExpiringToken]
    totals: Statement
    jobs: int
    returned: int
    previous_charged: int

    def account(self, name: str) -> AccountReport:
        for r in self.accounts:
            if r.account == name:
                return r
        raise KeyError(name)


# -- building -------------------------------------------------------------------------------


class _Acc:
    """Mutable per-account scratch while the flows are folded in."""

    def __init__(self):
        self.st = Statement()
        self.act = Activity()
        self.day_net: dict[int, int] = defaultdict(int)
        self.users: dict[str, UsageLine] = {}
        self.types: dict[str, UsageLine] = {}
        self.tiers: dict[str, UsageLine] = {}
        self.measure = Measure()
        self.worst: list[JobLine] = []  # min-heap on idle_ms, size TOP_N
        self.jobs = 0
        self.settlements = 0
        self.rows = 0

    def line(self, table: dict[str, UsageLine], key: str | None) -> UsageLine:
        k = key or "-"
        if k not in table:
            table[k] = UsageLine(k)
        return table[k]

    def offer(self, job: JobLine, n: int) -> None:
        if len(self.worst) < n:
            heapq.heappush(self.worst, job)
        elif job > self.worst[0]:
            heapq.heapreplace(self.worst, job)


def _balances(flows: list[q.Flow], d: q.Directory) -> tuple[dict[int, int], dict[str, int]]:
    """Wallet balances and escrow per token from flows."""
    bal: dict[int, int] = defaultdict(int)
    held: dict[str, int] = defaultdict(int)
    escrow = d.system["system:escrow"]
    for f in flows:
        if not f.amount:
            continue
        if f.debit in d.owner:
            bal[f.debit] -= f.amount
        if f.credit in d.owner:
            bal[f.credit] += f.amount
        if f.credit == escrow and f.token_id is not None:
            held[f.token_id] += f.amount
        elif f.debit == escrow and f.token_id is not None:
            held[f.token_id] -= f.amount
    return bal, held


def _fold_month(flows: list[q.Flow], d: q.Directory, accs: dict[str, _Acc]) -> None:
    sys_ = d.system
    issuance, escrow = sys_["system:issuance"], sys_["system:escrow"]
    usage, expired = sys_["system:usage"], sys_["system:expired"]
    for f in flows:
        src, dst = d.owner.get(f.debit), d.owner.get(f.credit)
        tok = d.tokens.get(f.token_id) if f.token_id else None
        for name in {src, dst, tok.account if tok else None} - {None}:
            accs[name].rows += f.rows
        if f.kind == "expire" and tok is not None:
            accs[tok.account].act.expired.add(f.amount, f.rows)
        elif f.kind == "revoke" and tok is not None:
            accs[tok.account].act.revoked.add(f.amount, f.rows)
        if not f.amount:
            continue
        if src is not None:
            accs[src].day_net[f.day] -= f.amount
        if dst is not None:
            accs[dst].day_net[f.day] += f.amount
        if f.debit == escrow and tok is not None:  # money leaving a hold
            a = accs[tok.account]
            if f.credit == usage:
                a.st.charged += f.amount
                a.settlements += f.rows
            elif f.credit == expired:
                a.st.expired += f.amount
            continue
        if dst is not None and src == dst:
            a = accs[dst]
            if f.kind == "split":
                a.act.split_internal.add(f.amount, f.rows)
            elif f.kind == "transfer":
                a.act.transfer_internal.add(f.amount, f.rows)
            continue
        if dst is not None:
            a = accs[dst]
            if f.debit == issuance:
                a.st.minted += f.amount
                a.act.minted.add(f.amount, f.rows)
            elif f.debit == usage:
                a.st.refunded += f.amount
            elif f.debit != escrow:
                a.st.received += f.amount
                (a.act.split_in if f.kind == "split" else a.act.transfer_in).add(f.amount, f.rows)
        if src is not None:
            a = accs[src]
            if f.credit == expired:
                a.st.expired += f.amount
            elif f.credit != escrow:
                a.st.sent += f.amount
                if f.kind == "split":
                    a.act.split_out.add(f.amount, f.rows)
                elif f.kind == "transfer":
                    a.act.transfer_out.add(f.amount, f.rows)


STANDARD_TIER = "standard x1"


def tier_costs(usage: Any, amount: int) -> dict[str, int]:
    """What each tier of one charge cost (``tier xMULTIPLIER`` → GPU-s), summing to the
    amount charged (a capped charge takes the cut from its largest tier)."""

    record = ChargeRecord.from_dict(usage)
    out: dict[str, int] = defaultdict(int)
    for g in (record.gpus if record else ()):
        for t in g.tiers or []:
            out[f"{t['tier']} x{fmt_rate(t['multiplier_ppm'])}"] += t["amount"]
    if not out:
        return {STANDARD_TIER: amount}
    rest = amount - sum(out.values())
    if rest:
        out[max(out, key=out.get)] += rest
    return dict(out)


def _fold_charges(conn: Connection, d: q.Directory, month: Month, accs: dict[str, _Acc],
                  top_n: int) -> None:
    multi = q.multi_charge_holds(conn, d, month.start, month.end)
    seen: set[str] = set()  # multi-charge holds already counted as a job
    partial: dict[str, tuple[_Acc, JobLine]] = {}
    for c in q.charges(conn, d, month.start, month.end):
        a = accs.get(c.account)
        if a is None:
            continue
        user, typ = a.line(a.users, c.user), a.line(a.types, c.gpu_type)
        for line in (user, typ):
            line.charged += c.amount
        m = Measure.of_usage(c.usage)
        for target in (user.measure, typ.measure, a.measure):
            target.add(m)
        for key, amount in tier_costs(c.usage, c.amount).items():
            tier = a.line(a.tiers, key)
            tier.charged += amount
            tier.jobs += 1
        if c.hold_id not in multi or c.hold_id not in seen:
            if c.hold_id in multi:
                seen.add(c.hold_id)
            a.jobs += 1
            user.jobs += 1
            typ.jobs += 1
        if not m.held_ms:
            continue
        if c.hold_id in multi:  # a job of several charges: rank it on its totals
            if c.hold_id in partial:
                job = partial[c.hold_id][1]
                job.held_ms += m.held_ms
                job.busy_ms += m.busy_ms
            else:
                partial[c.hold_id] = (a, JobLine(0, c.job_id or "-", c.hold_id, c.user or "-",
                                                 c.gpus, c.gpu_type or "-", m.held_ms,
                                                 m.busy_ms))
            continue
        a.offer(JobLine(m.held_ms - m.busy_ms, c.job_id or "-", c.hold_id, c.user or "-",
                        c.gpus, c.gpu_type or "-", m.held_ms, m.busy_ms), top_n)
    for a, job in partial.values():
        job.idle_ms = job.held_ms - job.busy_ms
        a.offer(job, top_n)


def build(conn: Connection, month: Month, now: datetime, account: str | None = None,
          top_n: int = TOP_N) -> SiteReport:
    """Every account's report for ``month`` (or just ``account``'s) and the site summary."""
    d = q.directory(conn, account)
    as_of = min(now, month.end)
    accs = {name: _Acc() for name in d.accounts}

    before = q.flows(conn, d, since_us=None, until_us=month.start_us, by_day=False)
    bal, held = _balances(before, d)
    month_flows = q.flows(conn, d, since_us=month.start_us, until_us=month.end_us, by_day=True)
    _fold_month(month_flows, d, accs)
    bal_end, held_end = _balances(before + month_flows, d)

    for r in q.returns(conn, d, month.start_us, month.end_us):
        a = accs.get(r.account)
        if a is None:
            continue
        for line in (a.line(a.users, r.user), a.line(a.types, r.gpu_type)):
            if r.kind == "refund":
                line.refunded += r.amount
            else:
                line.returned += r.amount
    _fold_charges(conn, d, month, accs, top_n)
    prev = month.previous()
    previous = q.charged_per_account(conn, d, prev.start_us, prev.end_us)
    prev_refunds = _refunds(conn, d, prev)

    wallets: dict[str, list[int]] = defaultdict(list)
    tokens_of: dict[str, list[q.TokenRow]] = defaultdict(list)
    for w, name in d.owner.items():
        wallets[name].append(w)
    for t in d.tokens.values():
        tokens_of[t.account].append(t)

    reports = []
    for name in sorted(d.accounts):
        a = accs[name]
        st = a.st
        st.opening = sum(bal.get(w, 0) for w in wallets[name])
        st.closing = sum(bal_end.get(w, 0) for w in wallets[name])
        held_start = sum(held.get(t.id, 0) for t in tokens_of[name])
        st.held_at_end = sum(held_end.get(t.id, 0) for t in tokens_of[name])
        st.held_change = st.held_at_end - held_start
        tokens = _token_lines(tokens_of[name], month, as_of, bal_end, held_end)
        series = _series(st.opening, a.day_net, month, as_of)
        series[-1] = (as_of, st.closing)  # the statement's figure, whatever the clock says
        pc, pn = previous.get(name, (0, 0))
        reports.append(AccountReport(
            account=name, month=month, as_of=as_of, report_to=d.accounts[name].report_to,
            statement=st, activity=a.act, tokens=tokens,
            by_user=sorted(a.users.values(), key=lambda u: (-u.charged, u.key)),
            by_gpu_type=sorted(a.types.values(), key=lambda u: (-u.charged, u.key)),
            measure=a.measure,
            worst_jobs=sorted(a.worst, reverse=True),
            series=series, projection=_projection(st, tokens, month, as_of),
            jobs=a.jobs, settlements=a.settlements,
            previous_charged=pc - prev_refunds.get(name, 0), previous_settlements=pn,
            had_activity=a.rows > 0 or a.jobs > 0,
            by_tier=sorted(a.tiers.values(), key=lambda u: (-u.charged, u.key)),
        ))
    return _site(month, as_of, reports, d, bal_end, top_n)


def _refunds(conn: Connection, d: q.Directory, month: Month) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    for r in q.returns(conn, d, month.start_us, month.end_us):
        if r.kind == "refund":
            out[r.account] += r.amount
    return out


def _token_lines(rows: list[q.TokenRow], month: Month, as_of: datetime,
                 bal_end: dict[int, int], held_end: dict[str, int]) -> list[TokenLine]:
    lines = []
    for t in sorted(rows, key=lambda t: (t.expires, t.id)):
        if t.created_at >= month.end or (t.closed_at is not None and t.closed_at < month.start):
            continue
        closed_by_end = t.closed_at is not None and t.closed_at < month.end
        state = SimpleNamespace(status=t.status if closed_by_end else "active",
                                expires=t.expires)
        remaining, held = bal_end.get(t.wallet_id, 0), held_end.get(t.id, 0)
        status = token_status(state, remaining, held, as_of)
        lines.append(TokenLine(
            id=t.id, parent=t.parent_id, face=t.face, remaining=remaining, held=held,
            expires=t.expires, status=status,
            expires_soon=status == "active" and t.expires <= as_of + EXPIRY_WINDOW,
            users=t.users))
    return lines


def _series(opening: int, day_net: dict[int, int], month: Month, as_of: datetime
            ) -> list[tuple[datetime, int]]:
    """Balance at the start of each day up to ``as_of``, then at ``as_of`` itself."""
    points, balance = [], opening
    day = 0
    while day < month.days and month.start + timedelta(days=day) < as_of:
        points.append((month.start + timedelta(days=day), balance))
        balance += day_net.get(day, 0)
        day += 1
    points.append((as_of, balance))
    return points


def _projection(st: Statement, tokens: list[TokenLine], month: Month, as_of: datetime
                ) -> Projection:
    """The month's net charge rate, spent from the active tokens each until its expiry."""
    elapsed_days = max((as_of - month.start).total_seconds() / 86400, 1 / 24)
    net = st.charged - st.refunded
    rate = int(net / elapsed_days) if net > 0 else 0
    live = [Spendable(t.id, t.users, t.remaining, t.expires) for t in tokens
            if t.status == "active" and t.remaining > 0 and t.expires > as_of]
    return project(live, rate, as_of, unspendable=st.closing - sum(x.remaining for x in live))


def _site(month: Month, as_of: datetime, reports: list[AccountReport], d: q.Directory,
          bal_end: dict[int, int], top_n: int) -> SiteReport:
    totals = Statement()
    measure = Measure()
    for r in reports:
        for f in ("opening", "minted", "received", "sent", "expired", "charged", "refunded",
                  "held_change", "closing", "held_at_end"):
            setattr(totals, f, getattr(totals, f) + getattr(r.statement, f))
        measure.add(r.measure)
    users = [(r.account, u.key, u) for r in reports for u in r.by_user if u.charged]
    users.sort(key=lambda x: (-x[2].charged, x[0], x[1]))
    active = sorted((r for r in reports if r.statement.charged),
                    key=lambda r: (-r.statement.charged, r.account))
    expiring = []
    for t in d.tokens.values():
        closed = t.closed_at is not None and t.closed_at < month.end
        left = bal_end.get(t.wallet_id, 0)
        if not closed and left > 0 and as_of < t.expires <= as_of + EXPIRY_WINDOW:
            expiring.append(ExpiringToken(t.id, t.account, left, t.expires, t.users))
    expiring.sort(key=lambda e: (e.expires, e.account, e.id))
    return SiteReport(
        month=month, as_of=as_of, accounts=reports, top_accounts=active[:top_n],
        top_users=users[:top_n], measure=measure, expiring=expiring, totals=totals,
        jobs=sum(r.jobs for r in reports), returned=sum(r.returned for r in reports),
        previous_charged=sum(r.previous_charged for r in reports),
    )


def hours_of_ms(ms: int) -> float:
    return ms / HOUR_MS


def seconds_to_hours(amount: int) -> float:
    return amount / SECONDS_PER_HOUR
