"""The pricing rule, in one place: which rate a hold and a charged GPU pay, and the cost.

* A GPU type without a rate of its own is priced at ``default``.
* A request that names no GPU type (``None`` or ``""``) may land on any type, so it is held
  at the highest rate there is; the settlement then charges each GPU at the rate of the type
  it was allocated (a GPU whose type is unknown pays the hold's rate).
* A hold's cost is ``tasks × ceil(gpus × seconds × rate / 10⁶)`` (:func:`hold_cost`).

Every path decides through these functions: quotes, the checked reserve, the raw-SQL fast
path (which fetches :class:`RateCandidates` in its single round trip) and the settlement.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from sqlalchemy import Connection, func, select

from .amounts import cost
from .errors import Reason, Refusal
from .models import Rate

DEFAULT_RATE = "default"
R = Rate.__table__


def is_untyped(gpu_type: str | None) -> bool:
    """A request naming no GPU type: ``None`` or an empty/blank name."""
    return gpu_type is None or not gpu_type.strip()


@dataclass(frozen=True)
class RateCandidates:
    """The rates a request's price can depend on: its type's own, ``default``, the highest."""

    own: int | None
    default: int | None
    highest: int | None

    @classmethod
    def from_rates(cls, rates: Mapping[str, int], gpu_type: str | None) -> RateCandidates:
        own = None if is_untyped(gpu_type) else rates.get(gpu_type)
        return cls(own, rates.get(DEFAULT_RATE), max(rates.values(), default=None))


def hold_rate(gpu_type: str | None, rates: RateCandidates) -> int | None:
    """The rate a request is held at; None when nothing prices it (no own and no default)."""
    if is_untyped(gpu_type):
        return rates.highest
    return rates.own if rates.own is not None else rates.default


def hold_cost(gpus: int, seconds: int, tasks: int, rate_ppm: int) -> int:
    """What a hold of ``tasks`` × ``gpus`` × ``seconds`` at ``rate_ppm`` escrows."""
    return tasks * cost(gpus * seconds, rate_ppm)


def gpu_rate(gpu_type: str | None, rates: Mapping[str, int], hold_rate_ppm: int) -> int:
    """The rate one allocated GPU is charged at: its type's own, else ``default``; a GPU of
    unknown type pays the rate its hold was priced at."""
    if is_untyped(gpu_type):
        return hold_rate_ppm
    own = rates.get(gpu_type)
    if own is not None:
        return own
    default = rates.get(DEFAULT_RATE)
    return default if default is not None else hold_rate_ppm


def unpriced(gpu_type: str | None, token_id: str | None = None) -> Refusal:
    return Refusal(Reason.UNKNOWN_GPU_TYPE,
                   f"no rate for GPU type {gpu_type} and no default rate", token_id=token_id)


def rate_candidates(conn: Connection, gpu_type: str | None) -> RateCandidates:
    """The candidates from the ``rates`` table (one query)."""
    def rate_of(name: str):
        return select(R.c.rate_ppm).where(R.c.gpu_type == name).scalar_subquery()

    typed = not is_untyped(gpu_type)
    cols = [rate_of(DEFAULT_RATE), select(func.max(R.c.rate_ppm)).scalar_subquery()]
    if typed:
        cols.append(rate_of(gpu_type))
    row = conn.execute(select(*cols)).one()
    return RateCandidates(row[2] if typed else None, row[0], row[1])
