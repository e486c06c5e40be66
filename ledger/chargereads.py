"""Read-only questions about a hold's charges (the settlement's and the receipt's reads).

Mixed into :class:`ledger.service.Ledger`: the public reads :mod:`ledger.settlement` needs
to charge each node of a run once and to close a hold when its runs are in, each one or two
indexed queries.
"""

from __future__ import annotations

from sqlalchemy import func, select

from .journal import J
from .models import Charge

CH = Charge.__table__


class ChargeReadOps:
    """Mixed into :class:`ledger.service.Ledger`."""

    def charge_amount(self, key: str) -> int | None:
        """What was charged under ``key`` (one indexed row), None when nothing was."""
        with self._read() as conn:
            return conn.execute(select(CH.c.amount).where(CH.c.key == key)).scalar()

    def charged_runs(self, hold_id: str, job_id: str | None = None
                     ) -> set[tuple[str, int, str]]:
        """(job id, restart, node) of every charge on the hold (of ``job_id`` only, if
        given), whatever key form a charge was made under."""
        q = select(CH.c.job_id, CH.c.restart, CH.c.node).where(CH.c.hold_id == hold_id)
        if job_id is not None:
            q = q.where(CH.c.job_id == job_id)
        with self._read() as conn:
            return {(j or "", r or 0, n or "") for j, r, n in conn.execute(q).all()}

    def job_progress(self, hold_id: str, job_id: str) -> tuple[set[str], int]:
        """(nodes that charged the hold for ``job_id``, how many jobs charged it): two
        queries."""
        with self._read() as conn:
            nodes = set(conn.execute(select(CH.c.node).where(CH.c.hold_id == hold_id,
                                                             CH.c.job_id == job_id)).scalars())
            jobs = conn.execute(select(func.count(func.distinct(CH.c.job_id)))
                                .where(CH.c.hold_id == hold_id)).scalar_one()
        return {n or "" for n in nodes}, int(jobs)

    def hold_journal(self, hold_id: str) -> list[dict]:
        """The journal rows that moved this hold's value (seq, kind, amount, hash), sealed
        first (on server databases the latest rows may wait to be chained)."""
        self.seal_pending()
        with self._read() as conn:
            rows = conn.execute(select(J.c.seq, J.c.kind, J.c.amount, J.c.hash)
                                .where(J.c.hold_id == hold_id).order_by(J.c.seq)).all()
        return [{"seq": r.seq, "kind": r.kind, "amount": r.amount, "hash": r.hash}
                for r in rows]
