"""The report's reads: a few set-wise aggregates over the journal, holds and charges.

Everything for all accounts is read in one pass per question (never one query
per account), so a site with a thousand accounts costs about what one does.
Balances come from the journal: an account's balance at time t is the sum of
the movements before t into and out of its pool wallet and its tokens'
wallets. Money stays in integer GPU-seconds here; formatting happens later.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import BigInteger, Connection, false, func, literal_column, or_, select

from ledger.errors import NotFound
from ledger.models import Account, Charge, Hold, JournalEntry, Token, Wallet

from .period import DAY_US

A, T, W, J, HO, CH = (m.__table__ for m in (Account, Token, Wallet, JournalEntry, Hold, Charge))
RETURN_KINDS = ("release", "void", "resize", "refund")
STREAM_BATCH = 20_000


@dataclass(frozen=True)
class AccountRow:
    id: int
    name: str
    wallet_id: int
    report_to: tuple[str, ...]
    created_at: datetime


@dataclass(frozen=True)
class TokenRow:
    id: str
    account: str
    wallet_id: int
    parent_id: str | None
    face: int
    not_before: datetime
    expires: datetime
    status: str
    closed_at: datetime | None
    created_at: datetime
    users: tuple[str, ...] = ()  # the users the token is scoped to (empty: any of the account)


def _scoped_users(scopes) -> tuple[str, ...]:
    users = (scopes or {}).get("users") if isinstance(scopes, dict) else None
    return tuple(str(u) for u in users) if isinstance(users, (list, tuple)) else ()


@dataclass
class Directory:
    """Who owns which wallet: accounts, their tokens, the system wallets."""

    accounts: dict[str, AccountRow]
    tokens: dict[str, TokenRow]
    system: dict[str, int]
    owner: dict[int, str] = field(default_factory=dict)  # wallet id -> account name
    only: str | None = None  # set when the directory is restricted to one account

    def __post_init__(self):
        for a in self.accounts.values():
            self.owner[a.wallet_id] = a.name
        for t in self.tokens.values():
            self.owner[t.wallet_id] = t.account

    def wallet_ids(self) -> list[int]:
        return sorted(self.owner)


def directory(conn: Connection, account: str | None = None) -> Directory:
    qa = select(A.c.id, A.c.name, A.c.wallet_id, A.c.report_to, A.c.created_at)
    qt = (select(T.c.id, A.c.name, T.c.wallet_id, T.c.parent_id, T.c.face, T.c.not_before,
                 T.c.expires, T.c.status, T.c.closed_at, T.c.created_at, T.c.scopes)
          .join(A, A.c.id == T.c.account_id))
    if account is not None:
        qa = qa.where(A.c.name == account)
        qt = qt.where(A.c.name == account)
    accounts = {r.name: AccountRow(r.id, r.name, r.wallet_id, tuple(r.report_to or ()),
                                   r.created_at) for r in conn.execute(qa)}
    if account is not None and account not in accounts:
        raise NotFound(f"unknown account {account!r}")
    tokens = {r[0]: TokenRow(*r[:-1], users=_scoped_users(r[-1])) for r in conn.execute(qt)}
    system = dict(conn.execute(select(W.c.code, W.c.id).where(W.c.kind == "system")).all())
    return Directory(accounts, tokens, system, only=account)


def _restrict(q, d: Directory):
    """Journal rows that touch the directory's wallets or name its tokens."""
    if d.only is None:
        return q
    wallets = d.wallet_ids()
    conds = [J.c.debit_wallet_id.in_(wallets), J.c.credit_wallet_id.in_(wallets)]
    if d.tokens:
        conds.append(J.c.token_id.in_(sorted(d.tokens)))
    return q.where(or_(*conds))


@dataclass(frozen=True)
class Flow:
    """Movements of one kind between two wallets (one day, or all before a time)."""

    day: int | None
    kind: str
    debit: int | None
    credit: int | None
    token_id: str | None
    amount: int
    rows: int


def flows_query(d: Directory, since_us: int | None, until_us: int, *, by_day: bool):
    """Journal totals grouped by (day,) kind, debit, credit, token — movements and events."""
    # constants inlined so SELECT and GROUP BY render the very same expression on every backend
    day = ((J.c.ts - literal_column(str(int(since_us or 0)), BigInteger)) // literal_column(str(DAY_US), BigInteger)
           ) if by_day else None
    cols = [J.c.kind, J.c.debit_wallet_id, J.c.credit_wallet_id, J.c.token_id]
    if day is not None:
        cols.insert(0, day)
    q = select(*cols, func.sum(J.c.amount), func.count()).where(J.c.ts < until_us)
    if since_us is not None:
        q = q.where(J.c.ts >= since_us)
    return _restrict(q, d).group_by(*cols)


