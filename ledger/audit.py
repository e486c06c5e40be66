"""``gpuledger verify``: the hash chain, and every table outside it, checked in one snapshot.

The walk recomputes each journal row's hash (:func:`ledger.journal.row_hash`) and
follows the links, then holds the state outside the journal against what the
journal says: wallet balances, the escrow (Σ still held by pending holds) and the
usage sink (Σ charges − Σ refunds) here; holds, tokens, charges, rates, tier
multipliers, run → hold links, post keys and the journal's own head exports column
by column in ``ledger.audit_columns``.
Rows that move a hold's or a token's money must move it between the right
wallets (a close pays the token, its minted account's pool or ``expired``; a
revoke pays the minted account's pool).

Everything is read in one consistent snapshot, so writers may keep working:
PostgreSQL REPEATABLE READ READ ONLY, MariaDB ``START TRANSACTION WITH
CONSISTENT SNAPSHOT`` at REPEATABLE READ, SQLite one deferred read transaction
(WAL: a snapshot from its first read).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from sqlalchemy import Connection, Engine, select
from sqlalchemy.exc import DBAPIError

from . import db
from .audit_columns import (
    PARSED_HOLD_KINDS,
    STREAM,
    TABLE_KINDS,
    UNKNOWN,
    Recorded,
    charge_data,
    check_charges,
    check_exports,
    check_holds,
    check_idempotency,
    check_rates,
    check_tokens,
)
from .facts import BIRTH_KINDS, CLOSE_KINDS, HoldFacts
from .journal import row_hash
from .models import GENESIS_HASH, Account, ChainHead, JournalPending, Wallet
from .pool import BURN_KIND

A, W, H, P = (m.__table__ for m in (Account, Wallet, ChainHead, JournalPending))

MAX_PROBLEMS = 100
ATTEST_KEY_KIND = "attest_key_add"  # journal event: a head-attestation public key
ATTEST_RETIRE_KIND = "attest_key_retire"
HEAD_EXPORT_KIND = "head_export"  # journal event: a signed head was exported


@contextmanager
def snapshot(engine: Engine) -> Iterator[Connection]:
    """A read-only transaction that sees one consistent state of the whole database."""
    name = engine.dialect.name
    if name == "postgresql":
        options = {"isolation_level": "REPEATABLE READ", "postgresql_readonly": True}
    elif name in ("mysql", "mariadb"):
        options = {"isolation_level": "REPEATABLE READ"}
    else:
        options = {"sqlite_begin": "DEFERRED"}
    try:
        with engine.connect().execution_options(**options) as conn, conn.begin():
            if name in ("mysql", "mariadb"):
                conn.exec_driver_sql("START TRANSACTION WITH CONSISTENT SNAPSHOT, READ ONLY")
            yield conn
    except DBAPIError as exc:
        raise db.storage_error(exc) from None


@dataclass
class VerifyResult:
    ok: bool
    rows: int
    head_seq: int
    head_hash: str
    problem: str | None = None
    bad_seq: int | str | None = None  # str: a pending row ("pending ID")
    problems: list[str] = field(default_factory=list)
    pending: int = 0  # rows committed but not chained yet when the snapshot was taken
    chain_intact: bool = True  # False: the walk stopped at a broken link or hash
    first_hash: str | None = None  # row 1's hash: names this ledger in exported heads
    hashes: dict[int, str] = field(default_factory=dict)  # seq -> hash of the watched rows
    attest_keys: dict[str, str] = field(default_factory=dict)  # kid -> public key (journal)
    attest_retired: set[str] = field(default_factory=set)
    exports: list[dict] = field(default_factory=list)  # head_export events, in order

    def fail(self, problem: str, seq: int | None = None) -> None:
        """Record a problem (the first one is ``problem``/``bad_seq``)."""
        if self.ok:
            self.ok, self.problem, self.bad_seq = False, problem, seq
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(problem)

    def to_dict(self) -> dict:
        return {"ok": self.ok, "rows": self.rows, "head_seq": self.head_seq,
                "head_hash": self.head_hash, "pending": self.pending, "bad_seq": self.bad_seq,
                "problem": self.problem, "problems": self.problems}


_NOT_AFTER_CLOSE = frozenset(("charge", "resize") + CLOSE_KINDS)
_JOURNAL = ("SELECT seq, ts, kind, debit_wallet_id, credit_wallet_id, amount, account, token_id, "
            "hold_id, reason, data, prev_hash, hash FROM journal ORDER BY seq")


class _Walk:
    """The facts gathered from the journal while its chain is checked."""

    def __init__(self, result: VerifyResult, wallets: dict[str, int], pools: dict[str, int]):
        self.r = result
        self.escrow = wallets.get("system:escrow")
        self.usage = wallets.get("system:usage")
        self.expired = wallets.get("system:expired")
        self.issuance = wallets.get("system:issuance")
        self.pools = pools  # account name -> pool wallet id
        self.pool_ids = set(pools.values())
        self.holds: dict[str, HoldFacts] = {}
        # id -> [account, wallet, face, status, scopes, expires (minted; else UNKNOWN)]
        self.tokens: dict[str, list] = {}
        # key -> (hold, amount, seq, hold's charged after it, ledger.audit_columns.charge_data)
        self.charges: dict[str, tuple] = {}
        self.recorded = Recorded(result.fail)  # hold columns, rates, tiers, links
        self.refunds = 0
        self.sums: dict[int, int] = {}  # wallet id -> Σ movements, chained and pending rows
        self.system = {wid for code, wid in wallets.items() if code.startswith("system:")}
        self.unchained: dict[int, int] = {}  # system wallet -> Σ of its pending rows

    def row(self, seq, kind, debit, credit, amount, account, token_id, hold_id, data) -> None:
        """One row's movement and what it says of its hold or token (chained or pending)."""
        r, sums = self.r, self.sums
        if amount:
            sums[debit] = sums.get(debit, 0) - amount
            sums[credit] = sums.get(credit, 0) + amount
            if hold_id is None and self.escrow in (debit, credit):
                r.fail(f"row {seq}: {kind} moves system:escrow without a hold", seq)
            if kind not in ("charge", "refund") and self.usage in (debit, credit):
                r.fail(f"row {seq}: {kind} moves system:usage (only charges and refunds may)",
                       seq)
            if debit in self.pool_ids and kind not in (BURN_KIND, "mint"):
                r.fail(f"row {seq}: {kind} pays out of an account's pool (only a burn or a "
                       "mint from the pool may)", seq)
        if hold_id is not None:
            self.hold_row(seq, kind, debit, credit, amount, account, token_id, hold_id, data)
        elif token_id is not None:
            self.token_row(seq, kind, debit, credit, amount, account, token_id, data)
        elif kind == ATTEST_KEY_KIND:
            body = json.loads(data)
            r.attest_keys.setdefault(body.get("kid"), body.get("public_key"))
        elif kind == ATTEST_RETIRE_KIND:
            r.attest_retired.add(json.loads(data).get("kid"))
        elif kind == HEAD_EXPORT_KIND:
            r.exports.append({**json.loads(data), "row": seq})
        elif kind in TABLE_KINDS:
            self.recorded.table_row(seq, kind, json.loads(data))
        elif kind == BURN_KIND and (debit != self.pools.get(account)
                                    or credit != self.issuance):
            r.fail(f"row {seq}: burn of account {account}'s pool does not pay from that pool "
                   "to system:issuance", seq)

    def token(self, seq: int, token_id: str | None, what: str) -> list | None:
        t = self.tokens.get(token_id)
        if t is None:
            self.r.fail(f"row {seq}: {what} names token {token_id}, which no mint or split "
                        "row created", seq)
        return t

    def hold_row(self, seq, kind, debit, credit, amount, account, token_id, hold_id, data):
        fail = self.r.fail
        body = json.loads(data) if kind in PARSED_HOLD_KINDS else None
        if body is not None:
            self.recorded.hold_row(seq, kind, hold_id, body)
        f = self.holds.get(hold_id)
        if kind == "reserve":
            if f is not None:
                fail(f"row {seq}: hold {hold_id} is reserved a second time", seq)
            f = self.holds[hold_id] = HoldFacts(token_id, account)
            t = self.tokens.get(token_id)
            if t is None:
                self.token(seq, token_id, f"the reserve of hold {hold_id}")
            elif account != t[0] or (amount and debit != t[1]):
                fail(f"row {seq}: hold {hold_id} is reserved for account {account} from wallet "
                     f"{debit}, but token {token_id} was minted to {t[0]} with wallet {t[1]}",
                     seq)
        elif f is None:
            if kind != "bind":
                fail(f"row {seq}: {kind} of hold {hold_id} before any reserve row", seq)
            return
        elif f.closed is not None and kind in _NOT_AFTER_CLOSE:
            fail(f"row {seq}: {kind} of hold {hold_id} after it was closed", seq)
        if amount:
            self.hold_movement(seq, f, kind, debit, credit, hold_id)
        f.add(kind, debit, credit, amount, self.escrow)
        if f.held < f.charged + f.released:
            fail(f"row {seq}: hold {hold_id} has paid out {-f.remaining} GPU-s more than it "
                 f"escrowed ({f.held})", seq)
        if kind == "charge":
            key = body.get("key")
            if key in self.charges:
                fail(f"row {seq}: charge key {key!r} is used twice", seq)
            self.charges[key] = (hold_id, amount, seq, f.charged, charge_data(body))
        elif kind == "refund":
            self.refunds += amount
            if f.refunded > f.charged:
                fail(f"row {seq}: hold {hold_id} refunds {f.refunded} GPU-s of {f.charged} "
                     "charged", seq)

    def hold_movement(self, seq, f: HoldFacts, kind, debit, credit, hold_id) -> None:
        """A hold's money runs token → escrow → usage, and back to the token, its minted
        account's pool or system:expired — nowhere else."""
        escrow, returned = self.escrow, None
        if kind == "reserve":
            ok = credit == escrow
        elif kind == "charge":
            ok = debit == escrow and credit == self.usage
        elif kind in CLOSE_KINDS:
            ok, returned = debit == escrow, credit
        elif kind == "resize":
            ok = escrow in (debit, credit)
            returned = credit if debit == escrow else None
        elif kind == "refund":
            ok, returned = debit == self.usage, credit
        else:
            ok = False
        if not ok:
            self.r.fail(f"row {seq}: {kind} of hold {hold_id} moves {debit} -> {credit}, not "
                        "through system:escrow / system:usage", seq)
        if returned is not None and returned != self.expired:
            t = self.tokens.get(f.token_id)
            if t is None or returned not in (t[1], self.pools.get(t[0])):
                self.r.fail(f"row {seq}: {kind} of hold {hold_id} pays wallet {returned}, which "
                            f"is neither token {f.token_id}, the pool of its account nor "
                            "system:expired", seq)

    def token_row(self, seq, kind, debit, credit, amount, account, token_id, data):
        fail = self.r.fail
        if kind in BIRTH_KINDS:
            if token_id in self.tokens:
                fail(f"row {seq}: token {token_id} is created a second time", seq)
            body = json.loads(data)
            if kind == "mint" and amount:
                source = self.pools.get(account) if body.get("from_pool") else self.issuance
                if debit != source:
                    fail(f"row {seq}: mint of token {token_id} is paid from wallet {debit}, not "
                         + (f"the pool of account {account}" if body.get("from_pool")
                            else "system:issuance"), seq)
            self.tokens[token_id] = [account, credit, amount, "active",
                                     body.get("scopes", UNKNOWN),
                                     body.get("expires", UNKNOWN) if kind == "mint" else UNKNOWN]
            if kind == "split":
                parent = self.token(seq, body.get("parent"), "a split")
                if parent is not None and debit != parent[1]:
                    fail(f"row {seq}: split {token_id} is paid from wallet {debit}, not from "
                         "its parent token's wallet", seq)
            return
        t = self.token(seq, token_id, kind)
        if t is None:
            return
        if kind == "transfer":
            src = self.token(seq, json.loads(data).get("from_token"), "a transfer")
            if (src is not None and debit != src[1]) or credit != t[1]:
                fail(f"row {seq}: transfer to token {token_id} moves between the wrong "
                     "wallets", seq)
        elif kind in ("revoke", "expire"):
            if t[3] != "active":
                fail(f"row {seq}: token {token_id} is closed ({kind}) when already {t[3]}", seq)
            t[3] = "revoked" if kind == "revoke" else "expired"
            to = self.pools.get(t[0]) if kind == "revoke" else self.expired
            if amount and (debit != t[1] or credit != to):
                where = f"the pool of account {t[0]}" if kind == "revoke" else "system:expired"
                fail(f"row {seq}: {kind} of token {token_id} does not pay from the token to "
                     f"{where}", seq)


