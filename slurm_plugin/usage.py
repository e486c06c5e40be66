"""THE measurement seam: one node's per-GPU usage of one job run, and its charge.

``node_usage`` asks the NVML node agent (``slurm_plugin.agent.client.summary``) and falls
back to held time (prolog → epilog, unmeasured) when the agent is absent, unreachable or
does not know the job. ``charge`` turns that usage into an amount per GPU type through
``ledger.charging.charge_for`` (the site's policy) and returns the record stored with the
charge, so receipts and reports show both figures and the policy used.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import asdict

from ledger.charging import charge_for

from .agent.models import GpuUsage

log = logging.getLogger("gpuledger.hook.usage")


def held_only(gpus: list[int], held_ms: int, reason: str) -> list[GpuUsage]:
    return [GpuUsage(i, None, max(0, held_ms), 0, 0, 0, False, 0, reason) for i in gpus]


def node_usage(job_id: str, restart: int, gpus: list[int], held_ms: int,
               agent_socket: str | None = None,
               agent_spool: str | None = None) -> tuple[list[GpuUsage], str]:
    """Per-GPU usage and where it came from: ``agent``, ``spool`` or ``held``."""
    try:
        from slurm_plugin.agent import client
    except Exception as exc:  # noqa: BLE001 - no agent in this build
        return held_only(gpus, held_ms, f"no agent module ({exc.__class__.__name__})"), "held"
    try:
        summary = client.summary(int(job_id), restart, socket_path=agent_socket,
                                 spool_dir=agent_spool)
    except Exception as exc:  # noqa: BLE001 - the agent never fails the epilog
        log.warning("agent summary failed: %s", exc)
        summary = None
    if summary is None or not summary.gpus:
        return held_only(gpus, held_ms, "agent has no record of the job"), "held"
    seen = {g.index for g in summary.gpus}
    usage = list(summary.gpus)
    usage += held_only([i for i in gpus if i not in seen], held_ms, "not reported by agent")
    return usage, summary.source


def charge(usage: list[GpuUsage], types: dict[int, str | None], rates: dict[str, int],
           fallback_rate: int, policy: str, floor: str) -> tuple[int, dict]:
    """(amount, usage record): each GPU at its type's rate under the site policy."""
    by_type: dict[str | None, list[GpuUsage]] = defaultdict(list)
    for u in usage:
        by_type[types.get(u.index)].append(u)
    total, groups, gpus = 0, [], []
    for gtype, items in sorted(by_type.items(), key=lambda kv: kv[0] or ""):
        rate = rates.get(gtype or "", rates.get("default", fallback_rate)) if gtype else \
            fallback_rate
        result = charge_for(items, rate, policy, floor)
        total += result.total
        groups.append({"gpu_type": gtype, "rate_ppm": rate, "charge": result.total,
                       "allocated": result.allocated_total, "measured": result.measured_total})
        for line in result.lines:
            gpus.append({**asdict(line), "gpu_type": gtype, "rate_ppm": rate})
    record = {
        "policy": policy, "floor": floor, "gpus": sorted(gpus, key=lambda g: g["index"]),
        "by_type": groups,
        "held_ms": sum(u.held_ms for u in usage), "busy_ms": sum(u.busy_ms for u in usage),
        "energy_mj": sum(u.energy_mj for u in usage),
        "measured": bool(usage) and all(u.measured for u in usage),
    }
    return total, record
