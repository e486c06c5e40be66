"""What the prolog and epilog call: register a job, fetch its usage summary."""

from __future__ import annotations

import json
import logging
import socket
from typing import Any

from slurm_plugin.agent import accounting
from slurm_plugin.agent.accounting import JobState
from slurm_plugin.agent.core import wall_ms
from slurm_plugin.agent.models import GpuBinding, JobUsage
from slurm_plugin.agent.protocol import MAX_LINE, encode
from slurm_plugin.agent.server import DEFAULT_SOCKET
from slurm_plugin.agent.spool import DEFAULT_SPOOL, Spool

log = logging.getLogger("gpuledger.agent")

TIMEOUT_S = 10.0


class AgentUnreachable(Exception):
    """No usable answer from the agent's socket."""


def request(req: dict[str, Any], socket_path: str | None = None, timeout: float = TIMEOUT_S) -> dict[str, Any]:
    """Send one request line and read one reply line."""
    path = socket_path or DEFAULT_SOCKET
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(path)
            try:
                s.sendall(encode(req))
            except (BrokenPipeError, ConnectionResetError):
                pass  # the agent may have answered (e.g. refused us) and closed: read it
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
                if len(buf) > MAX_LINE:
                    raise AgentUnreachable("reply too long")
    except OSError as exc:
        raise AgentUnreachable(f"{path}: {exc}") from None
    try:
        reply = json.loads(buf)
    except ValueError:
        raise AgentUnreachable("reply is not JSON") from None
    if not isinstance(reply, dict):
        raise AgentUnreachable("reply is not an object")
    return reply


def register(
    job_id: int, restart: int, gpu_indices: list[int], *, socket_path: str | None = None,
    sluid: str | None = None,
) -> list[GpuBinding]:
    """Register a job with the agent. Never raises for agent trouble: the GPUs
    then come back unmeasured, with the reason."""
    req = {"op": "register", "job_id": job_id, "restart": restart, "gpus": list(gpu_indices)}
    if sluid:
        req["sluid"] = sluid
    try:
        reply = request(req, socket_path)
        if not reply.get("ok"):
            raise AgentUnreachable(str(reply.get("error")))
        return [GpuBinding.from_dict(g) for g in reply["gpus"]]
    except (AgentUnreachable, KeyError, TypeError, ValueError) as exc:
        log.error("gpuledger-agent: register of job %d failed: %s", job_id, exc)
        return [GpuBinding(i, None, False, f"agent unreachable: {exc}") for i in gpu_indices]


def summary(
    job_id: int,
    restart: int,
    *,
    socket_path: str | None = None,
    spool_dir: str | None = None,
    finish: bool = True,
    sluid: str | None = None,
) -> JobUsage | None:
    """The job's usage from the agent, else from its spool; None when neither knows it."""
    req = {"op": "summary", "job_id": job_id, "restart": restart, "finish": finish}
    if sluid:
        req["sluid"] = sluid
    try:
        reply = request(req, socket_path)
        if reply.get("ok"):
            return JobUsage.from_dict(reply["usage"])
        if reply.get("error") != "unknown job":
            log.error("gpuledger-agent: summary of job %d refused: %s", job_id, reply.get("error"))
    except (AgentUnreachable, KeyError, TypeError, ValueError) as exc:
        log.warning("gpuledger-agent: agent unreachable for job %d (%s); reading spool", job_id, exc)
    return read_spool(job_id, restart, spool_dir or DEFAULT_SPOOL, finish=finish, sluid=sluid)


def read_spool(
    job_id: int, restart: int, spool_dir: str, *, finish: bool = True, now_ms: int | None = None,
    sluid: str | None = None,
) -> JobUsage | None:
    """Usage from the spool alone; the time since the agent's last round is a gap.

    With finish, the job is marked finished there so a restarted agent stops it."""
    spool = Spool(spool_dir)
    try:
        d = spool.read(job_id, restart)
        if d is None:
            return None
        job = JobState.from_dict(d)
    except (OSError, KeyError, TypeError, ValueError) as exc:
        log.error("gpuledger-agent: spool state of job %d unusable: %s", job_id, exc)
        return None
    if job.other_run(sluid):
        return None  # an earlier job's, with the same id
    if job.finished:
        return accounting.usage(job, source="spool")
    if finish:
        accounting.close_unobserved(job, wall_ms() if now_ms is None else now_ms)
        try:
            spool.write(job_id, restart, job.to_dict())
        except OSError as exc:
            log.error("gpuledger-agent: cannot mark job %d finished in spool: %s", job_id, exc)
    return accounting.usage(job, source="spool")
