"""The pricing rule, in one place: which rate a hold and a charged GPU pay, and the cost.

* A GPU type without a rate of its own is priced at ``default``.
* A request that names no GPU type (``None`` or ``""``) may land on any type, so it is held
  at the highest rate there is; the settlement then charges each GPU at the rate of the type
  it was allocated (a GPU whose type is unknown pays the hold's rate).
* A MIG slice is a GPU type of its own (``1g.10gb``, or Slurm's ``nvidia_a100_3g.40gb``):
  with a rate of its own it pays that; without one it pays its profile's share of the
  ``default`` rate, N/7 for an ``Ng.…`` profile (the seven compute slices of A100, H100,
  H200), rounded up to a whole ppm (:func:`mig_share`). A30's quarter slices need rates of
  their own.
* A share of a GPU (``shard``, ``mps``; ``ledger.shares``) pays s/S of its GPU's rate: s the
  shares taken, S the shares that GPU is cut into (its shard count, 100 for MPS).
* A hold's cost is ``tasks × ceil(units × seconds × rate / (share × 10⁶))``
  (:func:`hold_cost`): ``units`` GPUs (share 1) or shares of GPUs cut into ``share``.
  Every amount is rounded UP to a whole reference GPU-second, once per task (a hold) or
  once per GPU (a charge): integer arithmetic, never in the payer's favour by more than
  one GPU-second per rounding.

Every path decides through these functions: quotes, the checked reserve, the raw-SQL fast
path (which fetches :class:`RateCandidates` in its single round trip) and the settlement.
"""

from __future__ import annotations

from collections.abc import Mapping
import re
from dataclasses import dataclass
from fractions import Fraction

from sqlalchemy import Connection, func, select

from .amounts import PPM
from .errors import Reason, Refusal
from .models import Rate

DEFAULT_RATE = "default"
R = Rate.__table__


MIG_SLICES = 7
_MIG = re.compile(r"(?:^|[_-])([1-7])g\.\d+gb$")


def is_untyped(gpu_type: str | None) -> bool:
    """A request naming no GPU type: ``None`` or an empty/blank name."""
    return gpu_type is None or not gpu_type.strip()


def mig_share(gpu_type: str | None) -> Fraction | None:
    """The share of a GPU a MIG profile type is (``3g.40gb`` → 3/7); None for other types."""
    m = _MIG.search(gpu_type or "")
    return Fraction(int(m.group(1)), MIG_SLICES) if m else None


def fallback_rate(gpu_type: str | None, default: int | None) -> int | None:
    """What a typed GPU without a rate of its own pays: a MIG profile its share of
    ``default`` (rounded up to a whole ppm), any other type ``default``."""
    if default is None:
        return None
    share = mig_share(gpu_type)
    if share is None:
        return default
    return -((-default * share.numerator) // share.denominator)


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
    return rates.own if rates.own is not None else fallback_rate(gpu_type, rates.default)


def share_cost(units: int, share: int, time_units: int, rate_ppm: int, per: int = PPM,
               multiplier_ppm: int = PPM) -> int:
    """ceil(units × time × rate × multiplier / (share × per)): ``units`` of a GPU cut into
    ``share`` (1: whole GPUs) for ``time_units`` (seconds with ``per`` = 10⁶, milliseconds
    with 10⁹) at ``rate_ppm`` times a tier's ``multiplier_ppm`` (``ledger.tiers``), in
    reference GPU-seconds."""
    return -((-units * time_units * rate_ppm * multiplier_ppm) // (share * per * PPM))


def hold_cost(gpus: int, seconds: int, tasks: int, rate_ppm: int, share: int = 1,
              multiplier_ppm: int = PPM) -> int:
    """What a hold of ``tasks`` × ``gpus`` × ``seconds`` at ``rate_ppm`` × ``multiplier_ppm``
    escrows; ``gpus`` counts shares of GPUs cut into ``share`` when it is above 1."""
    return tasks * share_cost(gpus, share, seconds, rate_ppm, PPM, multiplier_ppm)


def gpu_rate(gpu_type: str | None, rates: Mapping[str, int], hold_rate_ppm: int) -> int:
    """The rate one allocated GPU is charged at: its type's own, else ``default``; a GPU of
    unknown type pays the rate its hold was priced at."""
    if is_untyped(gpu_type):
        return hold_rate_ppm
    own = rates.get(gpu_type)
    if own is not None:
        return own
    fallback = fallback_rate(gpu_type, rates.get(DEFAULT_RATE))
    return fallback if fallback is not None else hold_rate_ppm


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
