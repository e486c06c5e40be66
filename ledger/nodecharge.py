"""The record a compute node sends for one run of a job: what it measured, nothing priced.

A node's epilog knows the run (job id, restart or SLUID, its node name, start and end, the
GPUs Slurm gave it with their types and shard counts) and what the GPUs did (the NVML
agent's figures, or held time only). It knows nothing of holds, rates, tiers or the charge
policy: those are the ledger's, applied by ``settlement.charge_node`` where the daemon runs.
The same record is what a node keeps in its durable spool while the daemon is away, so it
is parsed here with every field checked: a spool file or a socket line is hostile input.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import InvalidInput
from .names import is_identifier
from .slurmsyntax import sluid as parse_sluid

MAX_GPUS_PER_NODE = 64
MAX_OWNERS = 4
MAX_MS = 10 * 366 * 86_400_000  # ten years of milliseconds
MAX_BYTES = 1 << 50
SOURCES = ("agent", "spool", "held")
VERSION = 1


@dataclass(frozen=True)
class GpuUse:
    """One GPU's usage by the run (``ledger.charging.GpuUsageLike``)."""

    index: int
    held_ms: int
    busy_ms: int = 0
    energy_mj: int = 0
    peak_mem_bytes: int = 0
    measured: bool = False
    gaps_ms: int = 0
    uuid: str | None = None
    reason: str | None = None
    idle_ms: int = 0
    idle_max_ms: int = 0


@dataclass(frozen=True)
class NodeCharge:
    """One node's account of one run of a job (see the module doc)."""

    job_id: str
    restart: int
    node: str
    start: float  # epoch seconds: the prolog's clock
    end: float  # epoch seconds: the epilog's clock
    user: str | None = None
    partition: str | None = None
    array_job_id: str | None = None
    sluid: str | None = None
    owners: tuple[str, ...] = ()  # Slurm ids this run is known by, own id first
    gpus: tuple[int, ...] = ()  # indices Slurm gave the run on this node
    gpu_types: Mapping[int, str] = field(default_factory=dict)
    gpu_shards: Mapping[int, int] = field(default_factory=dict)
    usage: tuple[GpuUse, ...] = ()
    source: str = "held"
    cluster: str | None = None

    @property
    def key(self) -> str:
        """What makes this record one: a spool file name and a log's handle."""
        run = self.sluid or f"{self.job_id}.{self.restart}"
        return f"{self.cluster or '-'}.{run}.{self.node}"

    @property
    def held_ms(self) -> int:
        return max(0, round((self.end - self.start) * 1000))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["v"] = VERSION
        d["gpu_types"] = {str(k): v for k, v in self.gpu_types.items()}
        d["gpu_shards"] = {str(k): v for k, v in self.gpu_shards.items()}
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> NodeCharge:
        try:
            data = json.loads(text)
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidInput(f"node charge record is not JSON: {exc}") from None
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: object) -> NodeCharge:
        if not isinstance(data, Mapping):
            raise InvalidInput("node charge record is not an object")
        if data.get("v") != VERSION:
            raise InvalidInput(f"node charge record version {data.get('v')!r} is not {VERSION}")
        known = {f for f in cls.__dataclass_fields__} | {"v"}
        extra = sorted(set(data) - known)
        if extra:
            raise InvalidInput(f"node charge record has unknown fields: {', '.join(extra[:5])}")
        start, end = _time(data, "start"), _time(data, "end")
        if end < start:
            raise InvalidInput("node charge record ends before it starts")
        job_id = _ident(data, "job_id", required=True)
        owners = data.get("owners") or [job_id]
        if not isinstance(owners, list) or not 1 <= len(owners) <= MAX_OWNERS \
                or not all(is_identifier(o) for o in owners):
            raise InvalidInput("node charge record: owners is not a short list of job ids")
        gpus = _ints(data.get("gpus") or [], "gpus", MAX_GPUS_PER_NODE)
        usage_raw = data.get("usage") or []
        if not isinstance(usage_raw, list) or len(usage_raw) > MAX_GPUS_PER_NODE:
            raise InvalidInput("node charge record: usage is not a list of GPUs")
        usage = tuple(_gpu_use(u) for u in usage_raw)
        if len({u.index for u in usage}) != len(usage):
            raise InvalidInput("node charge record: a GPU is listed twice in usage")
        source = data.get("source", "held")
        if source not in SOURCES:
            raise InvalidInput(f"node charge record: source must be one of {', '.join(SOURCES)}")
        sluid_text = data.get("sluid")
        sluid = parse_sluid(sluid_text) if isinstance(sluid_text, str) else None
        if sluid_text and sluid is None:
            raise InvalidInput("node charge record: sluid is not a SLUID")
        return cls(
            job_id=job_id, restart=_int(data, "restart", 0, 1 << 20),
            node=_ident(data, "node", required=True), start=start, end=end,
            user=_ident(data, "user"), partition=_ident(data, "partition"),
            array_job_id=_ident(data, "array_job_id"), sluid=sluid,
            owners=tuple(owners), gpus=tuple(gpus),
            gpu_types=_index_map(data.get("gpu_types"), "gpu_types", str),
            gpu_shards=_index_map(data.get("gpu_shards"), "gpu_shards", int),
            usage=usage, source=source, cluster=_ident(data, "cluster"))


