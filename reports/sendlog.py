"""The send log: which recipient's server accepted which report, so a re-run skips them.

A row is written right after the server answers for that message (one short
transaction each), so a run that dies half way leaves an exact record of what
was accepted. ``failed`` rows keep the server's reason and are retried.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Engine, insert, select, update

from ledger import db

from .models import ReportSend

RS = ReportSend.__table__


@dataclass(frozen=True)
class LogRow:
    kind: str
    scope: str
    period: str
    recipient: str
    status: str
    attempts: int
    error: str | None
    message_id: str | None
    updated: datetime


def accepted(engine: Engine, kind: str, period: str) -> dict[str, set[str]]:
    """{scope: recipients already accepted} for one kind of report and month."""
    with db.read(engine) as conn:
        rows = conn.execute(select(RS.c.scope, RS.c.recipient).where(
            RS.c.kind == kind, RS.c.period == period, RS.c.status == "sent")).all()
    out: dict[str, set[str]] = {}
    for scope, recipient in rows:
        out.setdefault(scope, set()).add(recipient)
    return out


def record(engine: Engine, *, kind: str, scope: str, period: str, results: dict[str, str | None],
           message_id: str, now: datetime) -> None:
    """Store the outcome per recipient: None = accepted, text = the server's refusal."""

    def run(conn):
        for recipient, error in results.items():
            status = "sent" if error is None else "failed"
            key = (RS.c.kind == kind, RS.c.scope == scope, RS.c.period == period,
                   RS.c.recipient == recipient)
            row = conn.execute(select(RS.c.id, RS.c.status).where(*key).with_for_update()
                               ).one_or_none()
            if row is None:
                conn.execute(insert(RS).values(kind=kind, scope=scope, period=period,
                                               recipient=recipient, status=status,
                                               message_id=message_id, error=error, attempts=1,
                                               updated_at=now))
            elif row.status != "sent":
                conn.execute(update(RS).where(RS.c.id == row.id).values(
                    status=status, error=error, message_id=message_id,
                    attempts=RS.c.attempts + 1, updated_at=now))

    db.run_write(engine, run)


def entries(engine: Engine, period: str, kind: str | None = None) -> list[LogRow]:
    q = select(RS).where(RS.c.period == period).order_by(RS.c.kind, RS.c.scope, RS.c.recipient)
    if kind:
        q = q.where(RS.c.kind == kind)
    with db.read(engine) as conn:
        return [LogRow(r.kind, r.scope, r.period, r.recipient, r.status, r.attempts, r.error,
                       r.message_id, r.updated_at) for r in conn.execute(q)]
