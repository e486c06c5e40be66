"""Budget alerts as one digest per recipient: a token's (or an account's) GPU-h used past
the thresholds (80 / 90 / 100 % by default), reminders before a token with GPU-h left
expires (30 / 14 / 7 / 0 days), and GPU time that ran beyond what a job held (the
journal's ``debt`` rows: never charged silently). ``[reports]`` in the config sets the
thresholds, the reminder days and how often a recipient may get a digest.

Used, for an active token, is what jobs took from it: holds still pending at
their held amount, settled holds at their charge, less refunds. What the token
was granted is that plus its balance, so splits and transfers out are not
counted as use. An account's figure sums its active tokens. Each (subject,
kind, threshold) is raised once, ever.

Who is told: an account's report recipients get all its alerts; the users a token is
scoped to get that token's (at ``[idle] user_mail``, the one pattern for users' mail).
Each recipient gets one mail with every alert due to them, whatever the account, at most
once per ``alert_digest_s``; each alert is mailed once per recipient
(``alert_deliveries``), so a re-run after a failure repeats nothing. The advice says what a
PI can do: splits and transfers are an administrator's, so it says whom to ask.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import Connection, Engine, case, func, insert, select, update

from ledger import db
from ledger.amounts import fmt_hours
from ledger.config import ReportsSection
from ledger.errors import InvalidInput
from ledger.journal import J
from ledger.liveness import Liveness, token_liveness
from ledger.models import Account, Hold, Token, Wallet

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
from .models import Alert, AlertDelivery
from .render import Rendered, environment, iso

A, T, W, HO = Account.__table__, Token.__table__, Wallet.__table__, Hold.__table__
AL, AD = Alert.__table__, AlertDelivery.__table__
RULES = ReportsSection()
THRESHOLDS = RULES.alert_thresholds
EXPIRY_DAYS = RULES.expiry_reminders
DEBT_DAYS = 90  # how far back debts are looked for (each is raised once, when first seen)
ADMIN = "your GPU administrator"


def owners(users) -> str:
    return ", ".join(users) if users else "any user"


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

    @property
    def users(self) -> tuple[str, ...]:
        """The users the token is scoped to (none for account-wide alerts and debts)."""
        return tuple(self.figures.get("users") or ())

    def describe(self) -> str:
        f = self.figures
        name = f"Token {self.subject} ({owners(self.users)})"
        if self.kind == "expiry":
            days = self.figures.get("days")
            when = ("today" if days == 0 else "tomorrow" if days == 1
                    else f"in {days} days" if days is not None else "soon")
            return (f"{name} expires {when}, on {f['expires'][:10]}, with "
                    f"{fmt_hours(f['remaining'])} GPU-h left: use them, or ask {ADMIN} to "
                    "transfer them to a token that lasts longer before then.")
        if self.kind == "debt":
            hold = f" beyond its hold {f['hold']}" if f.get("hold") else " with no hold"
            return (f"Job {f['job_id'] or '?'} ran {fmt_hours(self.threshold)} GPU-h{hold}: "
                    f"not charged, recorded as owed (journal #{f['seq']}: {f['reason']}). "
                    f"{ADMIN.capitalize()} settles it from one of the account's tokens.")
        what = (f"Account {self.account} (all active tokens)" if self.subject == "account"
                else name)
        text = (f"{what} has used {f['used'] * 100 / f['granted']:.1f} % of "
                f"{fmt_hours(f['granted'])} GPU-h (crossed {self.threshold} %); "
                f"{fmt_hours(f['remaining'])} GPU-h left.")
        if f["remaining"] <= 0:
            text += (" Jobs that need it are refused: ask " + ADMIN + " for GPU-hours, a new "
                     "token or a transfer from another token.")
        return text


def evaluate(conn: Connection, now: datetime, account: str | None = None,
             rules: ReportsSection = RULES) -> list[Condition]:
    """Every threshold currently crossed (whether or not it was raised before)."""
    q = (select(T.c.id, A.c.name, W.c.balance, T.c.expires, T.c.status, T.c.not_before,
                T.c.scopes)
         .join(A, A.c.id == T.c.account_id).join(W, W.c.id == T.c.wallet_id)
         .where(T.c.status == "active").order_by(A.c.name, T.c.id))
    if account is not None:
        q = q.where(A.c.name == account)
    tokens = [(r.id, r.name, r.balance, r.expires, _scoped(r.scopes))
              for r in conn.execute(q).all()
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
    for token_id, name, balance, expires, users in tokens:
        u = max(0, used.get(token_id, 0))
        granted = u + balance
        per_account[name][0] += u
        per_account[name][1] += granted
        out += _crossed(name, token_id, u, granted, balance, rules, users)
        days = (expires.date() - now.date()).days  # calendar days (UTC) to the expiry
        due = [d for d in rules.expiry_reminders if days <= d]
        if balance > 0 and due:
            out += [Condition(name, token_id, "expiry", d,
                              {"expires": expires.isoformat(), "remaining": balance,
                               "days": max(0, days), "users": list(users)}) for d in due]
    for name, (u, granted) in sorted(per_account.items()):
        out += _crossed(name, "account", u, granted, granted - u, rules)
    return out + _debts(conn, now, account)


def _scoped(scopes) -> tuple[str, ...]:
    users = scopes.get("users") if isinstance(scopes, dict) else None
    return tuple(str(u) for u in users) if isinstance(users, (list, tuple)) else ()


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


def _crossed(account: str, subject: str, used: int, granted: int, remaining: int,
             rules: ReportsSection = RULES, users: tuple[str, ...] = ()) -> list[Condition]:
    if granted <= 0:
        return []
    figures = {"used": used, "granted": granted, "remaining": remaining}
    if subject != "account":
        figures["users"] = list(users)
    return [Condition(account, subject, "used", t, figures)
            for t in sorted(rules.alert_thresholds) if used * 100 >= t * granted]


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
            conn.execute(insert(AL), [{"account": c.account, "subject": c.subject,
                                       "kind": c.kind, "threshold": c.threshold,
                                       "figures": c.figures, "created_at": now} for c in new])
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
    """Per subject and kind, the alert that matters most: the highest threshold used, the
    nearest expiry reminder (the others go out with it, unmentioned)."""
    best: dict[tuple[str, str, str], RaisedAlert] = {}
    for a in alerts:
        c = a.condition
        k = (c.account, c.subject, c.kind)
        rank = -c.threshold if c.kind == "expiry" else c.threshold
        if k not in best or rank > (-best[k].condition.threshold if c.kind == "expiry"
                                    else best[k].condition.threshold):
            best[k] = a
    return sorted(best.values(), key=lambda a: (a.condition.account, a.condition.kind != "used",
                                                a.condition.subject != "account",
                                                -a.condition.threshold, a.condition.subject))


def _headline(items: list[RaisedAlert]) -> str:
    top = max((a.condition.threshold for a in items if a.condition.kind == "used"), default=None)
    if top is not None:
        return f"{top} % used"
    if any(a.condition.kind == "debt" for a in items):
        return "GPU time owed"
    return "tokens expiring soon"


def render_digest(alerts: list[RaisedAlert], now: datetime, account: str | None = None
                  ) -> Rendered:
    """One recipient's digest: every alert due to them, grouped by account."""
    items = digest_items(alerts)
    by_account: dict[str, list[RaisedAlert]] = defaultdict(list)
    for a in items:
        by_account[a.condition.account].append(a)
    names = sorted(by_account) or ([account] if account else [])
    if len(names) == 1:
        subject = (f"GPU budget alert for {names[0]}: {_headline(items)}"
                   + (f" and {len(items) - 1} more" if len(items) > 1 else ""))
    else:
        subject = (f"GPU budget alerts for {len(names)} accounts ({', '.join(names)}): "
                   f"{_headline(items)}" + (f" and {len(items) - 1} more" if len(items) > 1
                                            else ""))
    sections = [(name, [(a.condition, a.condition.describe()) for a in by_account[name]])
                for name in names]
    ctx = {"sections": sections, "subject": subject, "generated": now, "iso": iso,
           "admin": ADMIN}
    env = environment()
    stem = names[0] if len(names) == 1 else f"{len(names)}-accounts"
    return Rendered(f"alerts-{stem}-{now:%Y%m%dT%H%M%S}", subject,
                    env.get_template("alerts.html").render(ctx),
                    env.get_template("alerts.txt").render(ctx),
                    {"accounts": names,
                     "alerts": [{"account": c.account, "subject": c.subject, "kind": c.kind,
                                 "threshold": c.threshold, **c.figures}
                                for _, lines in sections for c, _ in lines]}, None)