def verify(conn: Connection, watch: frozenset[int] | set[int] = frozenset(),
           batch: int = 5000) -> VerifyResult:
    """Check the chain and the state outside it; every problem is named (the first in
    ``problem``). ``watch``: seqs whose stored hashes are returned (exported heads)."""
    result = VerifyResult(True, 0, 0, GENESIS_HASH)
    wallets = {code: wid for wid, code in conn.execute(select(W.c.id, W.c.code))}
    pools = {}
    for name, wid, code in conn.execute(select(A.c.name, A.c.wallet_id, W.c.code).outerjoin(
            W, W.c.id == A.c.wallet_id)):
        pools[name] = wid
        if code != f"account:{name}":
            result.fail(f"account {name}'s pool is wallet {code}, not account:{name}")
    walk = _Walk(result, wallets, pools)
    if not _chain(conn, walk, watch, batch):
        return result
    _head(conn, result)
    _pending(conn, walk)
    check_exports(conn, result)
    _balances(conn, walk)
    check_holds(conn, walk)
    check_tokens(conn, walk)
    check_charges(conn, walk)
    check_idempotency(conn, walk)
    check_rates(conn, walk)
    return result


def _chain(conn: Connection, walk: _Walk, watch, batch: int) -> bool:
    """Walk the rows in order; False when the chain itself is broken (the walk stops there)."""
    r = walk.r
    prev, expected, n = GENESIS_HASH, 1, 0
    cur = _streaming_cursor(conn)
    cur.execute(_JOURNAL)

    def broken(seq: int, problem: str) -> bool:
        cur.close()
        r.rows, r.head_seq, r.head_hash, r.chain_intact = n, expected - 1, prev, False
        r.fail(problem, seq)
        return False

    for (seq, ts, kind, debit, credit, amount, account, token_id, hold_id, reason, data,
         prev_hash, stored) in _batches(cur, batch):
        if seq != expected:
            what = "deleted" if seq > expected else "duplicated"
            return broken(seq, f"row {seq} follows row {expected - 1}: a row was {what} "
                               f"(expected seq {expected})")
        if prev_hash != prev:
            return broken(seq, f"row {seq}: previous-hash link is broken "
                               "(a row before it was inserted, deleted or reordered)")
        if row_hash(prev, seq, ts, kind, debit, credit, amount, account, token_id, hold_id,
                    reason, data) != stored:
            return broken(seq, f"row {seq}: contents do not match its hash (edited)")
        walk.row(seq, kind, debit, credit, amount, account, token_id, hold_id, data)
        if seq == 1:
            r.first_hash = stored
        if seq in watch:
            r.hashes[seq] = stored
        prev, expected, n = stored, expected + 1, n + 1
    cur.close()
    r.rows, r.head_seq, r.head_hash = n, n, prev
    return True


