"""Read-side summaries shared by the CLI, the daemon and reports."""

from __future__ import annotations

from sqlalchemy import func, select

from .errors import NotFound
from .models import Account, Hold, Token, Wallet
from .views import AccountView

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
