"""Submit-path cost on the one-node test cluster (run as root after tests/cluster/up).

1. sbatch throughput, 4 concurrent submitters, GPU jobs kept pending (--hold), on the
   same slurmctld: A = a job_submit.lua that returns at once (the "without" case: the
   cluster keeps JobSubmitPlugins=lua, switching plugins needs a slurmctld restart),
   B = gpuledger's job_submit.lua reserving every job through the daemon. Runs are
   interleaved A B A B …; the queue is emptied between runs; the median B/A is reported.
2. Daemon round trip at the socket (persistent connection, like slurmctld's): p50/p99
   of ``ping`` and of ``reserve`` (a real hold: verify from cache + one DB transaction).

    .venv/bin/python benchmarks/submit_bench.py [--rounds 5] [--jobs 50]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ledger import config as config_mod
from ledger.daemon.client import Client
from ledger.service import Ledger

SCRIPT = REPO / "slurm_plugin" / "lua" / "job_submit.lua"
INSTALLED = Path("/etc/slurm/job_submit.lua")
CONF = Path("/etc/gpuledger/job_submit.conf")
SOCKET = Path("/run/gpuledger-bench/gpuledger.sock")
GL = str(Path(sys.executable).parent / "gpuledger")
NOOP = """function slurm_job_submit(job_desc, part_list, submit_uid) return slurm.SUCCESS end
function slurm_job_modify(job_desc, job_rec, part_list, modify_uid) return slurm.SUCCESS end
"""


def sh(*cmd: str) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)}: {out.stderr.strip()}")
    return out.stdout.strip()


def install(text: str) -> None:
    time.sleep(1.1)  # slurmctld reloads when the whole-second mtime moves
    tmp = INSTALLED.with_suffix(".tmp")
    tmp.write_text(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, INSTALLED)
    # the first submission after a change loads the script: do it outside the timing
    subprocess.run(["sbatch", "--hold", "-o", "/dev/null", "-t", "1", "--wrap", "true"],
                   capture_output=True)


def empty_queue() -> None:
    subprocess.run(["scancel", "-u", "root"], capture_output=True)
    for _ in range(100):
        if not sh("squeue", "-h", "-u", "root", "-t", "PD,R"):
            return
        time.sleep(0.1)


def submit_run(token: str, submitters: int, jobs: int) -> float:
    errors: list[str] = []

    def loop():
        for _ in range(jobs):
            out = subprocess.run(["sbatch", "--hold", "-o", "/dev/null", f"--gpu-token={token}",
                                  "--gres=gpu:h100:1", "-t", "1", "--wrap", "true"],
                                 capture_output=True, text=True)
            if out.returncode != 0:
                errors.append(out.stderr.strip())

    threads = [threading.Thread(target=loop) for _ in range(submitters)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise SystemExit(f"{len(errors)} submissions failed, e.g. {errors[0]}")
    return submitters * jobs / elapsed


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def socket_latency(token: str, n: int) -> dict[str, tuple[float, float]]:
    out = {}
    with Client(SOCKET) as c:
        for op, fields in (("ping", {}), ("reserve", None)):
            times = []
            for i in range(n):
                f = fields if fields is not None else {
                    "token": token, "gpus": 1, "type": "h100", "seconds": 60, "user": "root",
                    "account": "physics", "key": f"bench-{os.getpid()}-{i}"}
                t0 = time.perf_counter_ns()
                resp = c.call(op, **f)
                times.append((time.perf_counter_ns() - t0) / 1e6)
                assert resp["ok"] == "1", resp
            out[op] = (pct(times, 50), pct(times, 99))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--jobs", type=int, default=50, help="jobs per submitter per run")
    ap.add_argument("--submitters", type=int, default=4)
    ap.add_argument("--latency-n", type=int, default=2000)
    args = ap.parse_args()
    if os.geteuid() != 0 or not shutil.which("sbatch"):
        raise SystemExit("run as root on the test cluster (tests/cluster/up)")

    root = Path(tempfile.mkdtemp(prefix="gl-bench-"))
    cfg = root / "gpuledger.toml"
    old_conf = CONF.read_text() if CONF.exists() else None
    old_lua = INSTALLED.read_text() if INSTALLED.exists() else None
    daemon = None
    try:
        sh(GL, "--config", str(cfg), "init", "--cluster", "gpuledger")
        cfg.write_text(cfg.read_text().replace('socket = "/run/gpuledger/gpuledger.sock"',
                                               f'socket = "{SOCKET}"'))
        sh(GL, "--config", str(cfg), "keys", "generate", "--kid", "bench")
        sh(GL, "--config", str(cfg), "account", "create", "physics")
        sh(GL, "--config", str(cfg), "rates", "set", "h100", "1.0")
        token = sh(GL, "--config", str(cfg), "token", "mint", "--account", "physics",
                   "--hours", "1000000")
        SOCKET.parent.mkdir(mode=0o755, exist_ok=True)
        daemon = subprocess.Popen([GL, "--config", str(cfg), "serve"],
                                  stderr=open(root / "daemon.log", "w"))
        for _ in range(100):
            if SOCKET.exists():
                break
            time.sleep(0.05)
        CONF.parent.mkdir(parents=True, exist_ok=True)
        CONF.write_text(f"socket = {SOCKET}\ntimeout = 1.0\non_ledger_unavailable = reject\n")
        hook = SCRIPT.read_text()

        rates: dict[str, list[float]] = {"A": [], "B": []}
        ratios = []
        print(f"sbatch throughput: {args.submitters} submitters x {args.jobs} GPU jobs "
              f"(--hold), {args.rounds} interleaved rounds")
        for r in range(args.rounds):
            for name, text in (("A", NOOP), ("B", hook)):
                empty_queue()
                install(text)
                empty_queue()
                rates[name].append(submit_run(token, args.submitters, args.jobs))
            ratios.append(rates["B"][-1] / rates["A"][-1])
            print(f"  round {r + 1}: no-op lua {rates['A'][-1]:7.1f} jobs/s   gpuledger "
                  f"{rates['B'][-1]:7.1f} jobs/s   ratio {ratios[-1]:.3f}")
        empty_queue()
        print(f"median ratio (gpuledger / no-op lua): {statistics.median(ratios):.3f} "
              f"(goal >= 0.95); medians {statistics.median(rates['A']):.1f} vs "
              f"{statistics.median(rates['B']):.1f} jobs/s")
        holds = len(Ledger.from_config(config_mod.load(cfg)).holds(state="pending"))
        print(f"holds reserved during the runs: {holds}")

        lat = socket_latency(token, args.latency_n)
        for op, (p50, p99) in lat.items():
            print(f"socket round trip {op:8s} p50 {p50:.3f} ms  p99 {p99:.3f} ms "
                  f"(n={args.latency_n}; goal p99 <= 2 ms)")
        log = (root / "daemon.log").read_text()
        us = [int(m) for m in re.findall(r"op=reserve .* us=(\d+)", log)]
        if us:
            print(f"daemon-side reserve handling: p50 {pct(us, 50) / 1000:.3f} ms  "
                  f"p99 {pct(us, 99) / 1000:.3f} ms (n={len(us)})")
    finally:
        empty_queue()
        if daemon:
            daemon.terminate()
            daemon.wait(10)
        if old_conf is None:
            CONF.unlink(missing_ok=True)
        else:
            CONF.write_text(old_conf)
        install(old_lua if old_lua is not None else SCRIPT.read_text())
        empty_queue()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
