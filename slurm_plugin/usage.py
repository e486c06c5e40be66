"""THE measurement seam: one node's per-GPU usage of one job run.

``node_usage`` asks the NVML node agent (``slurm_plugin.agent.client.summary``) and falls
back to held time (prolog → epilog, unmeasured) when the agent is absent, unreachable or
does not know the job. ``ledger.charging.charge_gpus`` turns that usage into the amount and
the typed charge record (``ledger.charge_record``) stored with the charge, so receipts and
reports show both figures and the policy used.
"""

from __future__ import annotations

import logging

from .agent.models import GpuUsage

log = logging.getLogger("gpuledger.hook.usage")


def held_only(gpus: list[int], held_ms: int, reason: str) -> list[GpuUsage]:
    return [GpuUsage(i, None, max(0, held_ms), 0, 0, 0, False, 0, reason) for i in gpus]


def node_usage(job_id: str, restart: int, gpus: list[int], held_ms: int,
               agent_socket: str | None = None,
               agent_spool: str | None = None,
               sluid: str | None = None) -> tuple[list[GpuUsage], str]:
    """Per-GPU usage and where it came from: ``agent``, ``spool`` or ``held``."""
    try:
        from slurm_plugin.agent import client
    except Exception as exc:  # noqa: BLE001 - no agent in this build
        return held_only(gpus, held_ms, f"no agent module ({exc.__class__.__name__})"), "held"
    try:
        summary = client.summary(int(job_id), restart, socket_path=agent_socket,
                                 spool_dir=agent_spool, sluid=sluid)
    except Exception as exc:  # noqa: BLE001 - the agent never fails the epilog
        log.warning("agent summary failed: %s", exc)
        summary = None
    if summary is None or not summary.gpus:
        return held_only(gpus, held_ms, "agent has no record of the job"), "held"
    seen = {g.index for g in summary.gpus}
    usage = list(summary.gpus)
    usage += held_only([i for i in gpus if i not in seen], held_ms, "not reported by agent")
    return usage, summary.source
