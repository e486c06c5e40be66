"""Postings and the hash chain.

A :class:`Tx` collects the movements of one operation; :meth:`Tx.flush`
applies them to the wallets (locked in id order, balances checked), and
:meth:`Tx.seal`, the last statement before the commit, appends their journal
rows after locking the chain head. The head is thus the last lock a writer
takes and is held only for the append and the commit — every writer queues on
it. Each row's hash covers the previous row's hash and the row's own canonical
body.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime

from sqlalchemy import Connection, insert, select

from .errors import Refusal, Reason, StorageError
from .models import GENESIS_HASH, ChainHead, JournalEntry, Wallet
from .rawsql import FOR_UPDATE, Raw

W = Wallet.__table__
J = JournalEntry.__table__
H = ChainHead.__table__


# Built once: json.dumps with any non-default option builds a new encoder at every call.
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)
_BODY = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def canonical_data(data: dict | None) -> str:
    return _CANONICAL.encode(data or {})


def row_hash(prev_hash: str, seq, ts, kind, debit, credit, amount, account, token_id, hold_id,
             reason, data: str) -> str:
    """The hash of one journal row: the previous row's hash and the row's canonical body.
    The one definition: the writer (Tx.seal) and every check (verify) call it."""
    body = _BODY.encode(
        [seq, ts, kind, debit, credit, amount, account, token_id, hold_id, reason, data])
    return hashlib.sha256(f"{prev_hash}{body}".encode()).hexdigest()


def micros(dt: datetime) -> int:
    return int(dt.timestamp()) * 1_000_000 + dt.microsecond


@dataclass
class Posting:
    kind: str
    debit: int | None
    credit: int | None
    amount: int
    account: str | None = None
    token_id: str | None = None
    hold_id: str | None = None
    reason: str | None = None
    data: dict = field(default_factory=dict)


class Tx:
    """The movements of one operation inside one database transaction."""

    def __init__(self, conn: Connection, now: datetime, wallet_ids: dict[str, int] | None = None):
        self.conn = conn
        self.now = now
        self.postings: list[Posting] = []
        self._applied = 0  # postings[:_applied] have moved their wallets' balances
        self._raw: Raw | None = None
        self._deferred: dict[int, int] = {}  # system wallets' movements, applied by seal()
        # code -> id of wallets that never change id (system wallets); shared across Tx
        self._wallet_cache = {} if wallet_ids is None else wallet_ids

    @property
    def raw(self) -> Raw:
        """The transaction's driver cursor for hot-path statements (``ledger.rawsql``)."""
        if self._raw is None:
            self._raw = Raw(self.conn)
        return self._raw

    def close(self) -> None:
        if self._raw is not None:
            self._raw.close()
            self._raw = None

    def mark(self) -> tuple:
        """Where this transaction's postings stand, for :meth:`restore` (a savepoint's)."""
        return len(self.postings), self._applied, dict(self._deferred)

    def restore(self, mark: tuple) -> None:
        """Forget the postings made since ``mark`` (their savepoint was rolled back)."""
        count, applied, deferred = mark
        del self.postings[count:]
        self._applied, self._deferred = applied, deferred

    def wallet_id(self, code: str) -> int:
        if code not in self._wallet_cache:
            wid = self.conn.execute(select(W.c.id).where(W.c.code == code)).scalar()
            if wid is None:
                raise StorageError(f"ledger wallet {code} is missing (run `gpuledger db upgrade`)")
            self._wallet_cache[code] = wid
        return self._wallet_cache[code]

    def move(self, kind: str, debit: int, credit: int, amount: int, **refs) -> None:
        if amount < 0:
            raise ValueError("negative movement")
        if amount == 0:
            self.event(kind, **refs)
        else:
            self.postings.append(Posting(kind, debit, credit, amount, **refs))

    def event(self, kind: str, **refs) -> None:
        self.postings.append(Posting(kind, None, None, 0, **refs))

    def flush(self) -> None:
        """Apply the balances of the postings not applied yet (checked, in wallet-id order).

        Overdrafts surface here, inside the operation; the journal rows wait for seal(). The
        system wallets' movements (escrow, usage, …: rows every operation shares) wait for
        seal() too, so their row locks are taken last, beside the chain head's, and held
        only for the append and the commit."""
        new = self.postings[self._applied:]
        self._applied = len(self.postings)
        if not new:
            return
        system = self._system_ids()
        deltas: dict[int, int] = {}
        for p in new:
            if p.amount:
                for wid, delta in ((p.debit, -p.amount), (p.credit, p.amount)):
                    into = self._deferred if wid in system else deltas
                    into[wid] = into.get(wid, 0) + delta
        self._apply(deltas)

    def _apply(self, deltas: dict[int, int]) -> None:
        """Move balances by ``deltas``, locking each wallet in id order; a wallet not allowed
        below zero that would go there refuses the operation (the one overdraft rule)."""
        raw = self.raw
        for wid in sorted(w for w, d in deltas.items() if d):
            delta = deltas[wid]
            if raw.run("UPDATE wallets SET balance = balance + ? WHERE id = ? AND "
                       "(allow_negative OR balance + ? >= 0)", (delta, wid, delta)) == 1:
                continue
            row = raw.one("SELECT code, balance FROM wallets WHERE id = ?", (wid,))
            if row is None:
                raise StorageError(f"ledger wallet {wid} is missing")
            code, balance = row
            raise Refusal(
                Reason.INSUFFICIENT, f"{code} has {balance} GPU-s, cannot pay {-delta}",
                needed=-delta, available=balance,
            )

    def seal(self, *, wait: bool = False) -> int:
        """Apply what is left, then chain this transaction's journal rows behind the head
        — and, first, every row other writers left pending (group sealing).

        SQLite has one writer at a time, so the head is always free. On a server database
        a writer that finds the head locked by another does not queue on it (every writer
        would wait for every commit before it): it leaves its rows in ``journal_pending``
        and their system wallets' movements unapplied, and the writer holding the head, or
        the next one, chains them. ``wait``: take the head even if that means waiting, and
        chain what is pending (:meth:`LedgerBase.seal_pending`). Returns the rows chained."""
        self.flush()
        if not (self.postings or wait):
            return 0
        raw = self.raw
        server = not raw.sqlite
        head = raw.one("SELECT seq, hash FROM chain_head WHERE id = 1" +
                       (SKIP_LOCKED if server and not wait else FOR_UPDATE))
        if head is None:
            if server and not wait and raw.one("SELECT seq FROM chain_head WHERE id = 1"):
                self._leave_pending()
                return 0
            raise StorageError("ledger is not initialised (run `gpuledger init` or "
                               "`db upgrade`)")
        seq, prev = head
        rows: list[tuple] = []  # (ts, kind, debit, credit, amount, account, token, hold, …)
        taken: list[int] = []
        if server:
            for pid, *row in raw.all(f"SELECT id, {', '.join(PENDING_COLUMNS)} "
                                     "FROM journal_pending ORDER BY id"):
                taken.append(pid)
                rows.append(tuple(row))
        system = self._system_ids() if taken else set()
        for _ts, _kind, debit, credit, amount, *_ in rows:
            for wid, delta in ((debit, -amount), (credit, amount)):
                if amount and wid in system:
                    self._deferred[wid] = self._deferred.get(wid, 0) + delta
        self._apply(self._deferred)  # the system wallets, last (only the head's holder)
        self._deferred = {}
        rows += self._posting_rows()
        chained = []
        for ts, kind, debit, credit, amount, account, token_id, hold_id, reason, data in rows:
            seq += 1
            digest = row_hash(prev, seq, ts, kind, debit, credit, amount, account, token_id,
                              hold_id, reason, data)
            chained.append((seq, ts, kind, debit, credit, amount, account, token_id, hold_id,
                            reason, data, prev, digest))
            prev = digest
        # Other writers' rows name wallets this transaction has not locked, and one of those
        # writers may be waiting for a lock this one holds: InnoDB's foreign-key check would
        # take a shared lock on each such wallet, behind that writer's update, and close
        # the circle (PostgreSQL's key-share check never waits for a balance update). The
        # wallets exist — their writers moved them — and wallets are never deleted: the
        # check is left out for these statements, on MariaDB only.
        unchecked = bool(taken) and raw.conn.dialect.name in ("mysql", "mariadb")
        if unchecked:
            raw.run("SET SESSION foreign_key_checks = 0")
        try:
            raw.insert_rows("journal", JOURNAL_COLUMNS, chained)
        finally:
            if unchecked:
                raw.run("SET SESSION foreign_key_checks = 1")
        raw.delete_ids("journal_pending", taken)  # by id: only the rows read above
        if chained:
            raw.run("UPDATE chain_head SET seq = ?, hash = ? WHERE id = 1", (seq, prev))
        self.postings.clear()
        self._applied = 0
        return len(chained)

    def _leave_pending(self) -> None:
        """This transaction's rows, for the head's next holder to chain (see seal)."""
        self.raw.insert_rows("journal_pending", PENDING_COLUMNS, self._posting_rows())
        self._deferred = {}  # applied with the rows, by whoever chains them
        self.postings.clear()
        self._applied = 0

    def _posting_rows(self) -> list[tuple]:
        """This transaction's postings as journal rows, before seq and hashes: (ts, kind,
        debit, credit, amount, account, token, hold, reason, canonical data)."""
        ts = micros(self.now)
        return [(ts, p.kind, p.debit, p.credit, p.amount, p.account, p.token_id, p.hold_id,
                 p.reason, canonical_data(p.data)) for p in self.postings]

    def _system_ids(self) -> set[int]:
        """Every system wallet's id (they never change: read once per ledger)."""
        if "system:*" not in self._wallet_cache:
            for code, wid in self.raw.all("SELECT code, id FROM wallets WHERE kind = 'system'"):
                self._wallet_cache[code] = wid
            self._wallet_cache["system:*"] = -1
        return {wid for code, wid in self._wallet_cache.items()
                if code.startswith("system:") and wid >= 0}


SKIP_LOCKED = " FOR UPDATE SKIP LOCKED"  # PostgreSQL ≥ 9.5, MariaDB ≥ 10.6
JOURNAL_COLUMNS = ("seq", "ts", "kind", "debit_wallet_id", "credit_wallet_id", "amount",
                   "account", "token_id", "hold_id", "reason", "data", "prev_hash", "hash")
PENDING_COLUMNS = JOURNAL_COLUMNS[1:11]  # a row before it is chained: no seq, no hashes


def ensure_head(conn: Connection) -> None:
    if conn.execute(select(H.c.id).where(H.c.id == 1)).first() is None:
        conn.execute(insert(H).values(id=1, seq=0, hash=GENESIS_HASH))


def now_utc() -> datetime:
    return datetime.now(UTC)
