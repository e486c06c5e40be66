"""The charge record: what one settlement measured and charged, stored in ``charges.usage``.

One typed, versioned record, written by the epilog and by the reconciler (through
``ledger.charging.charge_gpus``) and read by the reports and the receipts. Per GPU it says
whether the GPU was measured, its held and busy time, energy, type and rate, and both
amounts; the whole record says the policy, where the figures came from (``agent``,
``spool``, ``held``, ``sacct``) and the node and run.

Per-GPU entries decide what was measured: a record with two of three GPUs measured counts
those two GPUs' busy and held time. Rows written before the record had a version (the
agent's job summary, a charge-policy result, either nested under ``usage``/``charge``/…,
the reconciler's per-type ``by_type`` lists, or one flat ``{held_ms, busy_ms, measured}``)
are read tolerantly by :func:`parse`; a row with no usable figures reads as ``None``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

VERSION = 3  # 3: idle_ms / idle_max_ms per measured GPU (ledger.idle)
_NESTED = ("usage", "measurement", "charge", "result")
_LISTS = ("gpus", "lines")
_OPTIONAL = ("share", "tiers", "idle_ms", "idle_max_ms")  # stored only when set
_CONTEXT = ("source", "node", "restart", "start", "end", "elapsed_s", "state")


@dataclass(frozen=True)
class GpuCharge:
    """One GPU of one settlement."""

    index: int | None
    held_ms: int
    measured: bool
    busy_ms: int = 0  # ≤ held_ms; 0 when not measured
    gaps_ms: int = 0  # time the agent could not observe (counted as busy when charging)
    energy_mj: int = 0
    peak_mem_bytes: int = 0
    uuid: str | None = None
    gpu_type: str | None = None
    rate_ppm: int | None = None
    billed_ms: int | None = None  # the time the policy charged for
    allocated: int | None = None  # amount under `allocated`
    measured_amount: int | None = None  # amount under `measured`
    charge: int | None = None  # the amount the policy picked
    reason: str | None = None  # why the GPU was not measured
    share: str | None = None  # "s/S": the job had s of the GPU's S shares (None: all of it)
    tiers: list | None = None  # [{tier, multiplier_ppm, ms, amount}] when a tier applied
    idle_ms: int | None = None  # time below the idle threshold (None: not counted)
    idle_max_ms: int | None = None  # its longest unbroken stretch

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], force_unmeasured: bool = False) -> GpuCharge | None:
        held = _int(d.get("held_ms"))
        if held is None:
            return None
        measured = d.get("measured") is True and not force_unmeasured
        busy = _int(d.get("busy_ms")) if measured else 0
        if busy is None:  # claims to be measured but carries no busy figure
            measured, busy = False, 0
        return cls(
            index=_int(d.get("index")), held_ms=held, measured=measured,
            busy_ms=min(busy, held), gaps_ms=_int(d.get("gaps_ms")) or 0,
            energy_mj=_int(d.get("energy_mj")) or 0,
            peak_mem_bytes=_int(d.get("peak_mem_bytes")) or 0,
            uuid=_str(d.get("uuid")), gpu_type=_str(d.get("gpu_type")),
            rate_ppm=_int(d.get("rate_ppm")), billed_ms=_int(d.get("billed_ms")),
            allocated=_int(d.get("allocated")), measured_amount=_int(d.get("measured_amount")),
            charge=_int(d.get("charge")), reason=_str(d.get("reason")),
            share=_str(d.get("share")),
            tiers=d.get("tiers") if isinstance(d.get("tiers"), list) else None,
            idle_ms=_idle(d.get("idle_ms"), held, measured),
            idle_max_ms=_idle(d.get("idle_max_ms"), held, measured),
        )


@dataclass(frozen=True)
class ChargeRecord:
    """What a settlement measured and charged (amounts in reference GPU-seconds)."""

    gpus: tuple[GpuCharge, ...]
    policy: str | None = None  # allocated | measured
    floor: str | None = None  # the measured policy's floor, exact text ("1/4")
    amount: int | None = None  # what the policy charged (before the hold's cap)
    allocated: int | None = None
    measured_amount: int | None = None
    source: str | None = None  # agent | spool | held | sacct
    node: str | None = None
    restart: int | None = None
    start: float | None = None  # epoch seconds of the run on this node
    end: float | None = None
    elapsed_s: int | None = None  # Slurm's elapsed time (reconciler)
    state: str | None = None  # Slurm's job state (reconciler)
    uncapped_amount: int | None = None  # set when the hold could not take the whole amount
    version: int = VERSION

    # -- figures ----------------------------------------------------------------------------

    @property
    def held_ms(self) -> int:
        return sum(g.held_ms for g in self.gpus)

    @property
    def measured_held_ms(self) -> int:
        return sum(g.held_ms for g in self.gpus if g.measured)

    @property
    def busy_ms(self) -> int:
        """Busy time of the measured GPUs."""
        return sum(g.busy_ms for g in self.gpus if g.measured)

    @property
    def energy_mj(self) -> int:
        return sum(g.energy_mj for g in self.gpus)

    @property
    def measured_gpus(self) -> int:
        return sum(1 for g in self.gpus if g.measured)

    @property
    def all_measured(self) -> bool:
        return bool(self.gpus) and all(g.measured for g in self.gpus)

    def capped(self, uncapped_amount: int) -> ChargeRecord:
        return replace(self, uncapped_amount=uncapped_amount)

    # -- storage ----------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k != "gpus" and v is not None}
        d["gpus"] = [{k: v for k, v in asdict(g).items()
                      if k not in _OPTIONAL or v is not None} for g in self.gpus]
        return d

    @classmethod
    def from_dict(cls, data: Any) -> ChargeRecord | None:
        """The record of a stored row (any version), or None when it carries no figures."""
        return parse(data)


def parse(data: Any, _depth: int = 0) -> ChargeRecord | None:
    """Tolerant reader for ``charges.usage`` rows of every version (see the module text)."""
    if not isinstance(data, Mapping) or _depth > 3:
        return None
    version = _int(data.get("version"))
    force = bool(data.get("unmeasured"))  # an explicit mark on the whole record
    gpus = _gpu_entries(data, force)
    if gpus is None:
        for key in _NESTED:
            inner = data.get(key)
            if isinstance(inner, Mapping):
                found = parse(inner, _depth + 1)
                if found is not None:
                    if force:
                        found = replace(found, gpus=tuple(
                            replace(g, measured=False, busy_ms=0) for g in found.gpus))
                    return _with_context(found, data)
        line = GpuCharge.from_dict(data, force)
        if line is None:
            return None
        gpus = (line,)
    rec = _with_context(ChargeRecord(gpus=gpus, version=version or 1), data)
    if rec.amount is None:  # v1: the total was the charge row's amount; a policy result's
        rec = replace(rec, amount=_int(data.get("total")))
    return rec


def _gpu_entries(data: Mapping[str, Any], force: bool) -> tuple[GpuCharge, ...] | None:
    for key in _LISTS:
        items = data.get(key)
        if isinstance(items, list):
            lines = [GpuCharge.from_dict(i, force) for i in items if isinstance(i, Mapping)]
            lines = [x for x in lines if x is not None]
            if lines:
                rate = _int(data.get("rate_ppm"))  # a policy result: one rate for all lines
                return tuple(replace(x, rate_ppm=x.rate_ppm or rate) for x in lines)
            return None
    by_type = data.get("by_type")
    if isinstance(by_type, list) and by_type and all(
            isinstance(g, Mapping) and "gpus" in g for g in by_type):
        # the reconciler's v1 rows: one entry per GPU type with a GPU count, never measured
        out = []
        for g in by_type:
            count, held = _int(g.get("gpus")) or 0, _int(g.get("held_ms")) or 0
            for _ in range(count):
                out.append(GpuCharge(index=None, held_ms=held // count, measured=False,
                                     gpu_type=_str(g.get("gpu_type")),
                                     rate_ppm=_int(g.get("rate_ppm"))))
        return tuple(out) or None
    return None


def _with_context(rec: ChargeRecord, data: Mapping[str, Any]) -> ChargeRecord:
    values = {}
    for name in ("policy", "floor", "source", "node", "state"):
        if rec.__dict__[name] is None and _str(data.get(name)) is not None:
            values[name] = _str(data.get(name))
    for name in ("amount", "allocated", "measured_amount", "restart", "elapsed_s",
                 "uncapped_amount"):
        if rec.__dict__[name] is None and _int(data.get(name)) is not None:
            values[name] = _int(data.get(name))
    for name in ("start", "end"):
        v = data.get(name)
        if rec.__dict__[name] is None and isinstance(v, (int, float)) and not isinstance(v, bool):
            values[name] = float(v)
    return replace(rec, **values) if values else rec


def _int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if isinstance(value, float) and value >= 0:
        return int(value)
    return None


def _idle(value: Any, held: int, measured: bool) -> int | None:
    """An idle figure of a measured GPU, at most its held time."""
    v = _int(value)
    return min(v, held) if measured and v is not None else None


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None