def _streaming_cursor(conn: Connection):
    """A driver cursor over this transaction that streams rows from the server (the whole
    journal never sits in memory): a named cursor on psycopg, SSCursor on PyMySQL."""
    raw = conn.connection.driver_connection
    name, driver = conn.dialect.name, conn.dialect.driver
    if name == "postgresql" and driver == "psycopg":
        return raw.cursor(name="gpuledger_verify")
    if driver == "pymysql":
        import pymysql.cursors
        return raw.cursor(pymysql.cursors.SSCursor)
    return raw.cursor()


def _batches(cur, size: int):
    while rows := cur.fetchmany(size):
        yield from rows


def _pending(conn: Connection, walk: _Walk) -> None:
    """Rows committed but not chained yet (server databases: ``ledger.journal``) come after
    the chain, in id order, with every check but the hash's; their movements of system
    wallets are not in those wallets' balances until they are chained."""
    rows = conn.execute(select(P.c.id, P.c.kind, P.c.debit_wallet_id, P.c.credit_wallet_id,
                               P.c.amount, P.c.account, P.c.token_id, P.c.hold_id, P.c.data)
                        .order_by(P.c.id), execution_options=STREAM)
    for pid, kind, debit, credit, amount, account, token_id, hold_id, data in rows:
        walk.r.pending += 1
        walk.row(f"pending {pid}", kind, debit, credit, amount, account, token_id, hold_id,
                 data)
        for wid, delta in ((debit, -amount), (credit, amount)):
            if amount and wid in walk.system:
                walk.unchained[wid] = walk.unchained.get(wid, 0) + delta


