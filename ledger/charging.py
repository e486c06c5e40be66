"""The charge policy: the one place that turns measured GPU usage into an amount.

``charge_gpus`` is what the settlement calls (the epilog with the agent's figures, the
reconciler with Slurm's elapsed time): each GPU at its type's rate (``ledger.pricing``),
under the site policy, giving the amount and the :class:`ChargeRecord` stored with it.

Amounts are integer GPU-seconds at the reference rate. Per GPU:
  allocated = ceil(held_ms * rate_ppm / 10^9)
  measured  = ceil(min(held_ms, max(busy_ms + gaps_ms, ceil(floor * held_ms))) * rate_ppm / 10^9)
Time the agent could not observe (gaps_ms) counts as busy, and a GPU that was not
measured at all pays its held time: missing data never lowers a charge.

A share of a GPU (s of its S shards, ``ledger.shares``) pays s/S of that:
  allocated = ceil(held_ms * rate_ppm * s / (S * 10^9))
The GPU's busy time is the whole GPU's (other jobs share it), so a share is settled on its
held time under either policy, its line marked unmeasured with the reason.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from decimal import Decimal
from fractions import Fraction
from typing import Any, Protocol

from .amounts import PPM
from .charge_record import ChargeRecord, GpuCharge
from .pricing import gpu_rate, share_cost
from .tiers import combine

POLICIES = ("allocated", "measured")
DEFAULT_FLOOR = Fraction(1, 4)
_MS_PPM = 1000 * 1_000_000  # ms x ppm per reference GPU-second


class GpuUsageLike(Protocol):
    """What the policy reads from a GPU's usage record (e.g. agent GpuUsage)."""

    index: int
    uuid: str | None
    held_ms: int
    busy_ms: int
    energy_mj: int
    peak_mem_bytes: int
    measured: bool


@dataclass(frozen=True)
class ChargeLine:
    """One GPU's figures and both amounts; `charge` is the one the policy picked."""

    index: int
    uuid: str | None
    held_ms: int
    busy_ms: int
    gaps_ms: int
    energy_mj: int
    peak_mem_bytes: int
    measured: bool
    billed_ms: int  # time the policy charged for
    allocated: int
    measured_amount: int
    charge: int
    reason: str | None = None  # why the GPU was not measured, when it was not
    tiers: tuple[dict, ...] = ()  # what each tier cost (empty: every second at 1.0)


@dataclass(frozen=True)
class ChargeResult:
    """Per-GPU lines and totals (integers, reference GPU-seconds)."""

    policy: str
    rate_ppm: int
    floor: str  # exact fraction as text, e.g. "1/4"
    lines: tuple[ChargeLine, ...]
    total: int
    allocated_total: int
    measured_total: int

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["lines"] = [asdict(line) for line in self.lines]
        return d


