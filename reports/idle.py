"""Idle GPUs, after the fact: flag settlements, refund the site's share, one digest per owner.

``gpuledger idle send`` (a timer on the controller) reads the charges of the last days,
flags those the site policy calls idle (``ledger.idle``), and for each flagged charge, once:

1. refunds the policy's share of what its idle time cost, as a journaled refund on its hold
   (key ``idle:charge:<id>``: a re-run, or a run that died half-way, refunds nothing twice;
   capped at what the hold still has refundable);
2. records an :class:`~reports.models.IdleNotice`;
3. mails the owner — the job's user at ``[idle] user_mail``, else the account's report
   recipients — one digest of every notice not yet mailed to them. A recipient the SMTP
   server refused gets the notice in the next run's digest.

A user's address is built from the user name with the header registry
(``reports.mail.user_address``); a stored name that is not a user name, or does not make a
plain address, never gets a digest: it is reported as failed (and logged) once, its notices
are closed, and every other owner still gets theirs. A report recipient that is not a plain
address is reported as failed on every run until it is fixed; the others get the digest.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import Connection, insert, select, update

from ledger import db
from ledger.amounts import fmt_hours
from ledger.charge_record import ChargeRecord
from ledger.errors import InvalidInput, UniqueViolation
from ledger.idle import IdlePolicy, record_idle
from ledger.models import Account, Charge, Hold
from ledger.names import is_account_name

from .digest import DigestOutcome, DigestSummary
from .mail import (
    BadAddress,
    Mailer,
    SmtpSettings,
    build_message,
    sort_recipients,
    user_address,
    write_eml,
)
from .models import IdleNotice
from .render import Rendered, environment, iso, ms_hours

CH, HO, A, IN = Charge.__table__, Hold.__table__, Account.__table__, IdleNotice.__table__
log = logging.getLogger(__name__)


@dataclass
class Notice:
    charge_id: int
    account: str
    user: str | None
    job_id: str | None
    node: str | None
    held_ms: int
    idle_ms: int
    idle_max_ms: int
    idle_cost: int
    refund: int
    charged_at: datetime
    mailed_to: list[str] = field(default_factory=list)

    def describe(self, would: bool = False) -> str:
        """One line: idle and held *raw* hours (time on the GPUs, whatever their type) and
        what the idle time cost and gets back in GPU-h (the reference rate the ledger
        charges in)."""
        text = (f"Job {self.job_id or '-'} ({self.account}"
                + (f", {self.user}" if self.user else "") + (f", {self.node}" if self.node else "")
                + f"): GPUs idle {ms_hours(self.idle_ms)} of {ms_hours(self.held_ms)} raw "
                f"hours held (longest stretch {_duration(self.idle_max_ms)}), costing "
                f"{fmt_hours(self.idle_cost)} GPU-h")
        if self.refund:
            text += (f"; {fmt_hours(self.refund)} GPU-h "
                     + ("would be refunded" if would else "refunded"))
        return text + "."


@dataclass(kw_only=True)
class Flagged(Notice):
    """A settlement the policy flags, before it is recorded; ``refund`` is what the policy
    gives back before the hold's refundable cap."""

    hold_id: str
    charge_amount: int

    def owner(self, policy: IdlePolicy) -> str:
        return f"user:{self.user}" if policy.user_mail and self.user else \
            f"account:{self.account}"


def scan(conn: Connection, policy: IdlePolicy, since: datetime) -> list[Flagged]:
    """Charges since ``since`` that the policy flags and that have no notice yet."""
    if not policy.flag_after_s:
        return []
    noticed = select(IN.c.charge_id)
    q = (select(CH.c.id, CH.c.amount, CH.c.hold_id, CH.c.job_id, CH.c.node, CH.c.usage,
                CH.c.created_at, HO.c.account, HO.c.user)
         .join(HO, HO.c.id == CH.c.hold_id)
         .where(CH.c.created_at >= since, CH.c.id.not_in(noticed))
         .order_by(CH.c.id))
    out = []
    for r in conn.execute(q):
        record = ChargeRecord.from_dict(r.usage)
        if record is None or not policy.flagged(record):
            continue
        idle, cost = record_idle(record)
        out.append(Flagged(
            charge_id=r.id, charge_amount=r.amount, hold_id=r.hold_id, account=r.account,
            user=r.user, job_id=r.job_id, node=r.node, held_ms=record.measured_held_ms,
            idle_ms=idle, idle_max_ms=max(g.idle_max_ms or 0 for g in record.gpus),
            idle_cost=cost, refund=min(policy.refund(record), r.amount),
            charged_at=r.created_at))
    return out


