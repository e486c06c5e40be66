"""Per-job, per-GPU running sums: held, busy, energy, peak memory, gaps, idle (below the
site's idle threshold, ``ledger.idle``: total, the current stretch and the longest)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from slurm_plugin.agent.models import GpuBinding, GpuUsage, JobUsage
from slurm_plugin.nvml import Sample

log = logging.getLogger("gpuledger.agent")

FULL_BP = 10_000  # 100 % in basis points
STATE_VERSION = 1


@dataclass
class GpuState:
    """Running sums of one GPU held by one job. Busy is kept in ms x basis points."""

    index: int
    uuid: str | None
    measured: bool
    reason: str | None = None
    busy_bp_ms: int = 0
    energy_mj: int = 0
    energy_last: int | None = None
    peak_mem_bytes: int = 0
    gaps_ms: int = 0
    util_seen: bool = False
    idle_ms: int = 0
    idle_run_ms: int = 0  # the idle stretch going on now (0: busy, or not observed)
    idle_max_ms: int = 0

    def binding(self) -> GpuBinding:
        return GpuBinding(self.index, self.uuid, self.measured, self.reason)


@dataclass
class JobState:
    """What the agent (and its spool) knows about one job."""

    job_id: int
    restart: int
    start_ms: int
    last_ms: int
    gpus: list[GpuState] = field(default_factory=list)
    finished: bool = False
    resumed: bool = False  # next interval follows an agent outage: count it as a gap
    sluid: str | None = None  # the run's SLUID (Slurm 25.11+), when the prolog had one
    cancel_sent: bool = False  # the agent asked Slurm to cancel it for idleness

    @property
    def key(self) -> tuple[int, int]:
        return (self.job_id, self.restart)

    def other_run(self, sluid: str | None) -> bool:
        """Whether this state is another job's that had the same id and restart count (a
        wrapped id counter, a controller that lost its state): both name a SLUID and they
        differ. Without a SLUID on either side, job id and restart are all there is."""
        return bool(sluid and self.sluid and sluid != self.sluid)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("resumed")
        if d["sluid"] is None:
            d.pop("sluid")  # files as before for runs without one
        if not d["cancel_sent"]:
            d.pop("cancel_sent")
        d["version"] = STATE_VERSION
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> JobState:
        if d.get("version") != STATE_VERSION:
            raise ValueError(f"unknown state version {d.get('version')!r}")
        gpus = [GpuState(**g) for g in d["gpus"]]
        return cls(
            int(d["job_id"]), int(d["restart"]), int(d["start_ms"]), int(d["last_ms"]),
            gpus, bool(d["finished"]), sluid=str(d["sluid"]) if d.get("sluid") else None,
            cancel_sent=bool(d.get("cancel_sent", False)),
        )


def util_bp(pct: float) -> int:
    """Utilization percent as integer basis points, clamped to 0..10000."""
    return min(FULL_BP, max(0, round(pct * 100)))


def baseline(job: JobState, samples: Mapping[str, Sample | None]) -> None:
    """Record starting energy counters and memory (at registration)."""
    for g in job.gpus:
        s = samples.get(g.uuid) if g.uuid else None
        if s is None:
            continue
        if s.energy_mj is not None:
            g.energy_last = s.energy_mj
        if s.mem_used_bytes is not None:
            g.peak_mem_bytes = max(g.peak_mem_bytes, s.mem_used_bytes)


def advance(job: JobState, now_ms: int, samples: Mapping[str, Sample | None],
            idle_below_bp: int = 0) -> None:
    """Account the interval (job.last_ms, now_ms] with samples taken at now_ms; a sample
    below ``idle_below_bp`` makes the interval idle (a gap ends an idle stretch)."""
    dt = now_ms - job.last_ms
    if dt < 0:
        log.warning("gpuledger-agent: clock went back %d ms for job %d", -dt, job.job_id)
        job.last_ms = now_ms
        return
    if dt == 0 or job.finished:
        return
    for g in job.gpus:
        s = samples.get(g.uuid) if g.uuid else None
        if not g.measured:
            continue
        if s is None or s.util_pct is None or job.resumed:
            g.gaps_ms += dt
            g.idle_run_ms = 0
        else:
            bp = util_bp(s.util_pct)
            g.busy_bp_ms += dt * bp
            g.util_seen = True
            if bp < idle_below_bp:
                g.idle_ms += dt
                g.idle_run_ms += dt
                g.idle_max_ms = max(g.idle_max_ms, g.idle_run_ms)
            else:
                g.idle_run_ms = 0
        if s is None:
            continue
        if s.energy_mj is not None:
            if g.energy_last is not None:
                if s.energy_mj >= g.energy_last:
                    g.energy_mj += s.energy_mj - g.energy_last
                else:
                    log.warning("gpuledger-agent: energy counter of %s went back", g.uuid)
            g.energy_last = s.energy_mj
        if s.mem_used_bytes is not None:
            g.peak_mem_bytes = max(g.peak_mem_bytes, s.mem_used_bytes)
    job.last_ms = now_ms
    job.resumed = False


def close_unobserved(job: JobState, now_ms: int) -> None:
    """Finish a job without a final sample (agent down): the tail is a gap."""
    if job.finished:
        return
    dt = max(0, now_ms - job.last_ms)
    for g in job.gpus:
        if g.measured:
            g.gaps_ms += dt
            g.idle_run_ms = 0
    job.last_ms = max(job.last_ms, now_ms)
    job.finished = True


def usage(job: JobState, source: str = "agent") -> JobUsage:
    """The summary of a job as of its last accounted instant."""
    held = job.last_ms - job.start_ms
    gpus = []
    for g in job.gpus:
        measured = g.measured and g.util_seen
        reason = g.reason
        if g.measured and not g.util_seen:
            reason = reason or "no utilization sample"
        gpus.append(
            GpuUsage(
                index=g.index,
                uuid=g.uuid,
                held_ms=held,
                busy_ms=min(held, g.busy_bp_ms // FULL_BP),
                energy_mj=g.energy_mj,
                peak_mem_bytes=g.peak_mem_bytes,
                measured=measured,
                gaps_ms=min(held, g.gaps_ms) if measured else 0,
                reason=reason,
                idle_ms=min(held, g.idle_ms) if measured else 0,
                idle_max_ms=min(held, g.idle_max_ms) if measured else 0,
            )
        )
    return JobUsage(job.job_id, job.restart, gpus, job.finished, source)


def idle_for_ms(job: JobState) -> int | None:
    """How long every measured GPU of a running job has been idle without a break (the
    shortest current stretch); None when the job has no measured GPU."""
    runs = [g.idle_run_ms for g in job.gpus if g.measured and g.util_seen]
    return min(runs) if runs else None
