"""Read-side summaries shared by the CLI, the daemon and reports."""

from __future__ import annotations

from sqlalchemy import Text, cast, func, or_, select

from .errors import NotFound
from .models import Account, Hold, Token, Wallet
from .token_ops import token_status
from .views import AccountView, TokenView

A, T, W, HO = Account.__table__, Token.__table__, Wallet.__table__, Hold.__table__


def account_views(ledger, name: str | None = None) -> list[AccountView]:
    pool = W.alias("pool")
    tok_wallet = W.alias("tw")
    remaining = (select(func.coalesce(func.sum(tok_wallet.c.balance), 0))
                 .select_from(T.join(tok_wallet, tok_wallet.c.id == T.c.wallet_id))
                 .where(T.c.account_id == A.c.id).scalar_subquery())
    count = select(func.count(T.c.id)).where(T.c.account_id == A.c.id).scalar_subquery()
    held = (select(func.coalesce(func.sum(HO.c.amount - HO.c.charged), 0))
            .where(HO.c.account == A.c.name, HO.c.state == "pending").scalar_subquery())
    q = (select(A.c.name, A.c.report_to, A.c.created_at, pool.c.balance, count, remaining, held)
         .join(pool, pool.c.id == A.c.wallet_id).order_by(A.c.name))
    if name is not None:
        q = q.where(A.c.name == name)
    with ledger._read() as conn:
        rows = conn.execute(q).all()
    if name is not None and not rows:
        raise NotFound(f"unknown account {name!r}")
    return [AccountView(name=r[0], report_to=list(r[1] or []), created=r[2], pool=r[3],
                        tokens=r[4], remaining=r[5], held=r[6]) for r in rows]


def user_tokens(ledger, user: str, accounts: frozenset[str] | set[str]) -> list[TokenView]:
    """The tokens ``user`` may spend, in one query: those scoped to them by name, and those
    of their Slurm ``accounts`` that are scoped to no user. (The SQL filter on the scopes'
    text only narrows the rows; the exact test is the one below, on the decoded scopes.)"""
    held = (select(func.coalesce(func.sum(HO.c.amount - HO.c.charged), 0))
            .where(HO.c.token_id == T.c.id, HO.c.state == "pending").scalar_subquery())
    quoted = '"' + user.replace("/", "//").replace("%", "/%").replace("_", "/_") + '"'
    q = (select(T, A.c.name.label("account"), W.c.balance, held.label("held"))
         .join(A, A.c.id == T.c.account_id).join(W, W.c.id == T.c.wallet_id)
         .where(or_(A.c.name.in_(sorted(accounts)),
                    cast(T.c.scopes, Text).like(f"%{quoted}%", escape="/")))
         .order_by(T.c.created_at, T.c.id))
    with ledger._read() as conn:
        rows = conn.execute(q).all()
    now = ledger.clock()
    out = []
    for r in rows:
        users = (r.scopes or {}).get("users") or ()
        if user in users or (not users and r.account in accounts):
            out.append(TokenView(
                id=r.id, account=r.account, kid=r.kid, face=r.face, remaining=r.balance,
                held=r.held, status=token_status(r, r.balance, r.held, now),
                not_before=r.not_before, expires=r.expires, scopes=r.scopes, parent=r.parent_id,
                created=r.created_at, status_reason=r.status_reason))
    return out
