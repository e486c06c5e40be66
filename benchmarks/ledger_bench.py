"""Ledger core benchmark: token checks, reserve+post lifecycles, journal verification.

Reserve+post on SQLite runs twice: one thread (two fsyncs per lifecycle, printed beside the
disk's bare commit rate) and 16 threads in one process, the daemon's shape, where group
commit (ledger/groupcommit.py) lets them share commits. PostgreSQL runs 16 processes.

    .venv/bin/python benchmarks/ledger_bench.py [--quick]

Prints each figure next to its goal and the ratio figure/goal (> 1 is better
for rates, < 1 for latencies), all measured in this one run.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlalchemy import create_engine, text  # noqa: E402

from benchmarks.proccpu import cpu_by_name  # noqa: E402
from ledger import db, migrate  # noqa: E402
from ledger.service import Ledger  # noqa: E402
from ledger.views import HoldRequest  # noqa: E402

PG = os.environ.get("GPULEDGER_BENCH_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REQ = HoldRequest(gpus=1, seconds=60, gpu_type="h100")


def new_ledger(url: str, keys: Path, **kw) -> Ledger:
    lg = Ledger(db.make_engine(url, **kw), keys_dir=keys)
    migrate.upgrade(lg.engine)
    lg.bootstrap()
    return lg


def seed(lg: Ledger) -> None:
    lg.generate_key("bench")
    lg.create_account("bench")
    lg.set_rate("h100", 1_000_000)


def report(name: str, value: float, unit: str, goal: float, higher_is_better: bool) -> None:
    ratio = value / goal if higher_is_better else goal / value
    mark = "ok" if ratio >= 1 else "MISSED"
    print(f"{name:<52} {value:>12,.1f} {unit:<10} goal {'≥' if higher_is_better else '≤'} "
          f"{goal:,.0f}  ratio {ratio:5.2f}  {mark}")


def bench_token_check(lg: Ledger, n: int) -> None:
    tokens = [lg.mint("bench", 10**9)[0] for _ in range(n)]
    from ledger.tokens import Verifier
    keys = dict(lg.verifier().public_keys)
    v = Verifier(keys, cache_size=n * 2)
    t0 = time.perf_counter()
    for tok in tokens:
        v.verify(tok)
    uncached = (time.perf_counter() - t0) / n * 1e6
    t0 = time.perf_counter()
    for _ in range(5):
        for tok in tokens:
            v.verify(tok)
    cached = (time.perf_counter() - t0) / (5 * n) * 1e6
    # the full check the daemon makes before touching the database (cached signature)
    for tok in tokens:
        lg.check(tok, REQ)
    lg.verifier().cache_size = n * 2
    t0 = time.perf_counter()
    for tok in tokens:
        lg.check(tok, REQ)
    full = (time.perf_counter() - t0) / n * 1e6
    report("token check, uncached (signature verify)", uncached, "µs/op", 150, False)
    report("token check, cached", cached, "µs/op", 20, False)
    report("token check, cached + validity + scopes", full, "µs/op", 20, False)


def lifecycles(lg: Ledger, token: str, n: int) -> float:
    return lifecycles_cpu(lg, token, n)[0]


def lifecycles_cpu(lg: Ledger, token: str, n: int) -> tuple[float, float]:
    """(lifecycles/s, this process's CPU µs per lifecycle)."""
    c0, t0 = time.process_time(), time.perf_counter()
    for _ in range(n):
        hold = lg.reserve(token, REQ)
        lg.post(hold.id, 30)
    return n / (time.perf_counter() - t0), (time.process_time() - c0) / n * 1e6


def threaded(lg: Ledger, tokens: list[str], n: int) -> tuple[float, float, float]:
    """(lifecycles/s, CPU µs per lifecycle, operations per commit) of one thread per token
    in this one process — the daemon's shape, where SQLite's group commit
    (ledger.groupcommit) lets operations that wait for a commit share the next one."""
    import threading

    group = lg._group
    batches0, c0 = (group.batches if group else 0), time.process_time()
    start = threading.Barrier(len(tokens) + 1)

    def work(token: str) -> None:
        start.wait()
        for _ in range(n):
            hold = lg.reserve(token, REQ)
            lg.post(hold.id, 30)

    threads = [threading.Thread(target=work, args=(t,)) for t in tokens]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    done = len(tokens) * n
    rate = done / (time.perf_counter() - t0)
    commits = (group.batches - batches0) if group else 2 * done
    return rate, (time.process_time() - c0) / done * 1e6, 2 * done / max(commits, 1)


def commit_floor(path: Path, n: int) -> float:
    """Commits/s of a one-row write transaction in the ledger's SQLite settings (WAL,
    synchronous=FULL, BEGIN IMMEDIATE), plain sqlite3: the fsync bound of this disk."""
    import sqlite3

    con = sqlite3.connect(path, isolation_level=None)
    con.execute("PRAGMA journal_mode = WAL")
    con.execute("PRAGMA synchronous = FULL")
    con.execute("CREATE TABLE t (i INTEGER)")
    t0 = time.perf_counter()
    for i in range(n):
        con.execute("BEGIN IMMEDIATE")
        con.execute("INSERT INTO t VALUES (?)", (i,))
        con.execute("COMMIT")
    rate = n / (time.perf_counter() - t0)
    con.close()
    return rate


def _worker(args):
    url, keys, token, n, start = args
    lg = Ledger(db.make_engine(url, pool_size=1), keys_dir=Path(keys))
    lg.check(token, REQ)  # warm the verifier
    while time.time() < start:
        time.sleep(0.001)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(n):
        hold = lg.reserve(token, REQ)
        lg.post(hold.id, 30)
    t1, c1 = time.perf_counter(), time.process_time()
    lg.engine.dispose()
    return t0, t1, c1 - c0


def parallel(url: str, keys: Path, tokens: list[str], n: int) -> float:
    start = time.time() + 1.0
    with mp.get_context("spawn").Pool(len(tokens)) as pool:
        server0 = cpu_by_name("postgres")
        spans = pool.map(_worker, [(url, str(keys), t, n, start) for t in tokens])
        server = cpu_by_name("postgres") - server0
    t0 = min(s for s, _, _ in spans)
    t1 = max(e for _, e, _ in spans)
    done = len(tokens) * n
    client = sum(c for _, _, c in spans) / done * 1e6
    per = client + server / done * 1e6
    print(f"  CPU per lifecycle: clients {client:,.0f} µs + PostgreSQL {server / done * 1e6:,.0f}"
          f" µs -> {os.cpu_count()} CPUs allow at most {os.cpu_count() / per * 1e6:,.0f}/s")
    return done / (t1 - t0)


def bench_verify(lg: Ledger, rows_wanted: int) -> float:
    token = lg.mint("bench", 10**9)[0]
    have = lg.head()[0]
    while have < rows_wanted:
        lifecycles(lg, token, 500)
        have = lg.head()[0]
    runs = []
    for _ in range(3):
        t0 = time.perf_counter()
        result = lg.verify_journal()
        runs.append(result.rows / (time.perf_counter() - t0))
        assert result.ok
    return statistics.median(runs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smaller counts (a smoke run)")
    args = ap.parse_args()
    n = 300 if args.quick else 2000
    workers = 16
    tmp = Path(tempfile.mkdtemp(prefix="gl-bench-"))
    print(f"gpuledger ledger benchmark — {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, "
          f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}")

    lite = new_ledger(f"sqlite:///{tmp / 'ledger.db'}", tmp / "keys")
    seed(lite)
    bench_token_check(lite, 500 if args.quick else 2000)
    token = lite.mint("bench", 10**9)[0]
    lifecycles(lite, token, 50)
    floor = commit_floor(tmp / "floor.db", n)
    rate, cpu = lifecycles_cpu(lite, token, n)
    report("SQLite reserve+post, one process", rate, "lifecycles/s", 2000, True)
    # Side by side: a lifecycle is two durable commits, so this disk allows at most floor/2;
    # and one process's CPU per lifecycle bounds it too.
    print(f"  same disk, bare sqlite3 one-row commits (WAL, synchronous=FULL): {floor:,.0f}/s "
          f"-> at most {floor / 2:,.0f} lifecycles/s; reserve+post reaches "
          f"{rate / (floor / 2):.2f} of that ceiling")
    print(f"  CPU per lifecycle (this process): {cpu:,.0f} µs -> at most {1e6 / cpu:,.0f}/s "
          f"on one core")
    tokens = [lite.mint("bench", 10**9)[0] for _ in range(workers)]
    rate, cpu, per_commit = threaded(lite, tokens, max(20, n // workers))
    report(f"SQLite reserve+post, {workers} threads, group commit", rate, "lifecycles/s",
           2000, True)
    print(f"  {per_commit:.1f} operations per commit; CPU per lifecycle {cpu:,.0f} µs -> at "
          f"most {1e6 / cpu:,.0f}/s on one core (one interpreter lock)")

    name = "glbench_" + uuid.uuid4().hex[:8]
    admin = create_engine(PG, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f"CREATE DATABASE {name}"))
    try:
        url = admin.url.set(database=name).render_as_string(hide_password=False)
        pg = new_ledger(url, tmp / "keys")
        pg.create_account("bench")
        pg.set_rate("h100", 1_000_000)
        # the key is already in the keys dir; register its public half in this ledger
        from ledger import keys as keymod
        pg.add_key("bench", keymod.public_text(keymod.load_private(tmp / "keys", "bench")))
        per = max(20, n // workers)
        distinct = [pg.mint("bench", 10**9)[0] for _ in range(workers)]
        report(f"PostgreSQL reserve+post, {workers} workers, distinct tokens",
               parallel(url, tmp / "keys", distinct, per), "lifecycles/s", 1000, True)
        hot = pg.mint("bench", 10**9)[0]
        report(f"PostgreSQL reserve+post, {workers} workers, one hot token",
               parallel(url, tmp / "keys", [hot] * workers, per), "lifecycles/s", 500, True)
        pg.engine.dispose()
    finally:
        with admin.connect() as c:
            c.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
    rows = 20_000 if args.quick else 200_000
    report(f"verify, SQLite, {rows:,} rows", bench_verify(lite, rows), "rows/s", 200_000, True)


if __name__ == "__main__":
    main()