class AlertOutcome(DigestOutcome):
    items_key = "alerts"


@dataclass
class AlertSummary(DigestSummary):
    raised: int = 0
    waiting: list[str] = field(default_factory=list)  # had a digest within alert_digest_s

    def totals(self) -> dict:
        return {"raised": self.raised, "waiting": self.waiting}


def _digest_id(scope: str, alert_ids: list[int], sender: str) -> str:
    domain = sender.rpartition("@")[2] or "gpuledger.invalid"
    h = hashlib.sha256(f"{scope}:{','.join(map(str, alert_ids))}".encode()).hexdigest()[:16]
    return f"<gpuledger.alerts.{h}@{domain}>"


def _intended(alert: RaisedAlert, report_to: dict[str, list[str]], user_mail: str | None
              ) -> tuple[list[str], dict[str, str]]:
    """(who should get this alert, {a user whose name makes no address: why}): the
    account's report recipients, and the token's users where ``user_mail`` is set."""
    to = list(report_to.get(alert.condition.account, []))
    bad: dict[str, str] = {}
    if user_mail:
        for user in alert.condition.users:
            try:
                to.append(user_address(user_mail, user).addr_spec)
            except BadAddress as exc:
                bad[user] = f"skipped: {exc}"
    return list(dict.fromkeys(to)), bad


