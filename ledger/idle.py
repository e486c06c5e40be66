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

from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING, Any

from .errors import ConfigError

if TYPE_CHECKING:
    from .charge_record import ChargeRecord, GpuCharge

FULL_BP = 10_000


@dataclass(frozen=True)
class IdlePolicy:
    threshold_pct: Fraction = Fraction(5)  # below this utilization a GPU is idle
    flag_after_s: int = 3600  # one idle stretch this long flags the job (0: never)
    refund_share: Fraction = Fraction(0)  # share of the idle cost refunded to a flagged job
    cancel_after_s: int = 0  # grace after the flag before the agent cancels (0: never)
    user_mail: str | None = None  # "{user}@example.org": where a user's digest goes

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
    known = {"threshold_pct", "flag_after_s", "refund_share", "cancel_after_s", "user_mail"}
    unknown = sorted(set(table) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown setting(s) {', '.join(unknown)} "
                          f"(known: {', '.join(sorted(known))})")
    d = IdlePolicy()
    threshold = _fraction(table.get("threshold_pct", d.threshold_pct), where, "threshold_pct")
    if not 0 < threshold <= 100:
        raise ConfigError(f"{where}: threshold_pct must be above 0 and at most 100")
    share = _fraction(table.get("refund_share", d.refund_share), where, "refund_share")
    if not 0 <= share <= 1:
        raise ConfigError(f"{where}: refund_share must be between 0 and 1")
    flag = _seconds(table.get("flag_after_s", d.flag_after_s), where, "flag_after_s")
    cancel = _seconds(table.get("cancel_after_s", d.cancel_after_s), where, "cancel_after_s")
    if cancel and not flag:
        raise ConfigError(f"{where}: cancel_after_s needs flag_after_s (jobs are cancelled "
                          "a grace period after they are flagged)")
    if share and not flag:
        raise ConfigError(f"{where}: refund_share needs flag_after_s (only flagged jobs "
                          "get a refund)")
    mail = table.get("user_mail")
    if mail is not None:
        if not isinstance(mail, str) or "{user}" not in mail or "@" not in mail:
            raise ConfigError(f"{where}: user_mail must be an address pattern with {{user}}, "
                              "e.g. \"{user}@example.org\"")
        try:
            mail.format(user="x")
        except (KeyError, IndexError, ValueError):
            raise ConfigError(f"{where}: user_mail may name only {{user}}") from None
    return IdlePolicy(threshold, flag, share, cancel, mail or None)


def _fraction(value: Any, where: str, name: str) -> Fraction:
    if isinstance(value, Fraction):
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(f"{where}: {name} must be a number")
    try:
        return Fraction(str(value))
    except (ValueError, ZeroDivisionError):
        raise ConfigError(f"{where}: {name} must be a number, got {value!r}") from None


def _seconds(value: Any, where: str, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{where}: {name} must be a whole number of seconds ≥ 0")
    if value > 366 * 86400:
        raise ConfigError(f"{where}: {name} is more than a year")
    return value
