"""Node-agent cost with 8 fake GPUs: time per sampling round, CPU share and RSS.

    .venv/bin/python benchmarks/agent_bench.py --minutes 10

The fake libnvidia-ml (tests/fakenvml) runs Python callbacks where the real
library runs C and driver ioctls, so the figures cover the agent's own work
plus the fake's, not the driver's time. Goals: < 0.5 % of one core, < 60 MB RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from fakenvml import FakeClock, FakeNvmlLib, WallClock, install
from fakenvml.scenario import eight_h100

from slurm_plugin.agent import client
from slurm_plugin.agent.core import Agent
from slurm_plugin.agent.server import AgentServer
from slurm_plugin.agent.spool import Spool

CPU_GOAL_PCT = 0.5
RSS_GOAL_MB = 60.0


def rss_mb() -> tuple[float, float]:
    """(current, peak) resident set size in MB from /proc/self/status."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return fields["VmRSS"], fields["VmHWM"]


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def specs(n: int) -> list[tuple[str, ...]]:
    return [(f"GPU-h100-{i:04d}",) for i in range(n)]


def time_rounds(rounds: int, spool_dir: str) -> dict[str, float]:
    """µs per round with a fake clock: full tick (8 GPUs, one job, spool) and sampling only."""
    clock = FakeClock()
    with install(FakeNvmlLib(eight_h100(), clock)):
        agent = Agent(Spool(spool_dir), specs(8), clock=clock)
        agent.start()
        agent.tick()
        agent.register(1, 0, list(range(8)))
        ticks, samples = [], []
        uuids = agent.all_uuids()
        for _ in range(rounds):
            clock.advance(1000)
            t = time.perf_counter_ns()
            agent.tick()
            ticks.append((time.perf_counter_ns() - t) / 1000)
        for _ in range(rounds):
            clock.advance(1000)
            t = time.perf_counter_ns()
            agent.sample(uuids)
            samples.append((time.perf_counter_ns() - t) / 1000)
        busy = agent.summary(1, 0).gpus[0].busy_ms
        agent.stop()
    assert busy > 0
    q = statistics.quantiles(ticks, n=20)
    return {
        "tick_median": statistics.median(ticks), "tick_p95": q[18],
        "sample_median": statistics.median(samples),
    }


def live_run(minutes: float, interval: float, spool_dir: str, sock: str) -> dict[str, float]:
    """The real server loop on the wall clock, one job holding all 8 GPUs."""
    clock = WallClock()
    with install(FakeNvmlLib(eight_h100(), clock)):
        agent = Agent(Spool(spool_dir), specs(8), clock=clock)
        agent.start()
        server = AgentServer(agent, sock, interval)
        loop = asyncio.new_event_loop()
        th = threading.Thread(target=loop.run_until_complete, args=(server.serve(),), daemon=True)
        th.start()
        while True:
            try:
                client.request({"op": "ping"}, sock, timeout=1)
                break
            except client.AgentUnreachable:
                time.sleep(0.01)
        bindings = client.register(42, 0, list(range(8)), socket_path=sock)
        assert all(b.measured for b in bindings), bindings
        time.sleep(min(5.0, minutes * 6))  # let imports and first rounds settle
        rounds0, cpu0, t0 = server.rounds, cpu_s(), time.monotonic()
        time.sleep(minutes * 60)
        cpu, wall, rounds = cpu_s() - cpu0, time.monotonic() - t0, server.rounds - rounds0
        rss, hwm = rss_mb()
        usage = client.summary(42, 0, socket_path=sock)
        loop.call_soon_threadsafe(server.stop_event.set)
        th.join(10)
        agent.stop()
    assert usage is not None and len(usage.gpus) == 8
    return {"cpu_pct": 100 * cpu / wall, "wall_s": wall, "rounds": rounds,
            "rss_mb": rss, "hwm_mb": hwm, "held_s": usage.gpus[0].held_ms / 1000}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0, help="live run length (default 10)")
    ap.add_argument("--interval", type=float, default=1.0, help="sampling interval, s")
    ap.add_argument("--rounds", type=int, default=2000, help="rounds for the per-round timing")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(dir="/tmp", prefix="glbench") as d:
        r = time_rounds(a.rounds, f"{d}/spool-timing")
        print(f"agent_bench: 8 fake H100, one job on all 8, spool with fsync in {d}")
        print(f"per round (sample 8 GPUs + account + spool write): median {r['tick_median']:.0f} us,"
              f" p95 {r['tick_p95']:.0f} us; sampling alone: median {r['sample_median']:.0f} us")
        live = live_run(a.minutes, a.interval, f"{d}/spool-live", f"{d}/agent.sock")
    cpu_ratio = live["cpu_pct"] / CPU_GOAL_PCT
    rss_ratio = live["hwm_mb"] / RSS_GOAL_MB
    print(f"live run: {live['wall_s']:.0f} s, {live['rounds']} rounds at {a.interval:g} s,"
          f" job held {live['held_s']:.0f} s")
    print(f"CPU: {live['cpu_pct']:.3f} % of one core (goal < {CPU_GOAL_PCT} %: {cpu_ratio:.2f}x goal)")
    print(f"RSS: {live['rss_mb']:.1f} MB, peak {live['hwm_mb']:.1f} MB"
          f" (goal < {RSS_GOAL_MB:.0f} MB: {rss_ratio:.2f}x goal)")
    print("verdict:", "within goals" if cpu_ratio < 1 and rss_ratio < 1 else "OVER GOAL")


if __name__ == "__main__":
    main()