def _last_digest(conn: Connection) -> dict[str, datetime]:
    return {r: t for r, t in conn.execute(
        select(AD.c.recipient, func.max(AD.c.sent_at)).group_by(AD.c.recipient))}


def send_alerts(ledger, *, settings: SmtpSettings | None, dry_run: bool = False,
                out: Path | None = None, account: str | None = None,
                rules: ReportsSection = RULES, user_mail: str | None = None) -> AlertSummary:
    """Raise newly crossed thresholds, then mail each recipient one digest of every open
    alert due to them that they lack — unless they had one within ``rules.alert_digest_s``
    (then it waits for a later run). A dry run raises and records nothing."""
    if not dry_run and settings is None:
        raise InvalidInput("no [smtp] settings")
    if dry_run and out is None:
        raise InvalidInput("a dry run needs a directory for the .eml files")
    now = ledger.clock()
    summary = AlertSummary(dry_run)
    with db.read(ledger.engine) as conn:
        conditions = evaluate(conn, now, account, rules)
        report_to = {a: list(r or ()) for a, r in conn.execute(select(A.c.name, A.c.report_to))}
    if dry_run:
        with db.read(ledger.engine) as conn:
            known = {tuple(r) for r in conn.execute(
                select(AL.c.account, AL.c.subject, AL.c.kind, AL.c.threshold))}
            pending = open_alerts(conn, account)
        for c in conditions:
            if c.key not in known:
                pending[c.account].append(RaisedAlert(None, c, now))
    else:
        summary.raised = raise_new(ledger.engine, conditions, now)
        with db.read(ledger.engine) as conn:
            pending = open_alerts(conn, account)
    alerts = [a for name in sorted(pending) for a in pending[name]]
    delivered: dict[int | None, set[str]] = defaultdict(set)
    with db.read(ledger.engine) as conn:
        ids = [a.id for a in alerts if a.id is not None]
        if ids:
            for alert_id, rcpt in conn.execute(select(AD.c.alert_id, AD.c.recipient)
                                               .where(AD.c.alert_id.in_(ids))):
                delivered[alert_id].add(rcpt)
        last = _last_digest(conn) if rules.alert_digest_s else {}
    # who should get what
    intended: dict[int, list[str]] = {}
    due: dict[str, list[RaisedAlert]] = defaultdict(list)  # recipient -> alerts it lacks
    failed: dict[str, dict[str, str]] = defaultdict(dict)  # account -> {recipient: why}
    for i, a in enumerate(alerts):
        to, bad_users = _intended(a, report_to, user_mail)
        intended[i] = to
        failed[a.condition.account].update(bad_users)
        if not to and not bad_users:
            if a.condition.account not in summary.no_recipients:
                summary.no_recipients.append(a.condition.account)
            continue
        valid, bad = sort_recipients(to)
        failed[a.condition.account].update(bad)
        for rcpt in valid:
            if rcpt not in delivered.get(a.id, ()):
                due[rcpt].append(a)
    waiting = {r for r in due if r in last
               and now - last[r] < timedelta(seconds=rules.alert_digest_s)}
    summary.waiting = sorted(waiting)
    # recipients lacking the same alerts share one message
    groups: dict[tuple[int, ...], list[str]] = defaultdict(list)
    index = {id(a): i for i, a in enumerate(alerts)}
    for rcpt in sorted(due):
        if rcpt not in waiting:
            groups[tuple(index[id(a)] for a in due[rcpt])].append(rcpt)
    sender = settings.sender if settings else "gpuledger@localhost"
    mailer = Mailer(settings) if settings and not dry_run else None
    reported: set[str] = set()
    try:
        for key, rcpts in groups.items():
            subset = [alerts[i] for i in key]
            rendered = render_digest(subset, now)
            accounts = sorted({a.condition.account for a in subset})
            outcome = AlertOutcome(", ".join(accounts),
                                   [a.condition.describe() for a in digest_items(subset)])
            summary.outcomes.append(outcome)
            for name in accounts:  # bad recipients: with the first digest of their account
                if name not in reported:
                    reported.add(name)
                    outcome.failed.update(failed.pop(name, {}))
            msg = build_message(rendered, sender=sender, recipients=rcpts,
                                msg_id=_digest_id(outcome.scope, [a.id or 0 for a in subset],
                                                  sender),
                                when=now, headers={"X-Gpuledger-Report":
                                                   f"alerts {outcome.scope}"})
            if dry_run:
                outcome.file = str(write_eml(msg, out / f"{rendered.name}-{len(summary.outcomes)}"
                                                        ".eml"))
                outcome.sent = rcpts
                continue
            refused = mailer.send(msg, rcpts)
            ok = [r for r in rcpts if r not in refused]
            _deliver(ledger.engine, [a.id for a in subset], ok, msg["Message-ID"],
                     ledger.clock())
            outcome.sent = ok
            outcome.failed.update({r: refused[r] for r in rcpts if r in refused})
            for a in subset:
                delivered[a.id].update(ok)
        for name, bad in sorted(failed.items()):  # accounts with no digest this run
            if bad:
                summary.outcomes.append(AlertOutcome(name, [], failed=bad))
    finally:
        if mailer is not None:
            mailer.close()
    if not dry_run:
        done = [a.id for i, a in enumerate(alerts)
                if set(intended[i]) <= delivered.get(a.id, set())]
        _close(ledger.engine, done, now)
    return summary


def _deliver(engine: Engine, alert_ids: list[int], recipients: list[str], msg_id: str,
             now: datetime) -> None:
    if not recipients:
        return

    def run(conn):
        have = {tuple(r) for r in conn.execute(select(AD.c.alert_id, AD.c.recipient)
                                               .where(AD.c.alert_id.in_(alert_ids)))}
        rows = [{"alert_id": i, "recipient": r, "message_id": msg_id, "sent_at": now}
                for i in alert_ids for r in recipients if (i, r) not in have]
        if rows:
            conn.execute(insert(AD), rows)

    db.run_write(engine, run)


def _close(engine: Engine, alert_ids: list[int], now: datetime) -> None:
    if alert_ids:
        db.run_write(engine, lambda conn: conn.execute(
            update(AL).where(AL.c.id.in_(alert_ids)).values(closed_at=now)))
