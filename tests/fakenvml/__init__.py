"""A fake libnvidia-ml for tests: the real pynvml binding runs against fake GPUs."""

from .devices import FakeClock, FakeGpu, FakeMig, Phase, WallClock, Workload, a100_mig, h100
from .library import FakeNvmlLib, install

__all__ = [
    "FakeClock", "FakeGpu", "FakeMig", "FakeNvmlLib", "Phase", "WallClock", "Workload",
    "a100_mig", "h100", "install",
]
