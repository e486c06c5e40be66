"""Which hold pays for which run of which Slurm job: the ledger's record, one per run.

A hold is bound to one job id (``holds.job_id``: the job, or an array's id). The nodes of an
array task know only the task's own job id (Slurm 22.05 gives slurmd's Prolog/Epilog no
``SLURM_ARRAY_JOB_ID``), so PrologSlurmctld also links each run — ``(job id, restart)`` — to
its hold. The link is the idempotency record of the ``link`` operation under the key
``job:<job id>:<restart>``: written once, one indexed row to read, and a second hold for
the same run is refused (``IdempotencyConflict``).
"""

from __future__ import annotations

from .holds import check_job_owner
from .journal import Tx


def link_key(job_id: str, restart: int) -> str:
    return f"job:{job_id}:{restart}"


class JobLinkOps:
    """Mixed into :class:`ledger.service.Ledger`."""

    def link_job(self, hold_id: str, job_id: str, restart: int, *, user: str | None = None,
                 account: str | None = None) -> str:
        """Record that run ``restart`` of ``job_id`` is paid from ``hold_id`` (once)."""
        def run(tx: Tx) -> dict:
            check_job_owner(self._hold_row(tx.conn, hold_id), job_id, user, account)
            return {"hold": hold_id}

        return self._idempotent("link", link_key(job_id, restart), {"hold": hold_id},
                                run)["hold"]

    def linked_hold(self, job_id: str, restart: int) -> str | None:
        """The hold linked to run ``restart`` of ``job_id``, or None."""
        from .service import _IDEM_GET

        with self._read() as conn:
            row = conn.execute(_IDEM_GET, {"k": link_key(job_id, restart)}).one_or_none()
        return row.result.get("hold") if row is not None and row.op == "link" else None