def flows(conn: Connection, d: Directory, *, since_us: int | None, until_us: int,
          by_day: bool) -> list[Flow]:
    out = []
    for r in conn.execute(flows_query(d, since_us, until_us, by_day=by_day)):
        if by_day:
            out.append(Flow(int(r[0]), r[1], r[2], r[3], r[4], int(r[5] or 0), int(r[6])))
        else:
            out.append(Flow(None, r[0], r[1], r[2], r[3], int(r[4] or 0), int(r[5])))
    return out


@dataclass(frozen=True)
class ReturnLine:
    account: str
    user: str | None
    gpu_type: str | None
    kind: str
    amount: int


def returns_query(d: Directory, since_us: int, until_us: int):
    """Held-but-not-charged amounts leaving escrow, and refunds, per account, user, GPU type."""
    q = (select(HO.c.account, HO.c.user, HO.c.gpu_type, J.c.kind, func.sum(J.c.amount))
         .select_from(J.join(HO, HO.c.id == J.c.hold_id))
         .where(J.c.ts >= since_us, J.c.ts < until_us, J.c.kind.in_(RETURN_KINDS),
                J.c.amount > 0,
                J.c.debit_wallet_id.in_([d.system["system:escrow"], d.system["system:usage"]]))
         .group_by(HO.c.account, HO.c.user, HO.c.gpu_type, J.c.kind))
    if d.only is not None:
        q = q.where(HO.c.account == d.only)
    return q


def returns(conn: Connection, d: Directory, since_us: int, until_us: int) -> list[ReturnLine]:
    return [ReturnLine(r[0], r[1], r[2], r[3], int(r[4]))
            for r in conn.execute(returns_query(d, since_us, until_us))]


def _charge_window(q, d: Directory, since: datetime, until: datetime):
    q = q.where(CH.c.created_at >= since, CH.c.created_at < until)
    if d.only is not None:
        q = q.where(HO.c.account == d.only)
    return q


def multi_charge_query(d: Directory, since: datetime, until: datetime):
    """Holds settled by more than one charge in the window (multi-node jobs, array tasks)."""
    q = select(CH.c.hold_id).group_by(CH.c.hold_id).having(func.count() > 1)
    if d.only is not None:
        q = q.select_from(CH.join(HO, HO.c.id == CH.c.hold_id))
    return _charge_window(q, d, since, until)


def multi_charge_holds(conn: Connection, d: Directory, since: datetime, until: datetime
                       ) -> set[str]:
    return set(conn.execute(multi_charge_query(d, since, until)).scalars())


@dataclass(frozen=True)
class ChargeRow:
    account: str
    user: str | None
    gpu_type: str | None
    gpus: int
    hold_id: str
    job_id: str | None
    amount: int
    usage: dict | None


def charges_query(d: Directory, since: datetime, until: datetime):
    """Every charge in the window with its hold's account, user, GPU type."""
    q = (select(HO.c.account, HO.c.user, HO.c.gpu_type, HO.c.gpus, CH.c.hold_id, CH.c.job_id,
                CH.c.amount, CH.c.usage)
         .select_from(CH.join(HO, HO.c.id == CH.c.hold_id)))
    return _charge_window(q, d, since, until)


def charges(conn: Connection, d: Directory, since: datetime, until: datetime
            ) -> Iterator[ChargeRow]:
    """:func:`charges_query`, streamed in batches."""
    result = conn.execution_options(yield_per=STREAM_BATCH).execute(
        charges_query(d, since, until))
    for r in result:
        yield ChargeRow(*r)


def charged_query(d: Directory, since_us: int, until_us: int):
    """Charge rows of the journal in a window, per token."""
    q = (select(J.c.token_id, func.sum(J.c.amount), func.count())
         .where(J.c.ts >= since_us, J.c.ts < until_us, J.c.kind == "charge")
         .group_by(J.c.token_id))
    if d.only is not None:
        q = q.where(J.c.token_id.in_(sorted(d.tokens)) if d.tokens else false())
    return q


def charged_per_account(conn: Connection, d: Directory, since_us: int, until_us: int
                        ) -> dict[str, tuple[int, int]]:
    """{account: (charged, charges)} from the journal's charge rows in a window."""
    out: dict[str, tuple[int, int]] = {}
    for token_id, amount, n in conn.execute(charged_query(d, since_us, until_us)):
        tok = d.tokens.get(token_id)
        if tok is None:
            continue
        c, k = out.get(tok.account, (0, 0))
        out[tok.account] = (c + int(amount), k + int(n))
    return out