def _ident(data: Mapping, name: str, required: bool = False) -> str | None:
    v = data.get(name)
    if v is None or v == "":
        if required:
            raise InvalidInput(f"node charge record: {name} is missing")
        return None
    if not is_identifier(v):
        raise InvalidInput(f"node charge record: {name} is not a valid name")
    return v


def _int(data: Mapping, name: str, low: int, high: int) -> int:
    v = data.get(name, low)
    if not isinstance(v, int) or isinstance(v, bool) or not low <= v <= high:
        raise InvalidInput(f"node charge record: {name} must be an integer {low}..{high}")
    return v


def _time(data: Mapping, name: str) -> float:
    v = data.get(name)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
            or not 0 <= v < 1e11:
        raise InvalidInput(f"node charge record: {name} is not an epoch time")
    return float(v)


def _ints(v: object, name: str, limit: int) -> list[int]:
    if not isinstance(v, list) or len(v) > limit or not all(
            isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 1 << 16 for i in v):
        raise InvalidInput(f"node charge record: {name} is not a list of GPU indices")
    return v


def _index_map(v: object, name: str, kind: type) -> dict[int, Any]:
    if v is None:
        return {}
    if not isinstance(v, Mapping) or len(v) > MAX_GPUS_PER_NODE:
        raise InvalidInput(f"node charge record: {name} is not a map of GPU indices")
    out: dict[int, Any] = {}
    for k, val in v.items():
        if not (isinstance(k, str) and k.isdigit() and len(k) <= 5):
            raise InvalidInput(f"node charge record: {name} has a key that is not an index")
        if val is None:
            continue
        if kind is str and not is_identifier(val):
            raise InvalidInput(f"node charge record: {name} has an invalid GPU type")
        if kind is int and (not isinstance(val, int) or isinstance(val, bool)
                            or not 0 < val <= 1 << 20):
            raise InvalidInput(f"node charge record: {name} has an invalid shard count")
        out[int(k)] = val
    return out


def _gpu_use(u: object) -> GpuUse:
    if not isinstance(u, Mapping):
        raise InvalidInput("node charge record: a usage entry is not an object")
    known = set(GpuUse.__dataclass_fields__)
    if set(u) - known:
        raise InvalidInput("node charge record: a usage entry has unknown fields")

    def num(name: str, high: int) -> int:
        return _int(u, name, 0, high)

    uuid, reason = u.get("uuid"), u.get("reason")
    if uuid is not None and not (isinstance(uuid, str) and len(uuid) <= 96
                                 and uuid.isprintable()):
        raise InvalidInput("node charge record: a GPU uuid is not printable text")
    if reason is not None and not (isinstance(reason, str) and len(reason) <= 200
                                   and reason.isprintable()):
        raise InvalidInput("node charge record: a GPU's reason is not printable text")
    measured = u.get("measured", False)
    if not isinstance(measured, bool):
        raise InvalidInput("node charge record: measured must be true or false")
    return GpuUse(index=num("index", (1 << 16) - 1), held_ms=num("held_ms", MAX_MS),
                  busy_ms=num("busy_ms", MAX_MS), energy_mj=num("energy_mj", 1 << 62),
                  peak_mem_bytes=num("peak_mem_bytes", MAX_BYTES), measured=measured,
                  gaps_ms=num("gaps_ms", MAX_MS), uuid=uuid, reason=reason,
                  idle_ms=num("idle_ms", MAX_MS), idle_max_ms=num("idle_max_ms", MAX_MS))
