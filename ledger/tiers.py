"""Tiers: rate multipliers by partition, by QOS and by time of use (off-peak windows).

* ``partition NAME M``: jobs that run in partition NAME pay M × the rate (a preemptible
  ``scavenger`` at 0.25); a partition without a multiplier pays 1.
* ``qos NAME M``: jobs of QOS NAME pay M × (``premium`` at 2); no multiplier: 1.
* ``offpeak HH:MM-HH:MM M``: every second of a job's run that falls in the window, in the
  site's time zone, pays M × (a window may wrap midnight; windows never overlap, and all
  share one zone). The rest of the run pays 1.

A second of a run pays rate × partition × QOS × time-of-use, the product kept exactly in
parts per million squared and rounded up to a whole ppm (:func:`combine`). The hold takes
the worst case: the largest multiplier among the candidate partitions, the QOS's, and the
largest time-of-use multiplier (at least 1: the job may run outside every window). Every
change is a journaled ledger operation, like a rate.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from sqlalchemy import Connection, delete, insert, select, update

from .amounts import PPM
from .errors import InvalidInput, NotFound
from .journal import Tx
from .models import Multiplier

KINDS = ("partition", "qos", "offpeak")
MU = Multiplier.__table__
_WINDOW = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-3]|24):([0-5]\d)$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def combine(*ppms: int) -> int:
    """The product of multipliers in ppm, rounded up to a whole ppm."""
    num, den = PPM, 1
    for p in ppms:
        num *= p
        den *= PPM
    return -((-num) // den)


def parse_window(text: str) -> tuple[int, int]:
    """``22:00-06:00`` → (1320, 360) minutes after local midnight; start ≠ end."""
    m = _WINDOW.match(text.strip())
    if not m:
        raise InvalidInput(f"not an off-peak window {text!r} (HH:MM-HH:MM, e.g. 22:00-06:00)")
    start, end = int(m.group(1)) * 60 + int(m.group(2)), int(m.group(3)) * 60 + int(m.group(4))
    if end > 1440 or start == end % 1440:
        raise InvalidInput(f"off-peak window {text!r} is empty or longer than a day")
    return start, end


def _minutes(start: int, end: int) -> list[tuple[int, int]]:
    """A window as intervals of one day's minutes (a wrap past midnight is two)."""
    return [(start, end)] if start < end else [(start, 1440), (0, end)]


def check_zone(zone: str) -> ZoneInfo:
    try:
        return ZoneInfo(zone)
    except (ZoneInfoNotFoundError, ValueError):
        raise InvalidInput(f"unknown time zone {zone!r} (e.g. Europe/Berlin, UTC)") from None


@dataclass(frozen=True)
class Tiers:
    """Every multiplier of the ledger (ppm), as the pricing reads them."""

    partition: dict[str, int] = field(default_factory=dict)
    qos: dict[str, int] = field(default_factory=dict)
    offpeak: tuple[tuple[str, int], ...] = ()  # (window, ppm)
    zone: str | None = None

    @classmethod
    def from_rows(cls, rows: Iterable) -> Tiers:
        part, qos, off, zone = {}, {}, [], None
        for r in rows:
            if r.kind == "partition":
                part[r.name] = r.multiplier_ppm
            elif r.kind == "qos":
                qos[r.name] = r.multiplier_ppm
            elif r.kind == "offpeak":
                off.append((r.name, r.multiplier_ppm))
                zone = r.zone
        return cls(part, qos, tuple(sorted(off)), zone)

    @property
    def empty(self) -> bool:
        return not (self.partition or self.qos or self.offpeak)

    def partition_ppm(self, partition: str | None) -> int:
        return self.partition.get(partition or "", PPM)

    def qos_ppm(self, qos: str | None) -> int:
        """A QOS's multiplier; for a list ``a,b`` (the job may run in either) the largest."""
        return max((self.qos.get(q, PPM) for q in (qos or "").split(",")), default=PPM)

    def hold_ppm(self, partitions: Iterable[str], qos: str | None) -> int:
        """The worst case a hold is priced at (see the module text)."""
        part = max((self.partition_ppm(p) for p in partitions), default=PPM)
        time = max([PPM] + [ppm for _, ppm in self.offpeak])
        return combine(part, self.qos_ppm(qos), time)

    def run_ppm(self, partition: str | None, qos: str | None) -> int:
        """Partition × QOS for a run that ran in ``partition`` (time of use apart); a
        partition list ``a,b`` (not known which one ran): the largest."""
        part = max((self.partition_ppm(p) for p in (partition or "").split(",")), default=PPM)
        return combine(part, self.qos_ppm(qos))

    def terms(self, partition: str | None, qos: str | None, start: float | None,
              end: float | None):
        """(partition × QOS multiplier, time-of-use split of a GPU's held ms) for a run in
        ``partition`` from ``start`` to ``end`` (epoch seconds; unknown: no split)."""
        run = self.run_ppm(partition, qos)
        if not self.offpeak or start is None or end is None:
            return run, None
        return run, lambda held_ms: self.segments(start, end, held_ms)

    def segments(self, start: float, end: float, held_ms: int) -> list[tuple[str | None, int, int]]:
        """``held_ms`` of a run from ``start`` to ``end`` (epoch seconds) split by time of use:
        [(window or None, ms, time-of-use ppm)], the ms summing to ``held_ms`` exactly."""
        if not self.offpeak or held_ms <= 0 or end <= start:
            return [(None, held_ms, PPM)]
        zone = ZoneInfo(self.zone or "UTC")
        out = []
        for window, ppm in self.offpeak:
            seconds = _overlap(start, end, parse_window(window), zone)
            ms = min(held_ms, round(seconds * held_ms / (end - start)))
            if ms:
                out.append((window, ms, ppm))
        rest = held_ms - sum(ms for _, ms, _ in out)
        if rest < 0:  # rounding of several windows: trim the last
            w, ms, ppm = out[-1]
            out[-1], rest = (w, ms + rest, ppm), 0
        return ([(None, rest, PPM)] if rest else []) + out


