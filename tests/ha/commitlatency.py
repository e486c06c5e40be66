"""What synchronous replication adds to a commit: the same work, one client, on the Patroni
cluster (through HAProxy: every COMMIT waits for the synchronous standby) and on the
standalone server beside it (same PostgreSQL, same disk), interleaved in blocks so that
the machine's other load falls on both alike."""

from __future__ import annotations

import time
from collections.abc import Callable

import psycopg


def pct(values: list[float], p: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, round(p / 100 * (len(v) - 1)))]


def summary(ms: list[float]) -> dict:
    return {"n": len(ms), "p50_ms": round(pct(ms, 50), 3), "p99_ms": round(pct(ms, 99), 3),
            "max_ms": round(max(ms), 3)}


def interleaved(sides: dict[str, Callable[[], None]], blocks: int, per_block: int
                ) -> dict[str, list[float]]:
    """Run each side's ``op`` ``per_block`` times, side after side, ``blocks`` times; the
    milliseconds each op took, per side."""
    out: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(blocks):
        for name, op in sides.items():
            for _ in range(per_block):
                t0 = time.perf_counter()
                op()
                out[name].append((time.perf_counter() - t0) * 1000)
    return out


class RawCommits:
    """INSERT one row and COMMIT, on a connection of its own."""

    def __init__(self, conninfo: str):
        self.conn = psycopg.connect(conninfo)
        self.conn.execute("CREATE TABLE IF NOT EXISTS gl_commit_latency (n bigint)")
        self.conn.commit()
        self.n = 0

    def __call__(self) -> None:
        self.n += 1
        self.conn.execute("INSERT INTO gl_commit_latency VALUES (%s)", (self.n,))
        self.conn.commit()

    def close(self) -> None:
        self.conn.close()
