"""Ready-made fake nodes and the reference workload trace used by the tests."""

from __future__ import annotations

from .devices import FakeClock, FakeGpu, FakeMig, Phase, Workload, a100_mig, h100

GIB = 2**30

# idle 10 s, 50 % for 10 s, 100 % for 10 s, then idle again
TRACE = [
    Phase(10_000, 0, 70_000, 0),
    Phase(10_000, 50, 400_000, 1 * GIB),
    Phase(10_000, 100, 700_000, 4 * GIB),
    Phase(10_000, 0, 70_000, GIB // 2),
]


def trace() -> Workload:
    return Workload(list(TRACE))


def two_h100() -> list[FakeGpu]:
    """GPU 0 reports GPM SM activity; GPU 1 has no GPM and reports utilization rates."""
    g0, g1 = h100(0, trace()), h100(1, trace())
    g1.gpm = False
    return [g0, g1]


def mig_a100() -> FakeGpu:
    """A100 with two MIG instances (no GPM on A100, no per-instance utilization)."""
    return a100_mig(0, [FakeMig("MIG-a100-gi1", 1, workload=trace()),
                        FakeMig("MIG-a100-gi2", 2, workload=trace())])


def mig_h100() -> FakeGpu:
    """H100 in MIG mode: per-instance activity through nvmlGpmMigSampleGet."""
    g = FakeGpu("GPU-h100-mig", minor=0, util_supported=False, workload=trace(),
                migs=[FakeMig("MIG-h100-gi3", 3, name="NVIDIA H100 MIG 3g.40gb", workload=trace())])
    return g


def eight_h100() -> list[FakeGpu]:
    return [h100(i, trace()) for i in range(8)]


def run_until(agent, clock: FakeClock, t_ms: int, step: int = 1000) -> None:
    """Call agent.tick() on a `step` grid until t_ms after the clock's start."""
    while True:
        nxt = ((clock.ms - clock.t0) // step + 1) * step
        if nxt > t_ms:
            break
        clock.ms = clock.t0 + nxt
        agent.tick()


def at(clock: FakeClock, t_ms: int) -> None:
    clock.ms = clock.t0 + t_ms