def record(ledger, policy: IdlePolicy, flagged: list[Flagged]) -> int:
    """Refund and record each flagged charge, once: the refund (capped at what the hold
    still has refundable) and its notice commit in one transaction. Returns how many were
    new."""
    new = 0
    for f in flagged:
        def note(conn: Connection, refunded: int, f=f) -> None:
            conn.execute(insert(IN).values(
                charge_id=f.charge_id, hold_id=f.hold_id, account=f.account, user=f.user,
                job_id=f.job_id, node=f.node, owner=f.owner(policy), held_ms=f.held_ms,
                idle_ms=f.idle_ms, idle_max_ms=f.idle_max_ms, idle_cost=f.idle_cost,
                refund=refunded, charged_at=f.charged_at, created_at=ledger.clock()))

        def seen(conn: Connection, f=f) -> bool:
            return conn.execute(select(IN.c.charge_id).where(IN.c.charge_id == f.charge_id)
                                ).first() is not None

        if f.refund:
            noted: list[int] = []

            def also(conn: Connection, given: int, f=f, noted=noted) -> None:
                if not seen(conn):
                    note(conn, given)
                    noted[:] = [1]  # once, even if the transaction is retried

            try:  # a replay of the key (an earlier run did it all) returns without `also`
                ledger.refund(f.hold_id, f.refund, _reason(f), key=f"idle:charge:{f.charge_id}",
                              cap=True, also=also)
            except UniqueViolation:  # a concurrent run recorded it first
                continue
            new += len(noted)
            continue

        def run(conn: Connection, f=f) -> int:
            if seen(conn):
                return 0
            note(conn, 0)
            return 1

        try:
            new += db.run_write(ledger.engine, run)
        except UniqueViolation:
            continue
    return new


def _reason(f: Flagged) -> str:
    return (f"idle GPUs on job {f.job_id or '-'} (charge {f.charge_id}): "
            f"GPUs idle {ms_hours(f.idle_ms)} raw hours, costing {fmt_hours(f.idle_cost)} GPU-h")


# -- digests ------------------------------------------------------------------------------------


def _duration(ms: int) -> str:
    minutes = ms // 60_000
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min"


def pending(conn: Connection) -> dict[str, list[Notice]]:
    """Notices not yet mailed to every recipient, by owner."""
    out: dict[str, list[Notice]] = defaultdict(list)
    q = select(IN).where(IN.c.mailed_at.is_(None)).order_by(IN.c.owner, IN.c.charge_id)
    for r in conn.execute(q):
        out[r.owner].append(Notice(r.charge_id, r.account, r.user, r.job_id, r.node, r.held_ms,
                                   r.idle_ms, r.idle_max_ms, r.idle_cost, r.refund,
                                   r.charged_at, list(r.mailed_to or [])))
    return out


def render_digest(owner: str, notices: list[Notice], policy: IdlePolicy, now: datetime,
                  would_refund: frozenset[int] = frozenset()) -> Rendered:
    """One owner's digest; ``would_refund``: the charges a dry run has not refunded (their
    lines say "would be refunded")."""
    kind, _, name = owner.partition(":")
    idle_ms = sum(n.idle_ms for n in notices)
    cost = sum(n.idle_cost for n in notices)
    refund = sum(n.refund for n in notices)
    subject = (f"Idle GPUs: {len(notices)} job{'s' if len(notices) != 1 else ''} of "
               f"{'user' if kind == 'user' else 'account'} {name}, "
               f"{ms_hours(idle_ms)} raw GPU hours idle")
    ctx = {"owner": name, "kind": kind, "subject": subject, "generated": now, "iso": iso,
           "items": [n.describe(would=n.charge_id in would_refund) for n in notices],
           "idle": ms_hours(idle_ms), "cost": fmt_hours(cost), "refund": fmt_hours(refund),
           "refunded": refund > 0,
           "would": any(n.refund and n.charge_id in would_refund for n in notices),
           "threshold": str(policy.threshold_pct),
           "flag_after": _duration(policy.flag_after_s * 1000)}
    env = environment()
    return Rendered(f"idle-{kind}-{name}-{now:%Y%m%dT%H%M%S}", subject,
                    env.get_template("idle.html").render(ctx),
                    env.get_template("idle.txt").render(ctx),
                    {"owner": owner, "jobs": [n.__dict__ | {"charged_at": n.charged_at
                                                             .isoformat(), "mailed_to": None}
                                              for n in notices],
                     "idle_ms": idle_ms, "idle_s": idle_ms // 1000, "idle_cost": cost,
                     "refund": refund}, None)


