"""PrologSlurmctld and EpilogSlurmctld: the whole-job work, once per job, on the controller.

slurmctld runs them as SlurmUser with the job's identity in the environment
(``SLURM_JOB_USER``, ``SLURM_JOB_ACCOUNT``, ``SLURM_JOB_NODELIST``, the array ids, the
SPANK environment with ``SPANK_GPULEDGER_TOKEN``) — but not the AdminComment, and the
``SLURM_JOB_COMMENT`` they do get is the user's own ``--comment``, never read. They talk to
the ledger through the daemon's socket and may use Slurm commands (they run beside
slurmctld, not on the nodes): one ``squeue --json`` for the job's own record
(:mod:`slurm_plugin.reader`: Slurm's fields as data, never a ``Key=Value`` line a job name
can write into). A job that carries a token but cannot be read — Slurm's answer missing a
field, the job not in it — is requeued (exit non-zero), never run unpaid.

PrologSlurmctld (``gpuledger-prolog-slurmctld``):

* AdminComment ``gpuledger:hold=H;token=T`` (only job_submit and admins can write it):
  bind H to the job — the ledger refuses a hold of another user or account, or one
  already bound to another job. A revoked or expired token: void the hold, cancel the
  job. A hold no longer pending (a requeued run after its first run settled): reserve a
  new hold for this run with the job's token, or cancel the job if it cannot pay.
* ``gpuledger:deferred`` (accepted while the ledger was down): reserve now with the job's
  token, bound to the job, for what Slurm gave the run (the job-request reader's
  :func:`ledger.jobrequest.allocation`, the same reading a one-run hold is re-priced by). A refusal cancels the job; any other failure (ledger still
  down, an ``internal`` answer) exits non-zero, and Slurm requeues the job instead of
  running it unpaid (an interactive job is cancelled).
* No mark: not gpuledger's job, whatever its ``--comment`` says.

EpilogSlurmctld (``gpuledger-epilog-slurmctld``): slurmctld starts it beside the nodes'
epilogs, so it waits (``close_wait_seconds``) until every node of the run has charged,
then closes the hold (``ledger.settlement.finish``) — for an array, once every task has charged.
What it cannot close, ``gpuledger reconcile`` does.
"""

from __future__ import annotations

import time

from ledger.daemon.client import Client, DaemonError, DaemonUnavailable
from ledger.errors import LedgerError, Refusal
from ledger.jobrequest import Allocation, allocation, run_request

from . import marks
from .hookcodes import REQUEUE
from .hookenv import Hook, run
from .reader import CommandReader
from .slurm import JobRecord, SlurmError

CTLD_READER = CommandReader(use_pyslurm=False)


def _client(h: Hook) -> Client:
    """The daemon's socket for root and the SlurmUser when there is one, else the main one."""
    return Client(h.config.daemon.privileged_socket or h.config.daemon.socket, timeout=10.0)


def _cluster(h: Hook) -> dict[str, str]:
    """``cluster=`` for the daemon: this cluster's name in gpuledger.toml, where it names one
    (the clusters sharing a ledger reuse each other's job ids)."""
    return {"cluster": h.config.cluster} if h.config.cluster else {}


def _sluid(e) -> dict[str, str]:
    """``sluid=`` for the daemon where Slurm named the run (25.11+: SLURM_JOB_SLUID)."""
    return {"sluid": e.sluid} if e.sluid else {}


