"""Settlement benchmark: epilog latency and throughput, reconcile time for 10,000 jobs.

    .venv/bin/python benchmarks/settle_bench.py [--quick]

* Epilog: 8 processes at once, each running the epilog's settlement (``epilog()``: read
  the prolog record, find the job's hold, rates, charge under the node key) and the close
  EpilogSlurmctld asks the daemon for (``settlement.finish``) for its own jobs on one shared ledger — SQLite (one file, WAL) and PostgreSQL
  (127.0.0.1:5432, a fresh database). Interpreter start and scontrol are not included.
* Reconcile: 10,000 finished jobs whose epilogs never ran (fake Slurm reader returning
  their sacct records): one ``Reconciler.run()`` that charges and closes them all.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlalchemy import create_engine, text

from benchmarks.localdaemon import LocalDaemon
from ledger import config as config_mod
from ledger import db, migrate, settlement
from ledger.service import Ledger
from ledger.views import HoldRequest
from slurm_plugin import jobstate, marks
from slurm_plugin.epilog import epilog
from slurm_plugin.hookconf import HookConfig
from slurm_plugin.hookenv import Hook, HookEnv
from slurm_plugin.reconcile import Reconciler
from slurm_plugin.slurm import JobRecord

PG = os.environ.get("GPULEDGER_BENCH_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REQ = HoldRequest(gpus=2, seconds=600, gpu_type="h100")


class Reader:
    def __init__(self, records):
        self.records = records

    def job(self, job_id):
        return self.records.get(job_id)

    def array_tasks(self, array_job_id):
        return []

    def live_jobs(self):
        return []

    def finished_jobs(self, since, job_ids=None):
        return list(self.records.values())

    def cancel(self, job_id, reason):
        raise AssertionError("no cancel in the benchmark")

    def owners(self, job_ids):
        return {}

    def stepped_runs(self, job_ids):
        return {(j, 0) for j in job_ids if j in self.records}

    def set_admin_comment(self, job_id, text):
        raise AssertionError("no comment in the benchmark")


def ledger_at(url: str, keys: Path) -> Ledger:
    kw = {} if url.startswith("sqlite") else {"pool_size": 2, "max_overflow": 2}
    lg = Ledger(db.make_engine(url, **kw), keys_dir=keys)
    return lg


def setup(url: str, keys: Path) -> tuple[Ledger, str]:
    lg = ledger_at(url, keys)
    migrate.upgrade(lg.engine)
    lg.bootstrap()
    lg.generate_key("bench")
    lg.create_account("bench")
    lg.set_rate("h100", 1_000_000)
    token, _ = lg.mint("bench", 10**9)
    return lg, token


def record(job_id: str, hold, state: str, elapsed: int = 30) -> JobRecord:
    return JobRecord(job_id=job_id, display_id=job_id, state=state, restarts=0, nodes=["n1"],
                     start=None if state == "PENDING" else __import__("datetime").datetime.now(
                         __import__("datetime").UTC),
                     elapsed_s=elapsed, gpus={"h100": 2}, gpu_idx={"n1": {0: "h100", 1: "h100"}},
                     admin_comment=marks.hold_comment(hold.id, hold.token_id))


def worker(args) -> list[float]:
    url, keys, state_root, jobs = args
    lg = ledger_at(url, Path(keys))
    cfg = config_mod.parse({"database": {"url": url}}, Path(keys) / "gpuledger.toml")
    hooks = HookConfig(state_dir=Path(state_root), log_file=None, syslog=False,
                       agent_socket="/nonexistent/agent.sock",
                       spool_dir=Path(state_root) / "spool")
    log = logging.getLogger("bench")
    log.disabled = True
    logging.getLogger("gpuledger.agent").disabled = True
    logging.getLogger("gpuledger.hook.usage").disabled = True
    times = []
    for job_id, hold_id, token_id in jobs:
        now = time.time()
        jobstate.save(hooks.state_dir, jobstate.NodeRun(
            job_id=job_id, restart=0, node="n1", start=now - 30, gpus=[0, 1],
            gpu_types={"0": "h100", "1": "h100"}, hold_id=hold_id, token_id=token_id))
        env = HookEnv(job_id=job_id, node="n1", restart=0, gpus=[0, 1], token=None,
                      user=None, nodes=["n1"])
        t0 = time.perf_counter()
        epilog(Hook(env, cfg, hooks, log, now), LocalDaemon(lg), now=now)
        settlement.finish(lg, [job_id], job_id, ["n1"])  # EpilogSlurmctld's work, in the daemon
        times.append(time.perf_counter() - t0)
    lg.engine.dispose()
    return times


def bench_epilogs(name: str, url: str, per_proc: int, procs: int = 8) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        keys = Path(tmp) / "keys"
        lg, token = setup(url, keys)
        batches = []
        for p in range(procs):
            jobs = []
            for i in range(per_proc):
                h = lg.reserve(token, REQ)
                job_id = str(100000 + p * per_proc + i)
                lg.bind(h.id, job_id)
                jobs.append((job_id, h.id, h.token_id))
            batches.append((url, str(keys), str(Path(tmp) / f"state{p}"), jobs))
        lg.engine.dispose()
        ctx = mp.get_context("fork")
        t0 = time.perf_counter()
        with ctx.Pool(procs) as pool:
            results = pool.map(worker, batches)
        wall = time.perf_counter() - t0
        lat = sorted(x for r in results for x in r)
        lg = ledger_at(url, keys)
        left = len(lg.holds(state="pending"))
        ok = lg.verify_journal().ok
        lg.engine.dispose()
    n = len(lat)
    print(f"epilog settlement, {procs} concurrent, {name:<10} n={n:>5}  "
          f"p50 {statistics.median(lat) * 1000:7.2f} ms  p99 {lat[int(n * 0.99) - 1] * 1000:7.2f} ms"
          f"  {n / wall:8.1f} settlements/s  (pending left {left}, journal ok {ok})")


def bench_reconcile(n: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/ledger.db"
        lg, token = setup(url, Path(tmp) / "keys")
        records = {}
        t0 = time.perf_counter()
        for i in range(n):
            h = lg.reserve(token, REQ)
            job_id = str(500000 + i)
            lg.bind(h.id, job_id)
            records[job_id] = record(job_id, h, "COMPLETED", elapsed=30 + i % 60)
        setup_s = time.perf_counter() - t0
        rec = Reconciler(lg, Reader(records), grace_s=0)
        t0 = time.perf_counter()
        s = rec.run()
        took = time.perf_counter() - t0
        t0 = time.perf_counter()
        again = rec.run()
        second = time.perf_counter() - t0
        assert len(s.settled) == n and s.errors == [] and again.examined == 0
        assert lg.verify_journal().ok
        print(f"reconcile {n:,} finished jobs (SQLite, fake Slurm): {took:7.2f} s "
              f"({n / took:,.0f} jobs/s; setup {setup_s:.1f} s); second pass {second:.3f} s")


def pg_url() -> str | None:
    name = "gl_bench_" + uuid.uuid4().hex[:8]
    try:
        admin = create_engine(PG, isolation_level="AUTOCOMMIT")
        with admin.connect() as c:
            c.execute(text(f"CREATE DATABASE {name}"))
    except Exception as exc:  # noqa: BLE001
        print(f"PostgreSQL unavailable ({exc.__class__.__name__}); skipped")
        return None
    return admin.url.set(database=name).render_as_string(hide_password=False)


def drop_pg(url: str) -> None:
    admin = create_engine(PG, isolation_level="AUTOCOMMIT")
    name = url.rsplit("/", 1)[1]
    with admin.connect() as c:
        c.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    per_proc = 25 if a.quick else 125
    with tempfile.TemporaryDirectory() as tmp:
        bench_epilogs("SQLite", f"sqlite:///{tmp}/ledger.db", per_proc)
    url = pg_url()
    if url:
        try:
            bench_epilogs("PostgreSQL", url, per_proc)
        finally:
            drop_pg(url)
    bench_reconcile(1000 if a.quick else 10_000)


if __name__ == "__main__":
    main()