class IdleOutcome(DigestOutcome):
    items_key = "jobs"


@dataclass
class IdleSummary(DigestSummary):
    flagged: int = 0
    refunded: int = 0

    def totals(self) -> dict:
        """A dry run refunds nothing: what it found is ``would_refund``."""
        if self.dry_run:
            return {"flagged": self.flagged, "refunded": 0, "would_refund": self.refunded}
        return {"flagged": self.flagged, "refunded": self.refunded}


def _msg_id(owner: str, ids: list[int], sender: str) -> str:
    domain = sender.rpartition("@")[2] or "gpuledger.invalid"
    h = hashlib.sha256(f"{owner}:{','.join(map(str, ids))}".encode()).hexdigest()[:16]
    return f"<gpuledger.idle.{h}@{domain}>"


def send_idle(ledger, policy: IdlePolicy, *, settings: SmtpSettings | None, days: int = 7,
              dry_run: bool = False, out: Path | None = None) -> IdleSummary:
    """Flag, refund and record new idle settlements, then mail each owner one digest.

    A dry run records and refunds nothing: it writes the digests it would send as .eml."""
    if not policy.flag_after_s:
        raise InvalidInput("idle flagging is off ([idle] flag_after_s = 0)")
    if not dry_run and settings is None:
        raise InvalidInput("no [smtp] settings")
    if dry_run and out is None:
        raise InvalidInput("a dry run needs a directory for the .eml files")
    now = ledger.clock()
    summary = IdleSummary(dry_run)
    since = now - timedelta(days=days)
    with db.read(ledger.engine) as conn:
        flagged = scan(conn, policy, since)
    summary.flagged = len(flagged)
    would_refund: frozenset[int] = frozenset()
    if dry_run:
        with db.read(ledger.engine) as conn:
            flagged = _capped(conn, flagged)
            waiting = _as_notices(flagged, policy)
            for owner, items in pending(conn).items():
                waiting[owner] = items + waiting.get(owner, [])
        summary.refunded = sum(f.refund for f in flagged)
        would_refund = frozenset(f.charge_id for f in flagged if f.refund)
    else:
        record(ledger, policy, flagged)
        new = {f.charge_id for f in flagged}
        with db.read(ledger.engine) as conn:
            waiting = pending(conn)
        summary.refunded = sum(n.refund for items in waiting.values() for n in items
                               if n.charge_id in new)
    with db.read(ledger.engine) as conn:
        report_to = {a: list(r or ()) for a, r in conn.execute(select(A.c.name, A.c.report_to))}
    sender = settings.sender if settings else "gpuledger@localhost"
    mailer = Mailer(settings) if settings and not dry_run else None
    try:
        for owner in sorted(waiting):
            notices = waiting[owner]
            kind, _, name = owner.partition(":")
            try:
                to = _recipients(policy, kind, name, report_to)
            except BadAddress as exc:  # this owner can never be mailed: say so, once
                log.warning("idle digest for %r not sent: %s", owner, exc)
                summary.outcomes.append(IdleOutcome(owner, [n.job_id or "-" for n in notices],
                                                    failed={name: f"skipped: {exc}"}))
                if not dry_run:
                    _mailed(ledger, [n.charge_id for n in notices], [], done=True)
                continue
            valid, bad = sort_recipients(to)
            first = len(summary.outcomes)
            if not to:
                summary.no_recipients.append(owner)
                if not dry_run:
                    _mailed(ledger, [n.charge_id for n in notices], [], done=True)
                continue
            groups: dict[tuple[int, ...], list[str]] = defaultdict(list)
            for rcpt in valid:
                lacking = tuple(n.charge_id for n in notices if rcpt not in n.mailed_to)
                if lacking:
                    groups[lacking].append(rcpt)
            for lacking, rcpts in groups.items():
                subset = [n for n in notices if n.charge_id in lacking]
                rendered = render_digest(owner, subset, policy, now, would_refund)
                outcome = IdleOutcome(owner, [n.job_id or "-" for n in subset])
                summary.outcomes.append(outcome)
                msg = build_message(rendered, sender=sender, recipients=rcpts,
                                    msg_id=_msg_id(owner, list(lacking), sender), when=now,
                                    headers={"X-Gpuledger-Report": f"idle {owner}"})
                if dry_run:
                    outcome.file = str(write_eml(msg, out / f"{rendered.name}.eml"))
                    outcome.sent = rcpts
                    continue
                refused = mailer.send(msg, rcpts)
                ok = [r for r in rcpts if r not in refused]
                outcome.sent, outcome.failed = ok, {r: refused[r] for r in rcpts if r in refused}
                for n in subset:
                    n.mailed_to = sorted(set(n.mailed_to) | set(ok))
                    _mailed(ledger, [n.charge_id], n.mailed_to, done=set(to) <= set(n.mailed_to))
            if bad:  # reported with the owner's first digest of this run, or alone
                if len(summary.outcomes) == first:
                    summary.outcomes.append(IdleOutcome(owner, [n.job_id or "-" for n in notices]))
                summary.outcomes[first].failed.update(bad)
    finally:
        if mailer is not None:
            mailer.close()
    return summary