def prolog_slurmctld(h: Hook, reader=None, client: Client | None = None) -> int:
    e = h.env
    reader = reader or CTLD_READER
    try:
        record = reader.job(e.job_id)
    except SlurmError as exc:
        h.log.error("cannot read job %s from Slurm (%s): requeued, not run unpaid", e.job_id, exc)
        return REQUEUE
    if record is None:
        h.log.error("job %s is not in squeue's answer: requeued, not run unpaid", e.job_id)
        return REQUEUE
    mark = marks.parse(record.admin_comment)
    if mark is None:
        return 0
    client = client or _client(h)
    with client:
        if mark == marks.DEFERRED:
            return _reserve(h, reader, client, record, why="deferred")
        owner = e.array_job_id or e.job_id
        try:
            bound = client.request("bind", hold=mark.hold_id, job=owner, user=e.user or "",
                                   account=e.account or "", task=e.job_id, restart=e.restart,
                                   qos=record.qos or "", partition=_one(record.partition),
                                   **_sluid(e), **_cluster(h), **_alloc(record))
        except Refusal as exc:  # its QOS/partition costs more than held; the token lacks it
            why = f"gpu-token: {exc.message}; job cancelled before it ran"
            h.log.info("cancelling: %s", why)
            try:
                client.request("void", hold=mark.hold_id, reason=why)
            except LedgerError as void_exc:  # the reconciler voids it after the grace
                h.log.error("could not void hold %s: %s", mark.hold_id, void_exc)
            reader.cancel(e.job_id, why)
            return 0
        except (DaemonUnavailable, DaemonError) as exc:
            if getattr(exc, "reason", "") == "not_found":
                # answered from memory but never written (the daemon stopped first, or the
                # token was spent before the write; ledger.daemon.fastpath): reserve now
                return _reserve(h, reader, client, record,
                                why=f"hold {mark.hold_id} was never written")
            if getattr(exc, "reason", "") == "state":
                why = f"gpu-token: {exc}; job cancelled"
                h.log.error("refused to bind: %s", exc)
                reader.cancel(e.job_id, why)
                return 0
            h.log.error("cannot bind hold %s (%s); paid at submission, left for the "
                        "reconciler", mark.hold_id, exc)
            return 0
        status = bound.get("token_status", "active")
        if status in ("revoked", "expired"):
            why = (f"gpu-token: token {mark.token_id} is {status}"
                   + (f" ({bound['token_reason']})" if bound.get("token_reason") else "")
                   + "; job cancelled before it ran")
            h.log.info("cancelling: %s", why)
            client.request("void", hold=mark.hold_id, reason=why)
            reader.cancel(e.job_id, why)
            return 0
        if bound.get("state") != "pending":
            return _reserve(h, reader, client, record, why=f"hold {mark.hold_id} is "
                            f"{bound.get('state')} (run {e.restart})")
        h.log.info("bound hold %s to job %s (%s/%s)", mark.hold_id, owner, e.user, e.account)
        _release_siblings(h, reader, client, record, mark)
        return 0


def _release_siblings(h: Hook, reader, client: Client, record: JobRecord,
                      mark: marks.HoldMark) -> None:
    """A federated job starts here: every sibling's job_submit held its cost too (any copy
    could have been the one to run), and the others' copies are revoked as it starts (no
    hook runs for a revoked copy). Return their holds now, read from accounting (``sacct
    -M``); a copy not there yet is left to its own cluster's reconciler, which finds it
    REVOKED."""
    here = h.config.cluster or record.cluster
    siblings = [c for c in record.fed_siblings if c not in (here, record.cluster)]
    if not siblings:
        return
    e = h.env
    try:
        copies = reader.sibling_copies(e.job_id, siblings)
    except SlurmError as exc:
        h.log.warning("cannot read the copies of federated job %s on %s (%s); left for "
                      "their reconcilers", e.job_id, ",".join(siblings), exc)
        return
    for copy in copies:
        other = marks.parse(copy.admin_comment)
        if not isinstance(other, marks.HoldMark) or other.hold_id == mark.hold_id:
            continue
        if copy.state != "REVOKED":  # not yet: its reconciler returns it once it is
            continue
        try:
            resp = client.request("revoked", hold=other.hold_id, job=e.job_id,
                                  cluster=copy.cluster or "", runs_on=here or "",
                                  user=e.user or "", account=e.account or "")
        except LedgerError as exc:
            h.log.warning("could not return hold %s of the revoked copy on %s: %s",
                          other.hold_id, copy.cluster, exc)
            continue
        if resp.get("state") == "closed":
            h.log.info("returned hold %s of the copy revoked on %s (%s GPU-s)",
                       other.hold_id, copy.cluster, resp.get("returned"))


