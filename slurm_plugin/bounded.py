"""Slurm index lists (``0-3,7``: GPU indices, task ids), expanded only within a bound.

The count a list stands for is added up range by range BEFORE anything is allocated: a list
over the bound raises :class:`TooLarge` (a ``ValueError``) without building it, so a short
``0-999999999`` or a 14 KB list of ranges costs microseconds, not gigabytes. Standard library
only (the controller hooks may run on a bare system Python). The same result as
``slurm.expand_indices`` for every list within the bound. (Host lists are bounded by
``slurm.expand_hostlist`` itself: ``slurm.MAX_HOSTS``.)
"""

from __future__ import annotations

import re

MAX_GPUS = 1024  # GPU indices of one job on one node
MAX_DIGITS = 18  # one number of a list, before int() is asked to read it
_PART = re.compile(r"[^,]+")  # parts one by one: a long list is never split whole


class TooLarge(ValueError):
    """A list that stands for more entries than its bound allows."""


def _number(text: str) -> int:
    text = text.strip()
    if not text.isdigit() or len(text) > MAX_DIGITS:
        raise ValueError(f"not a number: {text[:24]!r}")
    return int(text)


def expand_indices(text: str | None, limit: int = MAX_GPUS) -> list[int]:
    """``0-1,3`` → ``[0, 1, 3]`` (empty parts, ``N/A`` and ``(null)`` skipped); a list of
    more than ``limit`` entries raises TooLarge before any of it is expanded."""
    ranges: list[tuple[int, int]] = []
    total = 0
    for m in _PART.finditer(text or ""):
        part = m.group()
        if part in ("N/A", "(null)"):
            continue
        lo, _, hi = part.partition("-")
        first, last = _number(lo), _number(hi or lo)
        total += max(0, last - first + 1)
        if total > limit:
            raise TooLarge(f"the list stands for more than {limit} entries")
        ranges.append((first, last))
    out: list[int] = []
    for first, last in ranges:
        out.extend(range(first, last + 1))
    return out
