"""GPU time that ran with no hold: charged to the account's pool, the rest recorded as owed.

Only a job accepted while the ledger was down (``gpuledger:deferred``) whose PrologSlurmctld
never reserved can run with no hold — the controller hook missing or broken, since a working
one requeues such a job rather than run it unpaid. The reconciler finds these runs in
accounting; their token is not known there (it never leaves the job's SPANK environment), so
the Slurm account's pool wallet pays what it holds (kind ``debt``), and what it cannot pay is
written into the same journal row as ``unpaid`` and reported by the reconciler as an error.
"""

from __future__ import annotations

from sqlalchemy import select

from .amounts import check_amount
from .journal import Tx, W
from .service import LedgerBase, check_account_name


class DebtOps(LedgerBase):
    def charge_unheld(self, account: str, amount: int, *, key: str, job_id: str,
                      reason: str, usage: dict | None = None) -> dict:
        """Charge ``amount`` of hold-less usage to ``account``'s pool (as far as it goes).

        Idempotent by ``key``; returns ``{account, owed, charged, unpaid}``."""
        check_account_name(account)
        check_amount(amount, allow_zero=True, what="owed")
        fields = {"account": account, "amount": amount, "job_id": job_id}

        def run(tx: Tx) -> dict:
            row = self._account_row(tx.conn, account)
            balance = tx.conn.execute(select(W.c.balance).where(W.c.id == row.wallet_id)
                                      .with_for_update()).scalar_one()
            take = min(amount, balance)
            tx.move("debt", row.wallet_id, tx.wallet_id("system:usage"), take,
                    account=account, data={"job_id": job_id, "owed": amount,
                                           "unpaid": amount - take, "reason": reason,
                                           "usage": usage or {}})
            tx.flush()
            return {"account": account, "owed": amount, "charged": take,
                    "unpaid": amount - take}

        return self._idempotent("debt", key, fields, run)
