"""Which hold pays for which run of which Slurm job: the ledger's record, one per run.

A hold is bound to one job id (``holds.job_id``: the job, or an array's id). The nodes of an
array task know only the task's own job id (Slurm 22.05 gives slurmd's Prolog/Epilog no
``SLURM_ARRAY_JOB_ID``), so PrologSlurmctld also links each run — ``(job id, restart)`` — to
its hold. The link is the idempotency record of the ``link`` operation under the key
``job:<job id>:<restart>``: written once, one indexed row to read, and a second hold for
the same run is refused (``IdempotencyConflict``). A ``link`` journal row records each link
(its key and hold), and ``verify`` holds the records against those rows.

Slurm 25.11+ names each run with a SLUID (``SLURM_JOB_SLUID`` in PrologSlurmctld and the node
hooks; a new one per requeue, unique in the Slurm realm): such a run is linked under
``run:<sluid>`` instead, which a job id that wrapped, or a controller that lost its state and
counts from 1 again, cannot repeat. ``job:<job id>:<restart>`` links (every ledger before
that, every run on an older Slurm) are still read, but where the run has a SLUID only while
their hold is pending: an old link of a settled hold is a previous job that had the same id.

Several clusters share one ledger, and their job ids overlap (each controller counts from its
own FirstJobId): a run is linked under ``job:<cluster>:<job id>:<restart>`` where the cluster
is known (``cluster`` in gpuledger.toml; the hold's, checked to match), so alpha's job 5 and
beta's job 5 are two runs. ``job:<job id>:<restart>`` (no cluster: a ledger from before, or a
site that names none) is still read, for a hold of no cluster or of the cluster asking.
"""

from __future__ import annotations

from .errors import NotFound
from .facts import LINK_KIND
from .holds import check_job_cluster, check_job_owner
from .idempotency import idempotency_row
from .journal import Tx
from .rawsql import Raw


def link_key(job_id: str, restart: int, sluid: str | None = None,
             cluster: str | None = None) -> str:
    if sluid:
        return f"run:{sluid}"
    if cluster:
        return f"job:{cluster}:{job_id}:{restart}"
    return f"job:{job_id}:{restart}"


class JobLinkOps:
    """Mixed into :class:`ledger.service.Ledger`."""

    def link_job(self, hold_id: str, job_id: str, restart: int, *, user: str | None = None,
                 account: str | None = None, sluid: str | None = None,
                 cluster: str | None = None) -> str:
        """Record that run ``restart`` of ``job_id`` on ``cluster`` (SLUID ``sluid``, where
        Slurm gives one) is paid from ``hold_id`` (once). The link is journaled (a ``link``
        row naming its key and hold), so ``verify`` holds the idempotency record against
        it."""
        key = link_key(job_id, restart, sluid, cluster)

        def run(tx: Tx) -> dict:
            hold = self._hold_row(tx.conn, hold_id)
            check_job_owner(hold, job_id, user, account)
            check_job_cluster(hold, job_id, cluster)
            tx.event(LINK_KIND, data={"key": key, "hold": hold_id})
            return {"hold": hold_id}

        return self._idempotent("link", key, {"hold": hold_id}, run)["hold"]

    def linked_hold(self, job_id: str, restart: int, *, sluid: str | None = None,
                    cluster: str | None = None) -> str | None:
        """The hold linked to run ``restart`` of ``job_id`` on ``cluster`` (by its SLUID
        first), or None. A link without a cluster counts only for a hold of no cluster or of
        ``cluster``: another cluster's job of the same id is not this run."""
        keys = ([link_key(job_id, restart, sluid)] if sluid else []) + (
            [link_key(job_id, restart, cluster=cluster)] if cluster else []) + [
            link_key(job_id, restart)]
        with self._read() as conn, Raw(conn) as raw:
            for key in keys:
                row = idempotency_row(raw, key)
                if row is None or row[0] != "link":
                    continue
                hold = row[2].get("hold")
                if sluid and key.startswith("job:") and not self._pending(conn, hold):
                    return None  # linked before a job id came round again: not this run's
                if key == link_key(job_id, restart) and not self._of_cluster(conn, hold,
                                                                             cluster):
                    continue
                return hold
        return None

    def _pending(self, conn, hold_id: str | None) -> bool:
        try:
            return hold_id is not None and self._hold_row(conn, hold_id).state == "pending"
        except NotFound:
            return False

    def _of_cluster(self, conn, hold_id: str | None, cluster: str | None) -> bool:
        """Whether a hold may pay for a job on ``cluster`` (any, when either names none)."""
        if not cluster or hold_id is None:
            return True
        try:
            other = self._hold_row(conn, hold_id).cluster
        except NotFound:
            return False
        return other in (None, cluster)
