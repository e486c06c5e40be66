"""Submit-path cost on the one-node test cluster (run as root after tests/cluster/up).

1. sbatch throughput, 4 concurrent submitters, jobs kept pending (--hold), on the same
   slurmctld, in interleaved rounds of: ``none`` = no job_submit plugin at all (slurm.conf
   without JobSubmitPlugins, slurmctld restarted), ``noop`` = a job_submit.lua that
   returns at once, ``durable`` = gpuledger's job_submit.lua with the daemon committing
   each reserve before it answers, ``fast`` = the same with ``[daemon] fast_reserve``
   (answered from memory, written in batches: ledger/daemon/fastpath.py); GPU jobs in
   each, and CPU jobs under ``none`` and ``fast``. The queue is emptied between runs; the
   medians of the per-round ratios are reported.
2. Daemon round trip at the socket (persistent connection, like slurmctld's): p50/p99 of
   ``ping`` and ``reserve`` on both daemons (a real hold each time).

Before and after in one run: ``--baseline-tree PATH`` (a git worktree of the older commit;
or ``--baseline-rev REV``, benchmarks/baseline.py) adds the variant ``base`` — that tree's
job_submit.lua and its daemon (``fast_reserve``, as ``fast``) — to every round, and reports
CPU per job over all the processes a submission touches (slurmctld, slurmdbd, munged, the
databases, the gpuledger daemon, the sbatch clients: benchmarks/proccpu.py) per variant,
and the ratios this tree / baseline.

    .venv/bin/python benchmarks/submit_bench.py [--rounds 5] [--jobs 50] [--baseline-tree PATH]
"""

from __future__ import annotations

import argparse
import os
import re
import resource
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

from benchmarks import baseline
from benchmarks.proccpu import cpu_by_name, cpu_s
from ledger import config as config_mod
from ledger.daemon.client import Client
from ledger.errors import LedgerError
from ledger.schema import set_keys
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


