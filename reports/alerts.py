"""Threshold alerts as a digest: 80 / 90 / 100 % used, expiry within 30 days, and GPU time
that ran beyond what a job held (the journal's ``debt`` rows: never charged silently).

Used, for an active token, is what jobs took from it: holds still pending at
their held amount, settled holds at their charge, less refunds. What the token
was granted is that plus its balance, so splits and transfers out are not
counted as use. An account's figure sums its active tokens. Each (subject,
kind, threshold) is raised once, ever; each raised alert is mailed once per
recipient (``alert_deliveries``), so a re-run after a failure repeats nothing.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import Connection, Engine, case, func, insert, select, update

from ledger import db
from ledger.amounts import fmt_hours
from ledger.errors import InvalidInput
from ledger.liveness import Liveness, token_liveness
from ledger.journal import J
from ledger.models import Account, Hold, Token, Wallet

from .digest import DigestOutcome, DigestSummary
from .mail import Mailer, SmtpSettings, build_message, sort_recipients, write_eml
from .models import Alert, AlertDelivery
from .render import Rendered, environment, iso

A, T, W, HO = Account.__table__, Token.__table__, Wallet.__table__, Hold.__table__
AL, AD = Alert.__table__, AlertDelivery.__table__
THRESHOLDS = (80, 90, 100)
EXPIRY_DAYS = 30
DEBT_DAYS = 90  # how far back debts are looked for (each is raised once, when first seen)


@dataclass(frozen=True)
class Condition:
    account: str
    subject: str  # "account" or a token id
    kind: str  # used | expiry | debt
    threshold: int
    figures: dict

    @property
    def key(self) -> tuple[str, str, str, int]:
        return (self.account, self.subject, self.kind, self.threshold)

    def describe(self) -> str:
        f = self.figures
        if self.kind == "expiry":
            return (f"Token {self.subject} expires on {f['expires'][:10]} with "
                    f"{fmt_hours(f['remaining'])} GPU-h left.")
        if self.kind == "debt":
            hold = f" beyond its hold {f['hold']}" if f.get("hold") else " with no hold"
            return (f"Job {f['job_id'] or '?'} ran {fmt_hours(self.threshold)} GPU-h{hold}: "
                    f"not charged, recorded as owed (journal #{f['seq']}: {f['reason']}). "
                    "An admin settles it from one of the account's tokens.")
        what = (f"Account {self.account} (all active tokens)" if self.subject == "account"
                else f"Token {self.subject}")
        return (f"{what} has used {f['used'] * 100 / f['granted']:.1f} % of "
                f"{fmt_hours(f['granted'])} GPU-h (crossed {self.threshold} %); "
                f"{fmt_hours(f['remaining'])} GPU-h left.")


def evaluate(conn: Connection, now: datetime, account: str | None = None) -> list[Condition]:
    """Every threshold currently crossed (whether or not it was raised before)."""
    q = (select(T.c.id, A.c.name, W.c.balance, T.c.expires, T.c.status, T.c.not_before)
         .join(A, A.c.id == T.c.account_id).join(W, W.c.id == T.c.wallet_id)
         .where(T.c.status == "active").order_by(A.c.name, T.c.id))
    if account is not None:
        q = q.where(A.c.name == account)
    tokens = [(r.id, r.name, r.balance, r.expires) for r in conn.execute(q).all()
              if token_liveness(r, now) not in (Liveness.REVOKED, Liveness.EXPIRED)]
    used_q = (select(HO.c.token_id,
                     func.sum(case((HO.c.state == "pending", HO.c.amount), else_=HO.c.charged)),
                     func.sum(HO.c.refunded))
              .group_by(HO.c.token_id))
    if account is not None:
        used_q = used_q.where(HO.c.account == account)
    used = {t: int(u or 0) - int(r or 0) for t, u, r in conn.execute(used_q)}
    out: list[Condition] = []
    per_account: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    soon = now + timedelta(days=EXPIRY_DAYS)
    for token_id, name, balance, expires in tokens:
        u = max(0, used.get(token_id, 0))
        granted = u + balance
        per_account[name][0] += u
        per_account[name][1] += granted
        out += _crossed(name, token_id, u, granted, balance)
        if balance > 0 and expires <= soon:
            out.append(Condition(name, token_id, "expiry", EXPIRY_DAYS,
                                 {"expires": expires.isoformat(), "remaining": balance}))
    for name, (u, granted) in sorted(per_account.items()):
        out += _crossed(name, "account", u, granted, granted - u)
    return out + _debts(conn, now, account)


def _debts(conn: Connection, now: datetime, account: str | None) -> list[Condition]:
    """The journal's ``debt`` rows of the last DEBT_DAYS (older ones were raised already):
    GPU time that ran beyond its hold, or with none, each raised once."""
    since = int((now - timedelta(days=DEBT_DAYS)).timestamp() * 1_000_000)
    q = (select(J.c.seq, J.c.account, J.c.hold_id, J.c.data)
         .where(J.c.ts >= since, J.c.kind == "debt").order_by(J.c.seq))
    if account is not None:
        q = q.where(J.c.account == account)
    out = []
    for seq, name, hold_id, data in conn.execute(q):
        d = json.loads(data or "{}")
        owed = int(d.get("owed") or 0)
        if owed > 0 and name:
            out.append(Condition(name, f"debt:{seq}", "debt", owed, {
                "seq": seq, "hold": hold_id, "job_id": d.get("job_id"),
                "reason": str(d.get("reason") or "")[:200]}))
    return out


def _crossed(account: str, subject: str, used: int, granted: int, remaining: int
             ) -> list[Condition]:
    if granted <= 0:
        return []
    figures = {"used": used, "granted": granted, "remaining": remaining}
    return [Condition(account, subject, "used", t, figures)
            for t in THRESHOLDS if used * 100 >= t * granted]


@dataclass
class RaisedAlert:
    id: int | None
    condition: Condition
    created: datetime


def raise_new(engine: Engine, conditions: list[Condition], now: datetime) -> int:
    """Record conditions not raised before; returns how many were new."""
    def run(conn):
        existing = {tuple(r) for r in conn.execute(
            select(AL.c.account, AL.c.subject, AL.c.kind, AL.c.threshold))}
        new = [c for c in conditions if c.key not in existing]
        if new:
            conn.execute(insert(AL), [dict(account=c.account, subject=c.subject, kind=c.kind,
                                           threshold=c.threshold, figures=c.figures,
                                           created_at=now) for c in new])
        return len(new)

    return db.run_write(engine, run)


def open_alerts(conn: Connection, account: str | None = None) -> dict[str, list[RaisedAlert]]:
    q = select(AL).where(AL.c.closed_at.is_(None)).order_by(AL.c.account, AL.c.id)
    if account is not None:
        q = q.where(AL.c.account == account)
    out: dict[str, list[RaisedAlert]] = defaultdict(list)
    for r in conn.execute(q):
        out[r.account].append(RaisedAlert(r.id, Condition(r.account, r.subject, r.kind,
                                                          r.threshold, r.figures), r.created_at))
    return out


def digest_items(alerts: list[RaisedAlert]) -> list[RaisedAlert]:
    """The highest threshold per subject and kind (lower ones go out with it, unmentioned)."""
    best: dict[tuple[str, str], RaisedAlert] = {}
    for a in alerts:
        k = (a.condition.subject, a.condition.kind)
        if k not in best or a.condition.threshold > best[k].condition.threshold:
            best[k] = a
    return sorted(best.values(), key=lambda a: (a.condition.kind != "used",
                                                a.condition.subject != "account",
                                                -a.condition.threshold, a.condition.subject))


def render_digest(account: str, alerts: list[RaisedAlert], now: datetime) -> Rendered:
    items = digest_items(alerts)
    top = max((a.condition.threshold for a in items if a.condition.kind == "used"), default=None)
    debts = any(a.condition.kind == "debt" for a in items)
    subject = (f"GPU budget alert for {account}: "
               + (f"{top} % used" if top is not None else
                  "GPU time owed" if debts else "tokens expiring soon")
               + (f" and {len(items) - 1} more" if len(items) > 1 else ""))
    ctx = dict(account=account, items=[(a.condition, a.condition.describe()) for a in items],
               subject=subject, generated=now, iso=iso)
    env = environment()
    return Rendered(f"alerts-{account}-{now:%Y%m%dT%H%M%S}", subject,
                    env.get_template("alerts.html").render(ctx),
                    env.get_template("alerts.txt").render(ctx),
                    {"account": account, "alerts": [dict(subject=c.subject, kind=c.kind,
                                                         threshold=c.threshold, **c.figures)
                                                    for c, _ in ctx["items"]]}, None)


class AlertOutcome(DigestOutcome):
    items_key = "alerts"


@dataclass
class AlertSummary(DigestSummary):
    raised: int = 0

    def totals(self) -> dict:
        return {"raised": self.raised}


def _digest_id(account: str, alert_ids: list[int], sender: str) -> str:
    import hashlib

    domain = sender.rpartition("@")[2] or "gpuledger.invalid"
    h = hashlib.sha256(f"{account}:{','.join(map(str, alert_ids))}".encode()).hexdigest()[:16]
    return f"<gpuledger.alerts.{h}@{domain}>"


def send_alerts(ledger, *, settings: SmtpSettings | None, dry_run: bool = False,
                out: Path | None = None, account: str | None = None) -> AlertSummary:
    if not dry_run and settings is None:
        raise InvalidInput("no [smtp] settings")
    if dry_run and out is None:
        raise InvalidInput("a dry run needs a directory for the .eml files")
    now = ledger.clock()
    summary = AlertSummary(dry_run)
    with db.read(ledger.engine) as conn:
        conditions = evaluate(conn, now, account)
        recipients = {a: list(r or ()) for a, r in conn.execute(select(A.c.name, A.c.report_to))}
    if dry_run:
        with db.read(ledger.engine) as conn:
            known = {tuple(r) for r in conn.execute(
                select(AL.c.account, AL.c.subject, AL.c.kind, AL.c.threshold))}
            pending = open_alerts(conn, account)
        for c in conditions:
            if c.key not in known:
                pending[c.account].append(RaisedAlert(None, c, now))
        delivered: dict[int, set[str]] = {}
    else:
        summary.raised = raise_new(ledger.engine, conditions, now)
        with db.read(ledger.engine) as conn:
            pending = open_alerts(conn, account)
            delivered = defaultdict(set)
            ids = [a.id for alerts in pending.values() for a in alerts]
            if ids:
                for alert_id, rcpt in conn.execute(select(AD.c.alert_id, AD.c.recipient)
                                                   .where(AD.c.alert_id.in_(ids))):
                    delivered[alert_id].add(rcpt)
    sender = settings.sender if settings else "gpuledger@localhost"
    mailer = Mailer(settings) if settings and not dry_run else None
    try:
        for name in sorted(pending):
            alerts = pending[name]
            to = recipients.get(name, [])
            if not to:
                summary.no_recipients.append(name)
                if not dry_run:
                    _close(ledger.engine, [a.id for a in alerts], now)
                continue
            # a recipient that is not a plain address is skipped and reported (the alerts
            # stay open for it); the others get their digest
            valid, bad = sort_recipients(to)
            first = len(summary.outcomes)
            # recipients grouped by the alerts they still lack (usually one group)
            groups: dict[tuple[int | None, ...], list[str]] = defaultdict(list)
            for rcpt in valid:
                lacking = tuple(a.id for a in alerts if rcpt not in delivered.get(a.id, ()))
                if lacking:
                    groups[lacking].append(rcpt)
            for lacking, rcpts in groups.items():
                subset = [a for a in alerts if a.id in lacking]
                rendered = render_digest(name, subset, now)
                outcome = AlertOutcome(name, [a.condition.describe()
                                              for a in digest_items(subset)])
                summary.outcomes.append(outcome)
                msg = build_message(rendered, sender=sender, recipients=valid,
                                    msg_id=_digest_id(name, [a.id or 0 for a in subset], sender),
                                    when=now, headers={"X-Gpuledger-Report": f"alerts {name}"})
                if dry_run:
                    outcome.file = str(write_eml(msg, out / f"{rendered.name}.eml"))
                    outcome.sent = rcpts
                    continue
                refused = mailer.send(msg, rcpts)
                ok = [r for r in rcpts if r not in refused]
                _deliver(ledger.engine, [a.id for a in subset], ok, msg["Message-ID"],
                         ledger.clock())
                outcome.sent, outcome.failed = ok, {r: refused[r] for r in rcpts if r in refused}
                for a in subset:
                    delivered[a.id].update(ok)
            if bad:  # reported with the account's first digest of this run, or alone
                if len(summary.outcomes) == first:
                    summary.outcomes.append(AlertOutcome(
                        name, [a.condition.describe() for a in digest_items(alerts)]))
                summary.outcomes[first].failed.update(bad)
            if not dry_run:
                done = [a.id for a in alerts if set(to) <= delivered.get(a.id, set())]
                _close(ledger.engine, done, now)
    finally:
        if mailer is not None:
            mailer.close()
    return summary


def _deliver(engine: Engine, alert_ids: list[int], recipients: list[str], msg_id: str,
             now: datetime) -> None:
    if not recipients:
        return

    def run(conn):
        have = {tuple(r) for r in conn.execute(select(AD.c.alert_id, AD.c.recipient)
                                               .where(AD.c.alert_id.in_(alert_ids)))}
        rows = [dict(alert_id=i, recipient=r, message_id=msg_id, sent_at=now)
                for i in alert_ids for r in recipients if (i, r) not in have]
        if rows:
            conn.execute(insert(AD), rows)

    db.run_write(engine, run)


def _close(engine: Engine, alert_ids: list[int], now: datetime) -> None:
    if alert_ids:
        db.run_write(engine, lambda conn: conn.execute(
            update(AL).where(AL.c.id.in_(alert_ids)).values(closed_at=now)))
