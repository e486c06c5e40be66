"""Records exchanged between the agent, the prolog/epilog and the charge policy."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class GpuBinding:
    """How a Slurm GPU index of a job was tied to an NVML device."""

    index: int
    uuid: str | None
    measured: bool
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GpuBinding:
        return cls(int(d["index"]), d.get("uuid"), bool(d["measured"]), d.get("reason"))


@dataclass(frozen=True)
class GpuUsage:
    """Usage of one GPU by one job; busy_ms excludes gaps_ms (time not observed)."""

    index: int
    uuid: str | None
    held_ms: int
    busy_ms: int
    energy_mj: int
    peak_mem_bytes: int
    measured: bool
    gaps_ms: int = 0
    reason: str | None = None
    idle_ms: int = 0  # below the site's idle threshold (ledger.idle)
    idle_max_ms: int = 0  # the longest unbroken idle stretch

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GpuUsage:
        return cls(
            index=int(d["index"]),
            uuid=d.get("uuid"),
            held_ms=int(d["held_ms"]),
            busy_ms=int(d["busy_ms"]),
            energy_mj=int(d["energy_mj"]),
            peak_mem_bytes=int(d["peak_mem_bytes"]),
            measured=bool(d["measured"]),
            gaps_ms=int(d.get("gaps_ms", 0)),
            reason=d.get("reason"),
            idle_ms=int(d.get("idle_ms", 0)),
            idle_max_ms=int(d.get("idle_max_ms", 0)),
        )


@dataclass(frozen=True)
class JobUsage:
    """A job's usage summary (one Slurm job id + restart count)."""

    job_id: int
    restart: int
    gpus: list[GpuUsage] = field(default_factory=list)
    finished: bool = False
    source: str = "agent"  # "agent" or "spool" (read by the epilog while the agent was down)

    def to_dict(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "restart": self.restart,
            "finished": self.finished,
            "source": self.source,
            "gpus": [g.to_dict() for g in self.gpus],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> JobUsage:
        return cls(
            job_id=int(d["job_id"]),
            restart=int(d["restart"]),
            gpus=[GpuUsage.from_dict(g) for g in d.get("gpus", [])],
            finished=bool(d.get("finished", False)),
            source=str(d.get("source", "agent")),
        )