def submit_run(token: str, submitters: int, jobs: int, gpu: bool = True) -> float:
    errors: list[str] = []
    what = [f"--gpu-token={token}", "--gres=gpu:h100:1"] if gpu else []

    def loop():
        for _ in range(jobs):
            out = subprocess.run(["sbatch", "--hold", "-o", "/dev/null", *what,
                                  "-t", "1", "--wrap", "true"],
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


def socket_latency(socket_path: Path, token: str, n: int) -> dict[str, tuple[float, float]]:
    out = {}
    with Client(socket_path) as c:
        c.call("reserve", token=token, gpus=1, type="h100", seconds=60, user="root",
               account="physics", key=f"warm-{os.getpid()}")  # the fast path learns the token
        time.sleep(0.2)
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


SLURM_CONF = Path("/etc/slurm/slurm.conf")
PLUGIN_LINE = re.compile(r"(?m)^#?\s*JobSubmitPlugins=.*$")


def set_job_submit(enabled: bool) -> None:
    """JobSubmitPlugins=lua, or no job_submit plugin at all; slurmctld restarted."""
    text = SLURM_CONF.read_text()
    line = "JobSubmitPlugins=lua" if enabled else "#JobSubmitPlugins=lua"
    new = PLUGIN_LINE.sub(line, text) if PLUGIN_LINE.search(text) else text + line + "\n"
    if new == text:
        return
    SLURM_CONF.write_text(new)
    restart_slurmctld()


def restart_slurmctld() -> None:
    if subprocess.run(["systemctl", "is-active", "--quiet", "slurmctld"],
                      capture_output=True).returncode == 0:
        sh("systemctl", "restart", "slurmctld")
    else:
        pidfile = Path("/run/slurmctld.pid")
        if pidfile.exists():
            pid = int(pidfile.read_text().strip() or 0)
            try:
                os.kill(pid, 15)
            except ProcessLookupError:
                pid = 0
            while pid and Path(f"/proc/{pid}").exists():
                time.sleep(0.1)
        sh("/usr/sbin/slurmctld")
    for _ in range(300):
        if subprocess.run(["scontrol", "ping"], capture_output=True, text=True
                          ).stdout.count("UP"):
            subprocess.run(["sbatch", "--hold", "-o", "/dev/null", "-t", "1", "--wrap", "true"],
                           capture_output=True)  # the first submission warms it up
            return
        time.sleep(0.2)
    raise SystemExit("slurmctld did not come back")


def new_ledger(root: Path, socket_path: Path, fast: bool,
               gl: list[str] | None = None) -> tuple[Path, str]:
    gl = gl or [GL]
    cfg = root / "gpuledger.toml"
    sh(*gl, "--config", str(cfg), "init", "--cluster", "gpuledger")
    cfg.write_text(set_keys(cfg.read_text(), {"daemon": {
        "socket": str(socket_path), "slurm_user": "slurm", "fast_reserve": fast}}))
    sh(*gl, "--config", str(cfg), "keys", "generate", "--kid", "bench")
    sh(*gl, "--config", str(cfg), "account", "create", "physics")
    sh(*gl, "--config", str(cfg), "rates", "set", "h100", "1.0")
    token = sh(*gl, "--config", str(cfg), "token", "mint", "--account", "physics",
               "--hours", "1000000")
    return cfg, token


# every process a submission makes work, besides the gpuledger daemon and the sbatch clients
SIDE_PROCESSES = ("slurmctld", "slurmdbd", "munged", "mariadbd", "mysqld", "postgres")


def side_cpu() -> float:
    return sum(cpu_by_name(name) for name in SIDE_PROCESSES)


def children_cpu() -> float:
    """CPU seconds of this process's children that ended (the sbatch clients)."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--jobs", type=int, default=50, help="jobs per submitter per run")
    ap.add_argument("--submitters", type=int, default=4)
    ap.add_argument("--latency-n", type=int, default=2000)
    baseline.add_options(ap)
    args = ap.parse_args()
    if os.geteuid() != 0 or not shutil.which("sbatch"):
        raise SystemExit("run as root on the test cluster (tests/cluster/up)")
    with baseline.baseline_tree(args) as base:
        run_bench(args, base)


def run_bench(args: argparse.Namespace, base: Path | None) -> None:
    root = Path(tempfile.mkdtemp(prefix="gl-bench-"))
    old_conf = CONF.read_text() if CONF.exists() else None
    old_lua = INSTALLED.read_text() if INSTALLED.exists() else None
    old_slurm = SLURM_CONF.read_text()
    daemons: list[subprocess.Popen] = []
    try:
        SOCKET.parent.mkdir(mode=0o755, exist_ok=True)
        ledgers = {}
        pids: dict[str, int] = {}
        scripts = {"durable": SCRIPT.read_text(), "fast": SCRIPT.read_text()}
        trees = [("durable", False, None), ("fast", True, None)]
        if base is not None:  # the baseline's script and daemon, as "fast" here
            trees.append(("base", True, base))
            scripts["base"] = baseline.lua_script(base).read_text()
        for name, fast, tree in trees:
            gl = baseline.gpuledger(tree) if tree is not None else [GL]
            (root / name).mkdir()
            sock = SOCKET.with_name(f"{name}.sock")
            cfg, token = new_ledger(root / name, sock, fast, gl)
            daemons.append(subprocess.Popen([*gl, "--config", str(cfg), "serve"],
                                            stderr=open(root / f"{name}.log", "w")))
            pids[name] = daemons[-1].pid
            for _ in range(100):
                if sock.exists():
                    break
                time.sleep(0.05)
            ledgers[name] = (cfg, token, sock)
        CONF.parent.mkdir(parents=True, exist_ok=True)

        def use(name: str) -> None:
            if name == "none":
                set_job_submit(False)
                return
            set_job_submit(True)
            if name == "noop":
                install(NOOP)
                return
            CONF.write_text(f"socket = {ledgers[name][2]}\ntimeout = 1.0\n"
                            "on_ledger_unavailable = reject\n")
            install(scripts[name])

        runs = [("none", "gpu"), ("none", "cpu"), ("noop", "gpu"), ("durable", "gpu"),
                ("fast", "gpu"), ("fast", "cpu")]
        if base is not None:
            runs += [("base", "gpu"), ("base", "cpu")]
        rates: dict[tuple[str, str], list[float]] = {r: [] for r in runs}
        # CPU µs per job: slurmctld; the gpuledger daemon; every process (side processes,
        # the daemon, the sbatch clients)
        cpu: dict[tuple[str, str], list[tuple[float, float, float]]] = {r: [] for r in runs}
        print(f"sbatch throughput: {args.submitters} submitters x {args.jobs} jobs (--hold), "
              f"{args.rounds} interleaved rounds" + (f"; baseline {base}" if base else ""))
        for r in range(args.rounds):
            for name, kind in (runs if r % 2 == 0 else list(reversed(runs))):
                use(name)
                empty_queue()
                token = ledgers.get(name, (None, ledgers["fast"][1]))[1]
                before = (cpu_by_name("slurmctld"), cpu_s(pids.get(name)), side_cpu(),
                          children_cpu())
                rates[(name, kind)].append(submit_run(token, args.submitters, args.jobs,
                                                      gpu=kind == "gpu"))
                jobs = args.submitters * args.jobs
                daemon = cpu_s(pids.get(name)) - before[1]
                total = (side_cpu() - before[2]) + daemon + (children_cpu() - before[3])
                cpu[(name, kind)].append(((cpu_by_name("slurmctld") - before[0]) / jobs * 1e6,
                                          daemon / jobs * 1e6, total / jobs * 1e6))
            print(f"  round {r + 1}: " + "  ".join(
                f"{n}/{k} {rates[(n, k)][-1]:6.1f}" for n, k in runs) + " jobs/s")
        empty_queue()

        def ratio(a, b) -> float:
            return statistics.median(x / y for x, y in zip(rates[a], rates[b]))

        def cpu_ratio(a, b, i) -> float:
            return statistics.median(x[i] / y[i] for x, y in zip(cpu[a], cpu[b]) if y[i])

        print("median ratios (goal: GPU jobs >= 0.95 of no plugin, CPU jobs >= 0.99):")
        pairs = [
            ("fast GPU jobs / no plugin", ("fast", "gpu"), ("none", "gpu")),
            ("fast GPU jobs / no-op lua", ("fast", "gpu"), ("noop", "gpu")),
            ("durable GPU jobs / no plugin", ("durable", "gpu"), ("none", "gpu")),
            ("durable GPU jobs / no-op lua", ("durable", "gpu"), ("noop", "gpu")),
            ("no-op lua / no plugin", ("noop", "gpu"), ("none", "gpu")),
            ("CPU jobs through gpuledger / no plugin", ("fast", "cpu"), ("none", "cpu"))]
        if base is not None:
            pairs += [("baseline GPU jobs / no plugin", ("base", "gpu"), ("none", "gpu")),
                      ("this / baseline, GPU jobs", ("fast", "gpu"), ("base", "gpu")),
                      ("this / baseline, CPU jobs", ("fast", "cpu"), ("base", "cpu"))]
        for label, a, b in pairs:
            print(f"  {label:<40} {ratio(a, b):.3f}")
        print("medians (jobs/s): " + ", ".join(
            f"{n}/{k} {statistics.median(v):.1f}" for (n, k), v in rates.items()))
        print(f"CPU per job, medians (slurmctld; gpuledger daemon with its writer; all "
              f"processes: {', '.join(SIDE_PROCESSES)}, the daemon, sbatch), "
              f"{os.cpu_count()} CPUs shared with the submitters:")
        for (n, k), v in cpu.items():
            print(f"  {n}/{k}: slurmctld {statistics.median(c for c, _, _ in v):,.0f} µs"
                  + (f"; daemon {statistics.median(d for _, d, _ in v):,.0f} µs" if n in pids
                     else "")
                  + f"; all {statistics.median(t for _, _, t in v):,.0f} µs")
        if base is not None:
            for kind in ("gpu", "cpu"):
                a, b = ("fast", kind), ("base", kind)
                print(f"  this / baseline, {kind} jobs: slurmctld {cpu_ratio(a, b, 0):.3f}"
                      + (f", daemon {cpu_ratio(a, b, 1):.3f}" if kind == "gpu" else "")
                      + f", all processes {cpu_ratio(a, b, 2):.3f} (median of per-round "
                      "ratios)")
        for name in [n for n, _, _ in trees]:
            cfg, token, sock = ledgers[name]
            try:  # the baseline's ledger too: read by this tree's code (the same schema)
                held = len(Ledger.from_config(config_mod.load(cfg)).holds(state="pending"))
            except LedgerError as exc:
                held = f"? ({exc})"
            print(f"holds written by the {name} daemon: {held}")
            lat = socket_latency(sock, token, args.latency_n)
            for op, (p50, p99) in lat.items():
                print(f"socket round trip, {name:<7} {op:8s} p50 {p50:.3f} ms  p99 {p99:.3f} ms "
                      f"(n={args.latency_n}; goal reserve p99 <= 0.5 ms)")
            log = (root / f"{name}.log").read_text()
            us = [int(m) for m in re.findall(r"op=reserve .* us=(\d+)", log)]
            if us:
                print(f"  daemon-side reserve handling: p50 {pct(us, 50) / 1000:.3f} ms  "
                      f"p99 {pct(us, 99) / 1000:.3f} ms (n={len(us)})")
    finally:
        empty_queue()
        for d in daemons:
            d.terminate()
            d.wait(10)
        if old_conf is None:
            CONF.unlink(missing_ok=True)
        else:
            CONF.write_text(old_conf)
        if SLURM_CONF.read_text() != old_slurm:
            SLURM_CONF.write_text(old_slurm)
            restart_slurmctld()
        install(old_lua if old_lua is not None else SCRIPT.read_text())
        empty_queue()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
