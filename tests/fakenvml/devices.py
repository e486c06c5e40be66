"""Fake GPUs driven by a fake clock: workload phases integrate into exact counters."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


class FakeClock:
    """Wall clock in integer milliseconds, moved only by the test."""

    def __init__(self, start_ms: int = 1_700_000_000_000) -> None:
        self.ms = start_ms
        self.t0 = start_ms

    def __call__(self) -> int:
        return self.ms

    def advance(self, ms: int) -> None:
        self.ms += ms


class WallClock(FakeClock):
    """The real clock in the FakeClock shape (for a fake GPU under a live agent)."""

    def __init__(self) -> None:
        super().__init__(time.time_ns() // 1_000_000)

    @property  # type: ignore[override]
    def ms(self) -> int:
        return time.time_ns() // 1_000_000

    @ms.setter
    def ms(self, value: int) -> None:
        pass


@dataclass(frozen=True)
class Phase:
    """A stretch of constant load."""

    ms: int
    util_pct: int = 0
    power_mw: int = 70_000
    mem_bytes: int = 0


@dataclass
class Workload:
    """Piecewise-constant load from clock.t0; the last phase lasts forever."""

    phases: list[Phase] = field(default_factory=lambda: [Phase(1, 0)])

    def _walk(self, t_ms: int):
        """Yield (phase, length) pieces covering [0, t_ms)."""
        left = t_ms
        for i, p in enumerate(self.phases):
            if left <= 0:
                return
            last = i == len(self.phases) - 1
            take = left if last else min(left, p.ms)
            yield p, take
            left -= take

    def at(self, t_ms: int) -> Phase:
        """The phase active just before t (so a reading at a phase's end sees it)."""
        cur = self.phases[0]
        for p, _ in self._walk(t_ms):
            cur = p
        return cur

    def active_pct_ms(self, t_ms: int) -> int:
        """Integral of util (percent x ms) over [0, t)."""
        return sum(p.util_pct * n for p, n in self._walk(t_ms))

    def energy_uj(self, t_ms: int) -> int:
        """Integral of power (mW x ms = microjoules) over [0, t)."""
        return sum(p.power_mw * n for p, n in self._walk(t_ms))


@dataclass
class FakeMig:
    """A MIG instance: memory and GPM only (no utilization, power or energy)."""

    uuid: str
    gpu_instance_id: int
    name: str = "NVIDIA A100-SXM4-80GB MIG 3g.40gb"
    workload: Workload = field(default_factory=Workload)
    errors: dict[str, int] = field(default_factory=dict)


@dataclass
class FakeGpu:
    """A physical GPU. `errors` maps an NVML function name to the code it returns."""

    uuid: str
    minor: int
    name: str = "NVIDIA H100 80GB HBM3"
    gpm: bool = True
    util_supported: bool = True
    total_mem: int = 80 * 2**30
    energy_base_mj: int = 5_000_000
    workload: Workload = field(default_factory=Workload)
    migs: list[FakeMig] = field(default_factory=list)
    mig_slots: int = 7
    errors: dict[str, int] = field(default_factory=dict)
    lost: bool = False

    @property
    def mig_enabled(self) -> bool:
        return bool(self.migs)


def h100(n: int, workload: Workload | None = None) -> FakeGpu:
    return FakeGpu(f"GPU-h100-{n:04d}", minor=n, workload=workload or Workload())


def a100_mig(minor: int, migs: list[FakeMig], *, gpm: bool = False) -> FakeGpu:
    """An A100 in MIG mode; A100 has no GPM, so its instances report no activity."""
    return FakeGpu(
        f"GPU-a100-{minor:04d}", minor=minor, name="NVIDIA A100-SXM4-80GB", gpm=gpm,
        util_supported=False, migs=migs,
    )
