"""Fake GPUs whose load a running job sets, for the agent on the real Slurm cluster.

A job "uses" fake GPU *m* (device minor *m*) by appending lines to the control file
``<dir>/gpu<m>``::

    <epoch_ms> <util_pct> <power_mw> <mem_bytes>

Each line starts a phase at that wall-clock time. The fake integrates the phases
exactly (utilization for GPM SM activity, power for the energy counter), so a
test can compute from the same file what the agent should have measured.

Run the real ``gpuledger agent`` over such GPUs with::

    python tests/fakenvml/live.py --control DIR --gpus h100:0,h100:1 -- [agent options]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `fakenvml` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fakenvml.devices import FakeGpu, Phase, WallClock, Workload
from fakenvml.library import FakeNvmlLib, install

IDLE = Phase(1, 0, 70_000, 0)
NAMES = {"h100": "NVIDIA H100 80GB HBM3", "a100": "NVIDIA A100-SXM4-80GB"}


def parse_line(line: str) -> tuple[int, Phase]:
    """One control line -> (epoch ms, phase); ValueError on anything else."""
    stamp, util, power, mem = (int(x) for x in line.split())
    if not 0 <= util <= 100 or power < 0 or mem < 0:
        raise ValueError(f"out of range: {line!r}")
    return stamp, Phase(1, util, power, mem)


def read_phases(path: Path, t0_ms: int = 0) -> list[tuple[int, Phase]]:
    """All phases of a control file, as (ms since t0, phase) in file order."""
    if not path.exists():
        return []
    return [(s - t0_ms, p) for s, p in
            (parse_line(ln) for ln in path.read_text().splitlines() if ln.strip())]


class LiveWorkload(Workload):
    """Piecewise-constant load read from a control file as the clock runs.

    History never changes once observed: a phase whose stamp is earlier than the
    last query starts at that query instead (a job racing the sampler).
    """

    def __init__(self, path: Path, t0_ms: int) -> None:
        super().__init__([IDLE])
        self.path = path
        self.t0 = t0_ms
        self._pos = 0
        self._last = 0
        self.changes: list[tuple[int, Phase]] = [(0, IDLE)]

    def _poll(self, t_ms: int) -> None:
        try:
            with self.path.open("rb") as f:
                f.seek(self._pos)
                data = f.read()
        except FileNotFoundError:
            data = b""
        end = data.rfind(b"\n") + 1
        self._pos += end
        for raw in data[:end].decode().splitlines():
            if not raw.strip():
                continue
            try:
                stamp, phase = parse_line(raw)
            except ValueError:
                print(f"fakenvml: ignoring control line {raw!r} in {self.path}", file=sys.stderr)
                continue
            start = max(stamp - self.t0, self._last, self.changes[-1][0])
            self.changes.append((start, phase))
        self._last = max(self._last, t_ms)

    def _walk(self, t_ms: int):
        self._poll(t_ms)
        for i, (start, phase) in enumerate(self.changes):
            end = self.changes[i + 1][0] if i + 1 < len(self.changes) else t_ms
            take = min(end, t_ms) - start
            if take > 0:
                yield phase, take

    def at(self, t_ms: int) -> Phase:
        self._poll(t_ms)
        cur = self.changes[0][1]
        for start, phase in self.changes:
            if start < t_ms:
                cur = phase
        return cur


def live_gpus(spec: str, control: Path, clock: WallClock) -> list[FakeGpu]:
    """`h100:0,h100:1,a100:2` -> fake GPUs (type:minor); A100s have no GPM."""
    gpus = []
    for item in spec.split(","):
        kind, _, minor = item.partition(":")
        m = int(minor)
        gpus.append(FakeGpu(f"GPU-fake-{kind}-{m:04d}", minor=m, name=NAMES[kind],
                            gpm=kind != "a100",
                            workload=LiveWorkload(control / f"gpu{m}", clock.t0)))
    return gpus


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="gpuledger agent over live fake GPUs")
    ap.add_argument("--control", type=Path, required=True, help="directory of control files")
    ap.add_argument("--gpus", default="h100:0,h100:1,a100:2,a100:3", help="type:minor,…")
    ap.add_argument("--epoch-ms", type=int, default=None,
                    help="integrate the counters from this wall-clock time (default: start), so "
                         "a restarted fake keeps its energy counters monotonic")
    ap.add_argument("agent_args", nargs=argparse.REMAINDER, help="-- then `gpuledger agent` options")
    args = ap.parse_args(argv)
    rest = args.agent_args[1:] if args.agent_args[:1] == ["--"] else args.agent_args
    from slurm_plugin.agent.cli import agent

    clock = WallClock()
    if args.epoch_ms is not None:
        clock.t0 = args.epoch_ms
    with install(FakeNvmlLib(live_gpus(args.gpus, args.control, clock), clock)):
        agent.main(args=rest, prog_name="gpuledger agent")


if __name__ == "__main__":
    main()
