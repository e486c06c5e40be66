"""GPU time that ran with no hold: recorded in the journal as owed, never silently lost.

Only a job accepted while the ledger was down (``gpuledger:deferred``) whose PrologSlurmctld
never reserved can run with no hold — the controller hook missing or broken, since a working
one requeues such a job rather than run it unpaid. The reconciler finds these runs in
accounting. Their token is not known there (it never leaves the job's SPANK environment), so
nothing can be charged for them: each run gets one journal row of kind ``debt`` (no value
moves; ``data`` names the job, the run, the Slurm account and the GPU-seconds owed), written
once per key, and the reconciler reports it as an error until an admin settles it (e.g. a
``gpuledger transfer`` from the project's token, with the job id as the reason).
"""

from __future__ import annotations

from .amounts import check_amount
from .journal import Tx
from .names import check_account_name


class DebtOps:
    """Mixed into :class:`ledger.service.Ledger` (uses its transactions and idempotency)."""

    def record_debt(self, account: str, owed: int, *, key: str, job_id: str, reason: str,
                    usage: dict | None = None) -> dict:
        """Record ``owed`` GPU-seconds of hold-less usage of ``account`` (idempotent by key)."""
        check_account_name(account)
        check_amount(owed, allow_zero=True, what="owed")
        fields = {"account": account, "owed": owed, "job_id": job_id}

        def run(tx: Tx) -> dict:
            self._account_row(tx.conn, account)  # an unknown account is an error
            tx.event("debt", account=account, data={"job_id": job_id, "owed": owed,
                                                    "reason": reason, "usage": usage or {}})
            tx.flush()
            return {"account": account, "owed": owed, "charged": 0, "unpaid": owed}

        return self._idempotent("debt", key, fields, run)