def _overlap(start: float, end: float, window: tuple[int, int], zone: ZoneInfo) -> float:
    """Seconds of [start, end) inside the daily window, in ``zone`` (DST-aware)."""
    first = datetime.fromtimestamp(start, zone).date() - timedelta(days=1)
    last = datetime.fromtimestamp(end, zone).date()
    total, day = 0.0, first
    while day <= last:
        for lo, hi in _minutes(*window):
            a = _at(day, lo, zone)
            b = _at(day, hi, zone)
            total += max(0.0, min(end, b) - max(start, a))
        day += timedelta(days=1)
    return total


def _at(day: date, minute: int, zone: ZoneInfo) -> float:
    base = datetime(day.year, day.month, day.day, tzinfo=zone)
    if minute >= 1440:
        nxt = day + timedelta(days=1)
        return datetime(nxt.year, nxt.month, nxt.day, tzinfo=zone).timestamp()
    return (base + timedelta(minutes=minute)).replace(tzinfo=zone).timestamp()


class TierOps:
    """Mixin over LedgerBase: set, unset and read multipliers (journaled like rates)."""

    def set_multiplier(self, kind: str, name: str, ppm: int, *, zone: str | None = None
                       ) -> int | None:
        """Set a multiplier (journaled); returns the one it replaces, None if new."""
        if kind not in KINDS:
            raise InvalidInput(f"unknown tier {kind!r}: partition, qos or offpeak")
        if kind == "offpeak":
            window = parse_window(name)
            name = name.strip()
            zone = zone or "UTC"
            check_zone(zone)
        elif not _NAME.match(name or ""):
            raise InvalidInput(f"invalid {kind} name {name!r}")
        self.limits.check_multiplier(ppm)

        def run(tx: Tx):
            rows = tx.conn.execute(select(MU)).all()
            if kind == "offpeak":
                for r in rows:
                    if r.kind != "offpeak" or r.name == name:
                        continue
                    if r.zone != zone:
                        raise InvalidInput(f"off-peak windows use the site's time zone, "
                                           f"{r.zone}; remove {r.name} to change it")
                    if _overlaps(window, parse_window(r.name)):
                        raise InvalidInput(f"off-peak window {name} overlaps {r.name}")
            old = next((r.multiplier_ppm for r in rows if (r.kind, r.name) == (kind, name)),
                       None)
            values = dict(multiplier_ppm=ppm, zone=zone if kind == "offpeak" else None,
                          updated_at=tx.now)
            if old is None:
                tx.conn.execute(insert(MU).values(kind=kind, name=name, **values))
            else:
                tx.conn.execute(update(MU).where(MU.c.kind == kind, MU.c.name == name)
                                .values(**values))
            tx.event("multiplier_set", data={"kind": kind, "name": name, "multiplier_ppm": ppm,
                                             "previous_ppm": old,
                                             **({"zone": zone} if kind == "offpeak" else {})})
            return old

        return self._write(run)

    def unset_multiplier(self, kind: str, name: str) -> int:
        def run(tx: Tx):
            old = tx.conn.execute(select(MU.c.multiplier_ppm).where(
                MU.c.kind == kind, MU.c.name == name)).scalar()
            if old is None:
                raise NotFound(f"no {kind} multiplier {name!r}")
            tx.conn.execute(delete(MU).where(MU.c.kind == kind, MU.c.name == name))
            tx.event("multiplier_unset", data={"kind": kind, "name": name, "previous_ppm": old})
            return old

        return self._write(run)

    def tier_quote(self, request) -> dict:
        """The multiplier a request is held at and the cheapest tier that would run it: the
        cheapest partition or QOS multiplier below 1 (with the request's partitions' time
        of use), and what the request would hold there. Tiers the job may not use (a
        partition it cannot reach, a QOS it lacks) are Slurm's to refuse."""
        from dataclasses import replace

        tiers = self.tiers()
        held = tiers.hold_ppm(request.partitions, request.qos)
        out: dict = {"multiplier_ppm": held}
        options = [("partition", p, replace(request, partition=p)) for p in tiers.partition] + \
            [("qos", q, replace(request, qos=q)) for q in tiers.qos]
        best = None
        for kind, name, req in options:
            ppm = tiers.hold_ppm(req.partitions, req.qos)
            if ppm < held and (best is None or ppm < best[2]):
                best = (kind, name, ppm, req)
        if best is not None:
            out.update(cheapest=f"{best[0]} {best[1]}", cheapest_multiplier_ppm=best[2],
                       cheapest_amount=self.price(best[3])[0])
        return out

    def tiers(self, conn: Connection | None = None) -> Tiers:
        if conn is not None:
            return Tiers.from_rows(conn.execute(select(MU)).all())
        with self._read() as c:
            return Tiers.from_rows(c.execute(select(MU)).all())


def _overlaps(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return any(lo1 < hi2 and lo2 < hi1 for lo1, hi1 in _minutes(*a) for lo2, hi2 in _minutes(*b))
