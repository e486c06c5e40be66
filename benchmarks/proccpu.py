"""CPU time of processes, read from /proc (Linux): what a benchmark's side processes —
the database server, slurmctld, the gpuledger daemon and its writer — spent."""

from __future__ import annotations

import os
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> tuple[str, list[str]] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.index("(") + 1:text.rindex(")")], text[text.rindex(")") + 2:].split()


def cpu_s(pid: int | None, *, ended: bool = False) -> float:
    """CPU seconds used so far by ``pid`` and its live children (the daemon's writer);
    ``ended``: and by its children that ended (counted in the parent's cutime/cstime)."""
    if pid is None:
        return 0.0
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        stat = _stat(p)
        if stat is None:
            continue
        fields = stat[1]
        total += sum(int(f) for f in fields[11:15 if ended else 13])  # utime stime [cu cs]
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return total / TICK


def cpu_by_name(name: str) -> float:
    """CPU seconds used so far by every process called ``name``, with the children that
    ended (PostgreSQL's backends of closed connections, counted in the postmaster's)."""
    total = 0
    for stat_path in Path("/proc").glob("[0-9]*/stat"):
        stat = _stat(int(stat_path.parent.name))
        if stat is not None and stat[0] == name:
            total += sum(int(f) for f in stat[1][11:15])
    return total / TICK
