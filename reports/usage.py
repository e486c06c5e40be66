"""Per-GPU measurements inside ``charges.usage``, whichever shape the settlement wrote.

The settlement path stores what the node agent measured: a job usage summary
(``{"gpus": [{"held_ms", "busy_ms", "measured", ...}]}``), a charge-policy result
(``{"lines": [...]}``), either nested under ``usage``/``charge``/``measurement``,
or one flat ``{"held_ms", "busy_ms", "measured"}``. A record marked unmeasured
(``"measured": false`` or ``"unmeasured": true`` at the top) counts as held time
without a busy figure. Anything else — no usage at all — yields ``None``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

_NESTED = ("usage", "measurement", "charge", "result")
_LISTS = ("gpus", "lines")


@dataclass(frozen=True)
class GpuFigures:
    held_ms: int
    busy_ms: int  # ≤ held_ms; 0 when not measured
    measured: bool


def _int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if isinstance(value, float) and value >= 0:
        return int(value)
    return None


def _line(d: Mapping[str, Any], force_unmeasured: bool) -> GpuFigures | None:
    held = _int(d.get("held_ms"))
    if held is None:
        return None
    measured = bool(d.get("measured", False)) and not force_unmeasured
    busy = _int(d.get("busy_ms")) if measured else 0
    if busy is None:  # claims to be measured but carries no busy figure
        measured, busy = False, 0
    return GpuFigures(held, min(busy, held), measured)


def gpu_figures(usage: Any, _depth: int = 0) -> list[GpuFigures] | None:
    """The per-GPU figures of one charge, or None when it carries none."""
    if not isinstance(usage, Mapping) or _depth > 3:
        return None
    unmeasured = usage.get("measured") is False or bool(usage.get("unmeasured"))
    for key in _LISTS:
        items = usage.get(key)
        if isinstance(items, list):
            lines = [_line(i, unmeasured) for i in items if isinstance(i, Mapping)]
            lines = [x for x in lines if x is not None]
            return lines or None
    for key in _NESTED:
        inner = usage.get(key)
        if isinstance(inner, Mapping):
            found = gpu_figures(inner, _depth + 1)
            if found is not None:
                if unmeasured:
                    return [GpuFigures(g.held_ms, 0, False) for g in found]
                return found
    line = _line(usage, unmeasured)
    return [line] if line is not None else None