def _ceil_div(a: int, b: int) -> int:
    return -((-a) // b)


def as_fraction(floor: float | str | Decimal | Fraction) -> Fraction:
    """An exact floor in [0, 1]; floats go through their shortest text form (0.1 -> 1/10)."""
    if isinstance(floor, bool):
        raise TypeError("floor must be a number, not a bool")
    f = Fraction(str(floor)) if isinstance(floor, float) else Fraction(floor)
    if not 0 <= f <= 1:
        raise ValueError(f"floor must be between 0 and 1, got {floor}")
    return f


def _get(u: GpuUsageLike | Mapping[str, Any], name: str, default: Any = None) -> Any:
    if isinstance(u, Mapping):
        return u.get(name, default)
    return getattr(u, name, default)


def _nonneg(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return value


SHARED_REASON = "a share of the GPU: its busy time is the whole GPU's"


Split = Callable[[int], list[tuple[str | None, int, int]]]


def _scaled(parts: list[tuple[str | None, int, int]], ms: int, held: int
            ) -> list[tuple[str | None, int, int]]:
    """The held time's split by time of use, applied to ``ms`` ≤ held (measured time)."""
    if ms == held or not held:
        return parts
    out = [(label, part * ms // held, ppm) for label, part, ppm in parts]
    rest = ms - sum(p for _, p, _ in out)
    label, part, ppm = out[0]
    out[0] = (label, part + rest, ppm)
    return out


def tiered_cost(share: tuple[int, int], ms: int, rate_ppm: int, run_ppm: int,
                parts: list[tuple[str | None, int, int]]) -> tuple[int, list[dict]]:
    """``ms`` of a GPU (or s/S of one) at ``rate_ppm`` × ``run_ppm`` (partition × QOS) ×
    each part's time-of-use multiplier: the amount, rounded up once per part, and the parts
    as the record shows them (tier, multiplier, ms, amount)."""
    out = []
    for label, part_ms, time_ppm in parts:
        mult = combine(run_ppm, time_ppm)
        out.append({"tier": label or "standard", "multiplier_ppm": mult, "ms": part_ms,
                    "amount": share_cost(share[0], share[1], part_ms, rate_ppm, _MS_PPM, mult)})
    return sum(p["amount"] for p in out), out


def charge_line(u: GpuUsageLike | Mapping[str, Any], rate_ppm: int, policy: str,
                floor: Fraction, share: tuple[int, int] = (1, 1), run_ppm: int = PPM,
                split: Split | None = None) -> ChargeLine:
    """One GPU's charge; ``share`` = (s, S): the job had s of the GPU's S shares;
    ``run_ppm`` the partition × QOS multiplier; ``split`` cuts held time by time of use."""
    held = _nonneg(_get(u, "held_ms"), "held_ms")
    busy = min(held, _nonneg(_get(u, "busy_ms", 0), "busy_ms"))
    gaps = min(held - busy, _nonneg(_get(u, "gaps_ms", 0) or 0, "gaps_ms"))
    measured = bool(_get(u, "measured", False)) and share[1] == 1
    if measured:
        floor_ms = _ceil_div(held * floor.numerator, floor.denominator)
        metered = min(held, max(busy + gaps, floor_ms))
    else:
        metered = held
    parts = split(held) if split else [(None, held, PPM)]
    allocated, alloc_tiers = tiered_cost(share, held, rate_ppm, run_ppm, parts)
    measured_amount, measured_tiers = tiered_cost(share, metered, rate_ppm, run_ppm,
                                                  _scaled(parts, metered, held))
    tiers = alloc_tiers if policy == "allocated" else measured_tiers
    return ChargeLine(
        index=int(_get(u, "index")),
        uuid=_get(u, "uuid"),
        held_ms=held,
        busy_ms=busy,
        gaps_ms=gaps,
        energy_mj=int(_get(u, "energy_mj", 0) or 0),
        peak_mem_bytes=int(_get(u, "peak_mem_bytes", 0) or 0),
        measured=measured,
        billed_ms=held if policy == "allocated" else metered,
        allocated=allocated,
        measured_amount=measured_amount,
        charge=allocated if policy == "allocated" else measured_amount,
        reason=None if measured else (SHARED_REASON if share[1] != 1 and _get(u, "measured")
                                      else _get(u, "reason")),
        tiers=tuple(tiers) if any(t["multiplier_ppm"] != PPM for t in tiers) else (),
    )


def charge_for(
    usage: Iterable[GpuUsageLike | Mapping[str, Any]],
    rate_ppm: int,
    policy: str,
    floor: float | str | Decimal | Fraction = DEFAULT_FLOOR,
) -> ChargeResult:
    """Charge a job's GPUs under `policy` ("allocated" or "measured") at `rate_ppm`."""
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    _nonneg(rate_ppm, "rate_ppm")
    f = as_fraction(floor)
    lines = tuple(charge_line(u, rate_ppm, policy, f) for u in usage)
    return ChargeResult(
        policy=policy,
        rate_ppm=rate_ppm,
        floor=str(f),
        lines=lines,
        total=sum(x.charge for x in lines),
        allocated_total=sum(x.allocated for x in lines),
        measured_total=sum(x.measured_amount for x in lines),
    )


def _idle_figure(u: GpuUsageLike | Mapping[str, Any], name: str, line: ChargeLine
                 ) -> int | None:
    """The agent's idle count of a measured GPU (``ledger.idle``), None when it has none."""
    v = _get(u, name)
    if not line.measured or isinstance(v, bool) or not isinstance(v, int) or v < 0:
        return None
    return min(v, line.held_ms)


def charge_gpus(usage: Iterable[GpuUsageLike | Mapping[str, Any]],
                types: Mapping[int, str | None], rates: Mapping[str, int], hold_rate_ppm: int,
                policy: str, floor: float | str | Decimal | Fraction = DEFAULT_FLOOR,
                shares: Mapping[int, tuple[int, int]] | None = None,
                run_ppm: int = PPM, split: Split | None = None,
                **context: Any) -> ChargeRecord:
    """A settlement's record: each GPU charged at its allocated type's rate under ``policy``.

    ``types`` maps a GPU index to its type (missing: unknown, charged at the hold's rate);
    ``shares`` maps a GPU index to (s, S) when the job had s of its S shares (missing: the
    whole GPU); ``run_ppm`` is the run's partition × QOS multiplier and ``split`` cuts a
    GPU's held time by time of use (``ledger.tiers``); ``context`` fills the record's
    source/node/restart/start/end/elapsed_s/state.
    """
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    f = as_fraction(floor)
    entries = []
    for u in usage:
        gpu_type = types.get(int(_get(u, "index")))
        rate = gpu_rate(gpu_type, rates, hold_rate_ppm)
        share = (shares or {}).get(int(_get(u, "index")), (1, 1))
        if not 0 < share[0] <= share[1]:
            raise ValueError(f"a share must be s of S with 0 < s <= S, got {share}")
        line = charge_line(u, _nonneg(rate, "rate_ppm"), policy, f, share, run_ppm, split)
        entries.append(GpuCharge(
            index=line.index, held_ms=line.held_ms, measured=line.measured,
            busy_ms=line.busy_ms if line.measured else 0, gaps_ms=line.gaps_ms,
            energy_mj=line.energy_mj, peak_mem_bytes=line.peak_mem_bytes, uuid=line.uuid,
            gpu_type=gpu_type, rate_ppm=rate, billed_ms=line.billed_ms,
            allocated=line.allocated, measured_amount=line.measured_amount,
            charge=line.charge, reason=line.reason,
            share=f"{share[0]}/{share[1]}" if share[1] != 1 else None,
            tiers=[dict(t) for t in line.tiers] or None,
            idle_ms=_idle_figure(u, "idle_ms", line), idle_max_ms=_idle_figure(
                u, "idle_max_ms", line)))
    entries.sort(key=lambda g: g.index)
    return ChargeRecord(
        gpus=tuple(entries), policy=policy, floor=str(f),
        amount=sum(g.charge for g in entries),
        allocated=sum(g.allocated for g in entries),
        measured_amount=sum(g.measured_amount for g in entries), **context)
