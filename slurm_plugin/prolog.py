"""``gpuledger-prolog``: slurmd Prolog (PrologFlags=Alloc), once per job per node, as root.

Binds the job's hold to its job id, re-checks the token (revoked/expired since submission →
the job is cancelled with a reason and its hold voided), records the start and this node's
GPUs for the epilog, completes a deferred reservation (``gpuledger:deferred``: reserve now
with the job's token and write the hold into AdminComment, or cancel the job when the token
cannot pay) and registers the job with the NVML agent when there is one. Always exits 0.
"""

from __future__ import annotations

from ledger.errors import Refusal
from ledger.service import Ledger
from ledger.views import HoldRequest

from . import jobstate, marks
from .hookenv import Hook, main_for
from .slurm import CommandReader, JobRecord, SlurmReader


def prolog(h: Hook, reader: SlurmReader | None = None, ledger: Ledger | None = None) -> None:
    e = h.env
    reader = reader or CommandReader(use_pyslurm=False)
    record = reader.job(e.job_id)
    comment = e.comment if marks.parse(e.comment) else (record.admin_comment if record else "")
    mark = marks.parse(comment)
    if mark is None:
        return
    ledger = ledger or Ledger.from_config(h.config)
    owner = (record.array_job_id if record and record.array_job_id else e.job_id)
    if mark == marks.DEFERRED:
        mark = _reserve_deferred(h, reader, ledger, record)
        if mark is None:
            return
    else:
        hold = ledger.bind(mark.hold_id, owner)
        token = ledger.inspect(mark.token_id)
        if token.status in ("revoked", "expired"):
            why = (f"gpu-token: token {token.id} is {token.status}"
                   + (f" ({token.status_reason})" if token.status_reason else "")
                   + "; job cancelled before it ran")
            h.log.info("cancelling: %s", why)
            ledger.void(hold.id, reason=why)
            reader.cancel(owner, why)
            return
        if hold.state != "pending":
            h.log.error("hold %s is already %s; the job runs unbilled", hold.id, hold.state)
            return
    gpu_types = {str(i): t for i, t in (record.gpu_idx.get(e.node, {}) if record else {}).items()}
    jobstate.save(h.hooks.state_dir, jobstate.NodeRun(
        job_id=e.job_id, restart=e.restart, node=e.node, start=h.started, gpus=e.gpus,
        gpu_types=gpu_types, hold_id=mark.hold_id, token_id=mark.token_id,
        array_job_id=record.array_job_id if record else None))
    _register_agent(h)
    h.log.info("bound hold %s (run %d, GPUs %s)", mark.hold_id, e.restart,
               ",".join(map(str, e.gpus)) or "none")


def _reserve_deferred(h: Hook, reader: SlurmReader, ledger: Ledger,
                      record: JobRecord | None) -> marks.HoldMark | None:
    e = h.env
    if record is None:
        raise LookupError(f"job {e.job_id} unknown to scontrol; cannot price deferred job")
    if not e.token:
        reader.cancel(e.job_id, "gpu-token: the job was accepted while the GPU ledger was "
                      "unavailable and carries no token; cancelled")
        return None
    gtypes = [t for t in record.gpus if t]
    request = HoldRequest(
        gpus=max(1, record.gpu_count), seconds=max(60, record_time_limit(record)),
        gpu_type=gtypes[0] if len(gtypes) == 1 else None, tasks=1,
        user=record.user, account=record.account)
    try:
        hold = ledger.reserve(e.token, request, key=f"deferred:{e.job_id}:{e.restart}",
                              job_id=e.job_id)
    except Refusal as exc:
        why = f"gpu-token: {exc.message}; job cancelled"
        h.log.info("deferred reservation refused: %s", exc.message)
        reader.cancel(e.job_id, why)
        return None
    reader.set_admin_comment(e.job_id, marks.hold_comment(hold.id, hold.token_id))
    h.log.info("deferred reservation completed: hold %s", hold.id)
    return marks.HoldMark(hold.id, hold.token_id)


def record_time_limit(record: JobRecord) -> int:
    return record.time_limit_s or 3600


def _register_agent(h: Hook) -> None:
    try:
        from slurm_plugin.agent import client
    except Exception:  # noqa: BLE001 - no agent in this build
        return
    try:
        bindings = client.register(int(h.env.job_id), h.env.restart, h.env.gpus,
                                   socket_path=h.hooks.agent_socket)
    except Exception as exc:  # noqa: BLE001 - settlement falls back to held time
        h.log.warning("agent registration failed: %s", exc)
        return
    for b in bindings:
        if not b.measured:
            h.log.warning("GPU %d will not be measured (settled on held time): %s",
                          b.index, b.reason)


main = main_for("gpuledger-prolog", prolog)
