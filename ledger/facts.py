"""What the journal says about a hold or a token: the facts that money moves by.

Columns such as ``holds.amount`` or ``tokens.account_id`` are kept for queries,
but they are editable in place; the journal is hash-chained. Operations that
move money (close, void, resize, refund, revoke) and ``verify`` both derive the
figures from journal rows through this one module.
"""

from __future__ import annotations

from sqlalchemy import Connection, bindparam, select

from .models import JournalEntry

J = JournalEntry.__table__

CLOSE_KINDS = ("release", "void")  # rows that resolve a hold (returning what is left)
BIRTH_KINDS = ("mint", "split")  # rows that create a token (its account, wallet and face)
ESCROW_KINDS = ("reserve", "resize", "charge") + CLOSE_KINDS  # may touch system:escrow


class HoldFacts:
    """A hold as its journal rows tell it (fed row by row, in seq order)."""

    __slots__ = ("token_id", "account", "held", "charged", "refunded", "released", "closed")

    def __init__(self, token_id: str | None = None, account: str | None = None):
        self.token_id = token_id
        self.account = account
        self.held = 0  # reserved, plus resizes up, minus resizes down
        self.charged = 0
        self.refunded = 0
        self.released = 0  # returned by the close
        self.closed: str | None = None  # the kind of the closing row

    def add(self, kind: str, debit: int | None, credit: int | None, amount: int,
            escrow: int) -> None:
        if kind == "reserve":
            self.held += amount
        elif kind == "resize":
            self.held += -amount if debit == escrow else amount
        elif kind == "charge":
            self.charged += amount
        elif kind == "refund":
            self.refunded += amount
        elif kind in CLOSE_KINDS:
            self.released += amount
            self.closed = kind

    @property
    def remaining(self) -> int:
        """Still in escrow for this hold."""
        return self.held - self.charged - self.released

    @property
    def state(self) -> str:
        if self.closed is None:
            return "pending"
        return "voided" if self.closed == "void" and not self.charged else "posted"


_BIRTH_ROW = (select(J.c.account, J.c.credit_wallet_id, J.c.amount)
              .where(J.c.token_id == bindparam("tid"), J.c.kind.in_(BIRTH_KINDS))
              .order_by(J.c.seq).limit(1))


def hold_facts(tx, hold_id: str) -> HoldFacts:
    """The hold's journal facts, including this transaction's postings not sealed yet.

    The caller holds the hold's row lock, so no other writer adds rows for it meanwhile."""
    escrow = tx.wallet_id("system:escrow")
    facts = HoldFacts()
    rows = tx.raw.all("SELECT kind, debit_wallet_id, credit_wallet_id, amount, token_id, "
                      "account FROM journal WHERE hold_id = ? ORDER BY seq", (hold_id,))
    rows += [(p.kind, p.debit, p.credit, p.amount, p.token_id, p.account)
             for p in tx.postings if p.hold_id == hold_id]
    for kind, debit, credit, amount, token_id, account in rows:
        if kind == "reserve" and facts.token_id is None:
            facts.token_id, facts.account = token_id, account
        facts.add(kind, debit, credit, amount, escrow)
    return facts


def token_birth(conn: Connection, token_id: str):
    """(account, wallet id, face) of the row that created the token, or None."""
    return conn.execute(_BIRTH_ROW, {"tid": token_id}).one_or_none()
