"""Report months: ``YYYY-MM`` (or ``previous``/``current``) → UTC bounds in datetimes and µs."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

from ledger.errors import InvalidInput
from ledger.journal import micros

DAY_US = 86_400 * 1_000_000
_MONTH = re.compile(r"^(\d{4})-(\d{2})$")


@dataclass(frozen=True)
class Month:
    year: int
    month: int

    @classmethod
    def parse(cls, text: str, now: datetime) -> Month:
        """``2026-11``; ``previous`` (or ``last``) and ``current`` relative to ``now``."""
        t = (text or "").strip().lower()
        if t in ("previous", "last"):
            return cls.containing(now).previous()
        if t in ("current", "this"):
            return cls.containing(now)
        m = _MONTH.match(t)
        if not m or not 1 <= int(m.group(2)) <= 12 or int(m.group(1)) < 1970:
            raise InvalidInput(f"not a month: {text!r} (expected YYYY-MM, e.g. 2026-11)")
        month = cls(int(m.group(1)), int(m.group(2)))
        if month.start > now:
            raise InvalidInput(f"month {month} has not started yet (today is "
                               f"{now.date().isoformat()})")
        return month

    @classmethod
    def containing(cls, when: datetime) -> Month:
        return cls(when.year, when.month)

    def __str__(self) -> str:
        return f"{self.year:04d}-{self.month:02d}"

    @property
    def start(self) -> datetime:
        return datetime(self.year, self.month, 1, tzinfo=UTC)

    @property
    def end(self) -> datetime:
        """Exclusive: the first instant of the next month."""
        return self.next().start

    @property
    def start_us(self) -> int:
        return micros(self.start)

    @property
    def end_us(self) -> int:
        return micros(self.end)

    @property
    def days(self) -> int:
        return (self.end - self.start).days

    def day(self, index: int) -> date:
        return (self.start + timedelta(days=index)).date()

    def day_start(self, number: int) -> datetime:
        """The first instant of day ``number`` (1-based) of the month."""
        return self.start + timedelta(days=number - 1)

    def previous(self) -> Month:
        return Month(self.year - 1, 12) if self.month == 1 else Month(self.year, self.month - 1)

    def next(self) -> Month:
        return Month(self.year + 1, 1) if self.month == 12 else Month(self.year, self.month + 1)

    def title(self) -> str:
        return self.start.strftime("%B %Y")
