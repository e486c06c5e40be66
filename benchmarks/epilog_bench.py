"""Epilog cost per array task: flat in the array's size (no Slurm command, no listing).

    .venv/bin/python benchmarks/epilog_bench.py [--quick]

For arrays of 10, 100 and 1,000 tasks sharing one hold (SQLite, one file, WAL), each task
runs what its node and the controller do when it ends: the node epilog (``epilog()``: read
the prolog record, find the run's hold by job id in the ledger, rates, charge under the
node key — no ``scontrol``) and the close EpilogSlurmctld asks the daemon for
(``settlement.finish``: two indexed queries; the last task closes the hold). Printed: the mean
cost per task at each size, side by side, and for the largest array the mean of its last
tenth of tasks over its first tenth (goal: at most 1.5, i.e. flat). Interpreter start is
not included (``benchmarks/settle_bench.py`` measures concurrent epilogs).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.localdaemon import LocalDaemon
from ledger import config as config_mod
from ledger import db, migrate, settlement
from ledger.service import Ledger
from ledger.views import HoldRequest
from slurm_plugin import jobstate
from slurm_plugin.epilog import epilog
from slurm_plugin.hookconf import HookConfig
from slurm_plugin.hookenv import Hook, HookEnv

GOAL_RATIO = 1.5


def run_array(tasks: int, tmp: Path) -> tuple[list[float], list[float]]:
    url = f"sqlite:///{tmp}/ledger-{tasks}.db"
    lg = Ledger(db.make_engine(url), keys_dir=tmp / f"keys-{tasks}")
    migrate.upgrade(lg.engine)
    lg.bootstrap()
    lg.generate_key("bench")
    lg.create_account("bench")
    lg.set_rate("h100", 1_000_000)
    token, _ = lg.mint("bench", 10**9)
    hold = lg.reserve(token, HoldRequest(gpus=1, seconds=600, gpu_type="h100", tasks=tasks,
                                         user="alice"))
    array_id = "500000"
    lg.bind(hold.id, array_id, user="alice", account="bench")
    cfg = config_mod.parse({"database": {"url": url}}, tmp / "gpuledger.toml")
    hooks = HookConfig(state_dir=tmp / f"state-{tasks}", log_file=None, syslog=False,
                       agent_socket="/nonexistent/agent.sock",
                       agent_spool="/nonexistent/agent-spool",
                       spool_dir=tmp / f"spool-{tasks}")
    log = logging.getLogger("bench")
    log.disabled = True
    for name in ("gpuledger", "gpuledger.agent", "gpuledger.hook.usage"):
        logging.getLogger(name).disabled = True
    epilogs, closes = [], []
    for i in range(tasks):
        job_id = str(int(array_id) + i)
        now = time.time()
        jobstate.save(hooks.state_dir, jobstate.NodeRun(
            job_id=job_id, restart=0, node="n1", start=now - 30, gpus=[0],
            gpu_types={"0": "h100"}, array_job_id=array_id, user="alice"))
        lg.link_job(hold.id, job_id, 0, user="alice")  # PrologSlurmctld's work, not timed
        # slurmd's Epilog gets the task's own id only (no SLURM_ARRAY_JOB_ID on 22.05).
        env = HookEnv(job_id=job_id, node="n1", restart=0, gpus=[0], token=None, user="alice",
                      nodes=["n1"])
        t0 = time.perf_counter()
        epilog(Hook(env, cfg, hooks, log, now), LocalDaemon(lg), now=now)
        t1 = time.perf_counter()
        state, _ = settlement.finish(lg, [job_id, array_id], job_id, ["n1"])
        t2 = time.perf_counter()
        epilogs.append(t1 - t0)
        closes.append(t2 - t1)
        assert state == ("closed" if i == tasks - 1 else "open"), (i, state)
    h = lg.hold(hold.id)
    assert h.state == "posted" and len(lg.charges(hold.id)) == tasks
    lg.engine.dispose()
    return epilogs, closes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="arrays of 10, 50 and 200 tasks")
    args = ap.parse_args()
    sizes = (10, 50, 200) if args.quick else (10, 100, 1000)
    with tempfile.TemporaryDirectory() as tmp:
        results = {n: run_array(n, Path(tmp)) for n in sizes}
    print("epilog cost per array task (ms; node epilog + EpilogSlurmctld's close, SQLite)")
    print(f"{'tasks':>8} {'epilog':>10} {'close':>10} {'total':>10}")
    for n, (ep, cl) in results.items():
        print(f"{n:>8} {statistics.mean(ep) * 1e3:>10.2f} {statistics.mean(cl) * 1e3:>10.2f} "
              f"{statistics.mean(a + b for a, b in zip(ep, cl)) * 1e3:>10.2f}")
    n = sizes[-1]
    total = [a + b for a, b in zip(*results[n])]
    tenth = max(1, n // 10)
    ratio = statistics.mean(total[-tenth:]) / statistics.mean(total[:tenth])
    small = statistics.mean(a + b for a, b in zip(*results[sizes[0]]))
    print(f"{n} tasks: last tenth / first tenth = {ratio:.2f} (goal <= {GOAL_RATIO}); "
          f"per task vs {sizes[0]} tasks = {statistics.mean(total) / small:.2f}x "
          f"-> {'OK' if ratio <= GOAL_RATIO else 'NOT FLAT'}")


if __name__ == "__main__":
    main()