def _reserve(h: Hook, reader, client: Client, record: JobRecord, why: str) -> int:
    """Reserve a hold for this run now, bound to the job; cancel if the token can't pay."""
    e = h.env
    if not e.token:
        reader.cancel(e.job_id, "gpu-token: the job carries no token and has no hold; "
                      "cancelled")
        return 0
    run = run_request(_given(record), record.time_limit_s)
    fields = dict(token=e.token, gpus=run.gpus, seconds=run.seconds, type=run.gpu_type or "",
                  tasks=run.tasks, user=e.user or "", account=e.account or "",
                  partition=e.partition or "",
                  key=f"start:{e.sluid}" if e.sluid else f"start:{e.job_id}:{e.restart}",
                  job=e.job_id, qos=record.qos or "", **_cluster(h))
    if run.gres != "gpu":  # shard/mps: Slurm counts no gres/gpu for them
        fields.update(gres=run.gres, per_node=run.per_node)
    try:
        resp = client.request("reserve", **fields)
    except Refusal as exc:
        h.log.info("%s; reservation refused: %s", why, exc.message)
        reader.cancel(e.job_id, f"gpu-token: {exc.message}; job cancelled")
        return 0
    except Exception as exc:  # noqa: BLE001 - unpaid must not run: requeue it
        h.log.error("%s; cannot reserve (%s: %s): Slurm requeues the job until the ledger "
                    "answers", why, exc.__class__.__name__, exc)
        return REQUEUE
    try:
        client.request("bind", hold=resp.get("hold"), job=e.job_id, user=e.user or "",
                       account=e.account or "", task=e.job_id, restart=e.restart, **_sluid(e),
                       **_cluster(h))
    except LedgerError as exc:  # reserved with job=…: bound already; the link helps the nodes
        h.log.warning("reserved hold %s but could not link run %d: %s", resp.get("hold"),
                      e.restart, exc)
    h.log.info("%s; reserved hold %s for job %s", why, resp.get("hold"), e.job_id)
    return 0


def epilog_slurmctld(h: Hook, client: Client | None = None,
                     sleep=time.sleep, clock=time.monotonic) -> int:
    e = h.env
    nodes = e.nodes
    deadline = clock() + h.hooks.close_wait_s
    client = client or _client(h)
    with client:
        while True:
            try:
                resp = client.request("finish", job=e.job_id, array_job=e.array_job_id or "",
                                      nodes=",".join(nodes), **_cluster(h))
            except LedgerError as exc:
                h.log.error("cannot close the hold (%s); left for the reconciler", exc)
                return 0
            state = resp.get("state")
            if state != "waiting" or clock() >= deadline:
                break
            sleep(0.5)
    if state == "closed":
        h.log.info("hold %s closed: charged %s GPU-s, returned %s GPU-s", resp.get("hold"),
                   resp.get("charged"), resp.get("returned"))
    elif state == "waiting":
        h.log.warning("hold %s: not every node charged within %.0f s; left for the "
                      "reconciler", resp.get("hold"), h.hooks.close_wait_s)
    return 0


def prolog_main() -> int:
    # an unexpected failure requeues the job: a billing hook that fails open is a free GPU
    return run("gpuledger-prolog-slurmctld", prolog_slurmctld, fail_rc=REQUEUE)


def epilog_main() -> int:
    return run("gpuledger-epilog-slurmctld", epilog_slurmctld)


def _one(partition: str | None) -> str:
    """The partition a starting job runs in (scontrol lists candidates only before)."""
    return partition if partition and "," not in partition else ""


def _given(record: JobRecord) -> Allocation:
    """What Slurm gave this run, read by the job-request reader from squeue's record: GPUs by
    type over its nodes, or shares per node (its ``--gres``)."""
    return allocation(record.gpus, len(record.nodes), record.tres_per_node)


def _alloc(record: JobRecord) -> dict[str, object]:
    """What Slurm allocated this run, for the daemon to re-price a one-run hold to it: whole
    GPUs (count, and the type when every GPU has one), or shares (shard/mps per node x its
    nodes). Nothing when the record shows no GPU allocation."""
    given = _given(record)
    if not given.gpus:
        return {}
    out: dict[str, object] = {"alloc_gpus": given.gpus}
    if given.gpu_type:
        out["alloc_type"] = given.gpu_type
    if given.gres != "gpu":
        out.update(alloc_gres=given.gres, alloc_per_node=given.per_node)
    return out