def _head(conn: Connection, r: VerifyResult) -> None:
    head = conn.execute(select(H.c.seq, H.c.hash).where(H.c.id == 1)).first()
    if head is None:
        r.fail("chain head row is missing")
    elif (head[0], head[1]) != (r.rows, r.head_hash):
        r.fail(f"chain head says row {head[0]} but the journal ends at row {r.rows} "
               "(rows removed from the end, or head edited)", r.rows + 1)


def _balances(conn: Connection, walk: _Walk) -> None:
    r, sums = walk.r, walk.sums
    seen = set()
    for wid, code, balance in conn.execute(select(W.c.id, W.c.code, W.c.balance)):
        seen.add(wid)
        total = sums.get(wid, 0) - walk.unchained.get(wid, 0)
        if total != balance:
            r.fail(f"wallet {code} balance {balance} differs from its journal total {total}")
    for wid in sorted(set(sums) - seen):
        r.fail(f"wallet {wid} moved {sums[wid]} GPU-s in the journal but is missing")
    if sum(sums.values()) != 0:
        r.fail("debits and credits do not balance")
    pending = sum(f.remaining for f in walk.holds.values() if f.closed is None)
    escrow = sums.get(walk.escrow, 0)
    if escrow != pending:
        r.fail(f"system:escrow holds {escrow} GPU-s but the pending holds' journal rows say "
               f"{pending} is still held")
