"""What the journal says about a hold or a token: the facts that money moves by.

Columns such as ``holds.amount`` or ``tokens.account_id`` are kept for queries,
but they are editable in place; the journal is hash-chained. Operations that
move money (close, void, resize, refund, revoke) and ``verify`` both derive the
figures from journal rows through this one module.
"""

from __future__ import annotations

import hashlib

from sqlalchemy import Connection

from .models import JournalEntry
from .rawsql import Raw, Record

J = JournalEntry.__table__

CLOSE_KINDS = ("release", "void")  # rows that resolve a hold (returning what is left)
BIRTH_KINDS = ("mint", "split")  # rows that create a token (its account, wallet and face)
ESCROW_KINDS = ("reserve", "resize", "charge") + CLOSE_KINDS  # may touch system:escrow
LINK_KIND = "link"  # a run of a Slurm job paid from a hold (``ledger.joblinks``)

# Version 2 of the hold rows' data: every column of a hold that money depends on is in the
# journal. A reserve row carries ``"v": 2`` and the hold's ``cluster`` (its request carries
# the rest); a resize row, and a bind that moves the job to another QOS or partition,
# ``"cols"``: the hold's columns as the row leaves them; a charge row the sha256 of the
# charge's usage record as stored (:func:`usage_digest`). ``ledger.audit_columns`` holds the
# tables against them; rows from before version 2 are checked where their data allows.
DATA_VERSION = 2


def usage_digest(text: str) -> str:
    """sha256 of a charge's usage record, of the JSON text ``charges.usage`` stores."""
    return hashlib.sha256(text.encode()).hexdigest()


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


# A hold's or a token's rows: chained ones in seq order, then those still pending (server
# databases, ledger.journal) in id order — in one statement, so that one snapshot sees a
# row that a sealer moves from journal_pending to journal exactly once.
_HOLD_ROWS = ("SELECT kind, debit_wallet_id, credit_wallet_id, amount, token_id, account "
              "FROM journal WHERE hold_id = ? ORDER BY seq")
_HOLD_ROWS_ALL = (
    "SELECT kind, debit_wallet_id, credit_wallet_id, amount, token_id, account, 0, seq "
    "FROM journal WHERE hold_id = ? UNION ALL "
    "SELECT kind, debit_wallet_id, credit_wallet_id, amount, token_id, account, 1, id "
    "FROM journal_pending WHERE hold_id = ? ORDER BY 7, 8")
_BIRTH = "kind IN (" + ", ".join(f"'{k}'" for k in BIRTH_KINDS) + ")"
_BIRTH_ROW = (f"SELECT account, credit_wallet_id, amount FROM journal WHERE token_id = ? "
              f"AND {_BIRTH} ORDER BY seq LIMIT 1")
_BIRTH_ROW_ALL = (
    f"SELECT account, credit_wallet_id, amount, 0, seq FROM journal WHERE token_id = ? "
    f"AND {_BIRTH} UNION ALL SELECT account, credit_wallet_id, amount, 1, id "
    f"FROM journal_pending WHERE token_id = ? AND {_BIRTH} ORDER BY 4, 5 LIMIT 1")


def hold_facts(tx, hold_id: str) -> HoldFacts:
    """The hold's journal facts, including this transaction's postings not sealed yet.

    The caller holds the hold's row lock, so no other writer adds rows for it meanwhile."""
    escrow = tx.wallet_id("system:escrow")
    facts = HoldFacts()
    raw = tx.raw
    rows = [r[:6] for r in raw.all(_HOLD_ROWS_ALL, (hold_id, hold_id))] if not raw.sqlite \
        else raw.all(_HOLD_ROWS, (hold_id,))  # SQLite: nothing is ever pending
    rows += [(p.kind, p.debit, p.credit, p.amount, p.token_id, p.account)
             for p in tx.postings if p.hold_id == hold_id]
    for kind, debit, credit, amount, token_id, account in rows:
        if kind == "reserve" and facts.token_id is None:
            facts.token_id, facts.account = token_id, account
        facts.add(kind, debit, credit, amount, escrow)
    return facts


def token_birth(conn: Connection, token_id: str):
    """(account, wallet id, face) of the row that created the token, or None."""
    with Raw(conn) as raw:
        row = raw.one(_BIRTH_ROW, (token_id,)) if raw.sqlite else \
            raw.one(_BIRTH_ROW_ALL, (token_id, token_id))
    return None if row is None else Record(account=row[0], credit_wallet_id=row[1],
                                           amount=row[2])
