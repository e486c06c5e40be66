"""Idle GPUs: the one place that says what idle is, when a job is flagged, what idle time
cost and what a flagged job gets back.

A GPU is idle while its utilization stays below ``threshold_pct``; the node agent counts,
per GPU of a job, the idle time and the longest unbroken idle stretch (time it could not
observe breaks a stretch and never counts as idle: missing data never counts against a
job). These land in the charge record (``idle_ms``, ``idle_max_ms``).

- **Flagged**: a settlement is flagged when one of its GPUs stayed idle for at least
  ``flag_after_s`` in one stretch (0 turns flagging off).
- **Idle time** of a GPU in a record from before the agent counted it is its held time
  less its busy time (the reports' figure for those months).
- **What idle cost**: per GPU, the share of its charge that its idle time makes up,
  ``floor(charge × idle_ms / held_ms)`` (rounded down: the figure never overstates).
- **Refund**: a flagged settlement gets back ``floor(refund_share × idle cost)`` summed
  over its GPUs, as a journaled refund on its hold (``gpuledger idle send``); 0 by default.
- **Cancel**: with ``cancel_after_s`` > 0, the agent cancels a running job once *every*
  measured GPU of it has been idle for ``flag_after_s + cancel_after_s`` in one stretch
  (a grace period after the flag; off by default).

The settings are the ``[idle]`` table of gpuledger.toml (the agent reads the same table from
its own file); :func:`parse` checks them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING, Any

from . import schema
from .schema import setting

if TYPE_CHECKING:
    from .charge_record import ChargeRecord, GpuCharge

FULL_BP = 10_000


def _user_mail(value: str) -> str | None:
    if "{user}" not in value or "@" not in value:
        return 'must be an address pattern with {user}, e.g. "{user}@example.org"'
    try:
        value.format(user="x")
    except (KeyError, IndexError, ValueError):
        return "may name only {user}"
    return None


def _year(value: int) -> str | None:
    return "is more than a year" if value > 366 * 86400 else None


@dataclass(frozen=True)
class IdlePolicy:
    """Idle GPUs (ledger.idle): read by the daemon's idle digests and refunds, and by the
    node agent (which counts idle time and cancels) from its own file's [idle] table."""

    threshold_pct: Fraction = setting(  # noqa: RUF009 - a field with the schema's metadata
        Fraction(5), kind=schema.FRACTION, doc="a GPU below this utilization (%) is idle",
        check=lambda v: None if 0 < v <= 100 else "must be above 0 and at most 100")
    flag_after_s: int = setting(
        3600, kind=schema.SECONDS, check=_year,
        doc="one idle stretch this long flags the job (0: never)")
    refund_share: Fraction = setting(  # noqa: RUF009
        Fraction(0), kind=schema.FRACTION,
        check=lambda v: None if 0 <= v <= 1 else "must be between 0 and 1",
        doc="share of a flagged job's idle cost refunded to it (0..1)")
    cancel_after_s: int = setting(
        0, kind=schema.SECONDS, check=_year,
        doc="the agent cancels a wholly idle job this long after its flag (0: never)")
    user_mail: str | None = setting(
        None, kind=schema.STRING, check=_user_mail, example="{user}@example.org",
        doc="a user's mail address: their idle digests and the budget alerts of tokens "
            "scoped to them go there (else only to the account's report_to)")

    def problem(self) -> str | None:
        if self.cancel_after_s and not self.flag_after_s:
            return ("cancel_after_s needs flag_after_s (jobs are cancelled a grace period "
                    "after they are flagged)")
        if self.refund_share and not self.flag_after_s:
            return "refund_share needs flag_after_s (only flagged jobs get a refund)"
        return None

    @property
    def threshold_bp(self) -> int:
        """The threshold in basis points of utilization (what the agent compares)."""
        return int(self.threshold_pct * 100)

    @property
    def cancel_at_ms(self) -> int | None:
        """The idle stretch (ms) after which the agent cancels a job, None when it never does."""
        if not self.cancel_after_s or not self.flag_after_s:
            return None
        return (self.flag_after_s + self.cancel_after_s) * 1000

    def is_idle(self, util_bp: int) -> bool:
        return util_bp < self.threshold_bp

    def flagged(self, record: ChargeRecord) -> bool:
        """Whether one GPU of the settlement stayed idle ``flag_after_s`` in one stretch."""
        return bool(self.flag_after_s) and any(
            (g.idle_max_ms or 0) >= self.flag_after_s * 1000 for g in record.gpus)

    def refund(self, record: ChargeRecord) -> int:
        """What a flagged settlement gets back (0 when it is not flagged)."""
        if not self.refund_share or not self.flagged(record):
            return 0
        return sum(int(idle_cost(g) * self.refund_share) for g in record.gpus)

    def recipients(self, user: str) -> list[str]:
        return [self.user_mail.format(user=user)] if self.user_mail and user else []


def idle_ms(g: GpuCharge) -> int:
    """A GPU's idle time: what the agent counted below the threshold; for a record from
    before the agent counted it (no ``idle_ms``), its held time less its busy time. An
    unmeasured GPU has none."""
    if not g.measured:
        return 0
    if g.idle_ms is None:
        return max(0, g.held_ms - g.busy_ms)
    return min(g.held_ms, g.idle_ms)


def idle_cost(g: GpuCharge) -> int:
    """The share of a GPU's charge that its idle time makes up, rounded down."""
    charge = g.charge if g.charge is not None else 0
    if not g.held_ms or not charge:
        return 0
    return charge * idle_ms(g) // g.held_ms


def record_idle(record: ChargeRecord) -> tuple[int, int]:
    """(idle GPU-ms, what it cost) of one settlement."""
    return (sum(idle_ms(g) for g in record.gpus), sum(idle_cost(g) for g in record.gpus))


def parse(table: Mapping[str, Any], where: str = "[idle]") -> IdlePolicy:
    """The ``[idle]`` table; every bad value is a ConfigError naming it."""
    policy = schema.parse_table(IdlePolicy, dict(table), where)
    return dataclasses.replace(policy, user_mail=policy.user_mail or None)