def _recipients(policy: IdlePolicy, kind: str, name: str, report_to: dict[str, list[str]]
                ) -> list[str]:
    """Who gets an owner's digest: the user's address built from ``[idle] user_mail``, or
    the account's report recipients; :class:`BadAddress` when the owner's stored name can
    never be mailed (not a user or account name, or no plain address from it)."""
    if kind == "user":
        return [user_address(policy.user_mail, name).addr_spec] if policy.user_mail else []
    if not is_account_name(name):
        raise BadAddress("not a valid account name")
    return report_to.get(name, [])


def _capped(conn: Connection, flagged: list[Flagged]) -> list[Flagged]:
    """What a real run would refund: each hold's refunds capped, in charge order, at what
    it still has refundable (charged less refunded), as ``record`` caps them."""
    holds = sorted({f.hold_id for f in flagged if f.refund})
    left = {h: int(c or 0) - int(r or 0) for h, c, r in conn.execute(
        select(HO.c.id, HO.c.charged, HO.c.refunded).where(HO.c.id.in_(holds)))} if holds else {}
    out = []
    for f in flagged:
        if f.refund:
            give = max(0, min(f.refund, left.get(f.hold_id, 0)))
            left[f.hold_id] = left.get(f.hold_id, 0) - give
            f = dataclasses.replace(f, refund=give)
        out.append(f)
    return out


def _as_notices(flagged: list[Flagged], policy: IdlePolicy) -> dict[str, list[Notice]]:
    out: dict[str, list[Notice]] = defaultdict(list)
    for f in flagged:
        out[f.owner(policy)].append(f)
    return out


def _mailed(ledger, charge_ids: list[int], mailed_to: list[str], done: bool) -> None:
    if not charge_ids:
        return
    values = {"mailed_to": mailed_to or None}
    if done:
        values["mailed_at"] = ledger.clock()
    db.run_write(ledger.engine, lambda conn: conn.execute(
        update(IN).where(IN.c.charge_id.in_(charge_ids)).values(**values)))


def notices(conn: Connection, since: datetime, account: str | None = None) -> list[Notice]:
    """Recorded notices since a date (for ``gpuledger idle list``)."""
    q = select(IN).where(IN.c.charged_at >= since).order_by(IN.c.charge_id)
    if account:
        q = q.where(IN.c.account == account)
    return [Notice(r.charge_id, r.account, r.user, r.job_id, r.node, r.held_ms, r.idle_ms,
                   r.idle_max_ms, r.idle_cost, r.refund, r.charged_at,
                   list(r.mailed_to or [])) for r in conn.execute(q)]
