"""The charge policy: the one place that turns measured GPU usage into an amount.

Amounts are integer GPU-seconds at the reference rate. Per GPU:
  allocated = ceil(held_ms * rate_ppm / 10^9)
  measured  = ceil(min(held_ms, max(busy_ms + gaps_ms, ceil(floor * held_ms))) * rate_ppm / 10^9)
Time the agent could not observe (gaps_ms) counts as busy, and a GPU that was not
measured at all pays its held time: missing data never lowers a charge.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from decimal import Decimal
from fractions import Fraction
from typing import Any, Protocol

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


def charge_line(u: GpuUsageLike | Mapping[str, Any], rate_ppm: int, policy: str,
                floor: Fraction) -> ChargeLine:
    held = _nonneg(_get(u, "held_ms"), "held_ms")
    busy = min(held, _nonneg(_get(u, "busy_ms", 0), "busy_ms"))
    gaps = min(held - busy, _nonneg(_get(u, "gaps_ms", 0) or 0, "gaps_ms"))
    measured = bool(_get(u, "measured", False))
    if measured:
        floor_ms = _ceil_div(held * floor.numerator, floor.denominator)
        metered = min(held, max(busy + gaps, floor_ms))
    else:
        metered = held
    allocated = _ceil_div(held * rate_ppm, _MS_PPM)
    measured_amount = _ceil_div(metered * rate_ppm, _MS_PPM)
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
        reason=None if measured else _get(u, "reason"),
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
