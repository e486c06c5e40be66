"""THE measurement seam: one node's per-GPU usage of one job run.

``node_usage`` asks the NVML node agent (``slurm_plugin.agent.client.summary``) and falls
back to held time (prolog → epilog, unmeasured) when the agent is absent, unreachable or
does not know the job. ``ledger.charging.charge_gpus`` turns that usage into the amount and
the typed charge record (``ledger.charge_record``) stored with the charge, so receipts and
reports show both figures and the policy used.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from ledger.shares import GPU, MPS, MPS_PER_GPU
from ledger.views import HoldView

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


def node_shares(hold: HoldView, gpus: list[int], shards: Mapping[int, int]
                ) -> dict[int, tuple[int, int]]:
    """GPU index → (s, S) on this node for a hold of shares (``{}`` for whole GPUs).

    Slurm 22.05 gives a job its shards (or MPS share) on ONE GPU per node, the one in
    SLURM_JOB_GPUS, and exactly the count asked per node (``scontrol show job -d``:
    ``GRES=shard:3(IDX:0)``), so s is the hold's ``per_node`` and S that GPU's shard count
    from gres.conf (100 for MPS; the hold's own share when gres.conf does not say). Were
    several GPUs listed, the whole share is put on the one cut into the fewest shards (the
    others are not charged): the split is unknown here, and the charge never undercuts the
    hold's price.
    """
    if hold.gres == GPU or not gpus:
        return {}
    per = hold.per_node or hold.gpus

    def share_of(i: int) -> int:
        return MPS_PER_GPU if hold.gres == MPS else (shards.get(i) or hold.share)

    gpu = min(gpus, key=lambda i: (share_of(i), i))
    return {gpu: (min(per, share_of(gpu)), share_of(gpu))}
