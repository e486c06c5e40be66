"""Report benchmark: every account's report and the site summary for one busy month.

    .venv/bin/python benchmarks/report_bench.py                       # 1,000 accounts, 1M jobs, SQLite + PostgreSQL
    .venv/bin/python benchmarks/report_bench.py --quick               # 50 accounts, 20k jobs
    .venv/bin/python benchmarks/report_bench.py --accounts 200 --jobs 100000 --db sqlite
    .venv/bin/python benchmarks/report_bench.py --db postgresql --explain

Data. Accounts, rates, the signing key and one token per account are created
through the ledger service (so they are exactly what production writes). The
settled jobs are then bulk-inserted directly — a hold row (state posted), a charge
row with per-GPU usage (held_ms/busy_ms/measured, the node agent's shape) and the
three journal rows the service writes for reserve → charge → release — with each
journal row's hash chained onto the previous one by ``ledger.journal.row_hash``,
then the wallet balances and the chain head are set to match. ``--verify`` runs
``gpuledger verify``'s check over the result. Jobs are spread evenly over the
month; each is reserved, charged and released at one instant.

Timed: building the model for all accounts (the queries) and rendering every
account's HTML, text and PNG chart plus the site summary (written to --out).
Goal: under 60 s for 1,000 accounts and 1,000,000 jobs on SQLite and PostgreSQL.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlalchemy import create_engine, select, text, update

from ledger import db, migrate
from ledger.audit import verify
from ledger.journal import canonical_data, row_hash
from ledger.models import ChainHead, Wallet
from ledger.service import Ledger
from reports import queries as q
from reports.deliver import render_all
from reports.figures import build
from reports.period import Month

PG = os.environ.get("GPULEDGER_BENCH_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
MARIADB = os.environ.get("GPULEDGER_BENCH_MARIADB", "mysql+pymysql://root@127.0.0.1:3306/test")
MONTH = Month(2026, 10)
GOAL_S = 60.0
GPU_TYPES = (("h100", 1_000_000), ("a100", 600_000))
GPU_COUNTS = (1, 1, 1, 2, 2, 4, 8)
BATCH = 20_000

JOURNAL_COLS = ("seq", "ts", "kind", "debit_wallet_id", "credit_wallet_id", "amount", "account",
                "token_id", "hold_id", "reason", "data", "prev_hash", "hash")
HOLD_COLS = ("id", "token_id", "account", "user", "partition", "cluster", "gpu_type", "gpus",
             "seconds", "tasks", "rate_ppm", "amount", "charged", "refunded", "state", "job_id",
             "created_at", "resolved_at", "request")
CHARGE_COLS = ("hold_id", "key", "amount", "job_id", "node", "restart", "usage", "created_at")


class FixedClock:
    def __init__(self, now: datetime):
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def setup(url: str, keys: Path, accounts: int, jobs: int) -> tuple[Ledger, dict]:
    """Accounts, rates, key and one token per account through the service API."""
    clock = FixedClock(MONTH.start - timedelta(days=5))
    lg = Ledger(db.make_engine(url), keys_dir=keys, clock=clock)
    migrate.upgrade(lg.engine)
    lg.bootstrap()
    lg.generate_key("bench")
    for gpu_type, ppm in GPU_TYPES:
        lg.set_rate(gpu_type, ppm)
    # a budget comfortably above what the jobs will charge (≤ 8 GPUs × 4 h each)
    face = max(1, jobs // accounts) * 8 * 4 * 3600 * 2
    tokens = {}
    for i in range(accounts):
        name = f"acct{i:04d}"
        lg.create_account(name)
        lg.set_report_to(name, [f"lead@{name}.example"])
        _, view = lg.mint(name, face, expires=MONTH.end + timedelta(days=400))
        tokens[name] = view.id
    return lg, tokens


def _rows(lg: Ledger, tokens: dict, jobs: int, seed: int):
    """Yield (hold, charge, three journal rows) per job, the journal chained."""
    rnd = random.Random(seed)
    with db.read(lg.engine) as conn:
        d = q.directory(conn)
        seq, prev = conn.execute(select(ChainHead.seq, ChainHead.hash)).one()
    escrow, usage = d.system["system:escrow"], d.system["system:usage"]
    names = sorted(tokens)
    span_us = MONTH.end_us - MONTH.start_us
    charged_per_wallet: dict[int, int] = defaultdict(int)
    state = {"seq": seq, "prev": prev, "charged": charged_per_wallet}
    for i in range(jobs):
        name = names[rnd.randrange(len(names))]
        tok = d.tokens[tokens[name]]
        user = f"user{rnd.randrange(20):02d}"
        gpu_type, rate = GPU_TYPES[rnd.randrange(2)]
        gpus = GPU_COUNTS[rnd.randrange(len(GPU_COUNTS))]
        limit = rnd.choice((3600, 7200, 4 * 3600))
        held_s = rnd.randint(60, limit)
        held = -(-gpus * limit * rate // 1_000_000)
        charge = min(held, -(-gpus * held_s * rate // 1_000_000))
        ts = MONTH.start_us + (i * span_us + span_us // 2) // jobs
        when = datetime.fromtimestamp(ts / 1e6, UTC)
        hold_id, job_id = f"hold_{i:020x}", str(1_000_000 + i)
        busy = [int(held_s * 1000 * rnd.random() ** 0.5) for _ in range(gpus)]
        usage_doc = {"job_id": int(job_id), "restart": 0, "gpus": [
            {"index": g, "held_ms": held_s * 1000, "busy_ms": busy[g], "measured": True}
            for g in range(gpus)]}
        request = {"gpus": gpus, "seconds": limit, "gpu_type": gpu_type, "tasks": 1,
                   "account": name, "user": user, "partition": None, "cluster": None}
        hold = (hold_id, tok.id, name, user, None, None, gpu_type, gpus, limit, 1, rate, held,
                charge, 0, "posted", job_id, when, when, request)
        key = f"post:{hold_id}"
        charge_row = (hold_id, key, charge, job_id, None, None, usage_doc, when)
        journal = []
        for kind, debit, credit, amount, data in (
                ("reserve", tok.wallet_id, escrow, held,
                 {"request": request, "rate_ppm": rate, "job_id": job_id}),
                ("charge", escrow, usage, charge,
                 {"key": key, "job_id": job_id, "node": None, "restart": None}),
                ("release", escrow, tok.wallet_id, held - charge,
                 {"charged": charge, "held": held})):
            if amount == 0:
                debit = credit = None
            state["seq"] += 1
            body = canonical_data(data)
            h = row_hash(state["prev"], state["seq"], ts, kind, debit, credit, amount, name,
                         tok.id, hold_id, None, body)
            journal.append((state["seq"], ts, kind, debit, credit, amount, name, tok.id,
                            hold_id, None, body, state["prev"], h))
            state["prev"] = h
        charged_per_wallet[tok.wallet_id] += charge
        yield hold, charge_row, journal, state


def bulk_load(lg: Ledger, tokens: dict, jobs: int, seed: int = 7) -> float:
    """Insert the jobs; returns seconds taken."""
    import json

    t0 = time.perf_counter()
    backend = lg.engine.dialect.name
    holds, charges, journal = [], [], []
    state = None

    def encode_hold(h):
        return (*h[:16], _naive(h[16]), _naive(h[17]), json.dumps(h[18]))

    def encode_charge(c):
        return (*c[:6], json.dumps(c[6]), _naive(c[7]))

    def flush(raw):
        _insert(raw, backend, "holds", HOLD_COLS, [encode_hold(h) for h in holds])
        _insert(raw, backend, "charges", CHARGE_COLS, [encode_charge(c) for c in charges])
        _insert(raw, backend, "journal", JOURNAL_COLS, journal)
        holds.clear()
        charges.clear()
        journal.clear()

    with lg.engine.connect() as conn:
        raw = conn.connection.driver_connection
        if backend == "sqlite":
            raw.execute("BEGIN")
        for hold, charge, rows, state in _rows(lg, tokens, jobs, seed):
            holds.append(hold)
            charges.append(charge)
            journal.extend(rows)
            if len(holds) >= BATCH:
                flush(raw)
        flush(raw)
        raw.commit()
    W, H = Wallet.__table__, ChainHead.__table__
    with db.write(lg.engine) as conn:
        total = 0
        for wallet_id, amount in state["charged"].items():
            conn.execute(update(W).where(W.c.id == wallet_id).values(balance=W.c.balance - amount))
            total += amount
        conn.execute(update(W).where(W.c.code == "system:usage").values(
            balance=W.c.balance + total))
        conn.execute(update(H).where(H.c.id == 1).values(seq=state["seq"], hash=state["prev"]))
    if backend == "postgresql":
        with lg.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("ANALYZE"))
    elif backend == "sqlite":
        with lg.engine.connect() as conn:
            conn.exec_driver_sql("ANALYZE")
    return time.perf_counter() - t0


def _naive(dt: datetime) -> datetime:
    return dt.astimezone(UTC).replace(tzinfo=None)


def _insert(raw, backend: str, table: str, cols: tuple[str, ...], rows: list) -> None:
    if not rows:
        return
    quoted = ", ".join(f'"{c}"' if backend != "mysql" else f"`{c}`" for c in cols)
    if backend == "postgresql":
        with raw.cursor() as cur, cur.copy(f"COPY {table} ({quoted}) FROM STDIN") as cp:
            for r in rows:
                cp.write_row(r)
        return
    mark = "?" if backend == "sqlite" else "%s"
    if backend == "sqlite":  # the ledger's SQLite datetime text (no deprecated default adapter)
        rows = [tuple(v.strftime("%Y-%m-%d %H:%M:%S.%f") if isinstance(v, datetime) else v
                      for v in r) for r in rows]
    sql = f"INSERT INTO {table} ({quoted}) VALUES ({', '.join([mark] * len(cols))})"
    cur = raw.cursor()
    cur.executemany(sql, rows)
    cur.close()


def explain(lg: Ledger) -> None:
    """Print the plan of every report query (SQLite EXPLAIN QUERY PLAN, else EXPLAIN)."""
    with db.read(lg.engine) as conn:
        d = q.directory(conn)
        prev = MONTH.previous()
        stmts = {
            "flows before the month": q.flows_query(d, None, MONTH.start_us, by_day=False),
            "flows in the month, by day": q.flows_query(d, MONTH.start_us, MONTH.end_us,
                                                        by_day=True),
            "returns and refunds by user/GPU type": q.returns_query(d, MONTH.start_us,
                                                                     MONTH.end_us),
            "multi-charge holds": q.multi_charge_query(d, MONTH.start, MONTH.end),
            "charges with usage (streamed)": q.charges_query(d, MONTH.start, MONTH.end),
            "previous month's charges": q.charged_query(d, prev.start_us, prev.end_us),
        }
        name = lg.engine.dialect.name
        for label, stmt in stmts.items():
            compiled = stmt.compile(dialect=conn.dialect, compile_kwargs={"literal_binds": True})
            prefix = {"sqlite": "EXPLAIN QUERY PLAN ", "postgresql": "EXPLAIN "}.get(name,
                                                                                   "EXPLAIN ")
            print(f"-- {label}")
            for row in conn.exec_driver_sql(prefix + str(compiled)):
                print("   ", " | ".join(str(c) for c in row if c is not None))


def run_reports(lg: Ledger, out: Path) -> dict:
    now = MONTH.end + timedelta(days=1)
    t0 = time.perf_counter()
    with db.read(lg.engine) as conn:
        site = build(conn, MONTH, now)
    t1 = time.perf_counter()
    files = render_all(site, "html", out, include_site=True, now=now)
    files += render_all(site, "text", out, include_site=True, now=now)
    t2 = time.perf_counter()
    return {"accounts": len(site.accounts), "jobs": site.jobs, "files": len(files),
            "queries_s": t1 - t0, "render_s": t2 - t1, "total_s": t2 - t0,
            "charged_h": site.totals.charged / 3600, "busy": site.measure.efficiency}


def server_db(admin_url: str):
    name = "glbench_" + uuid.uuid4().hex[:10]
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"CREATE DATABASE {name}"))
    return admin, name, admin.url.set(database=name).render_as_string(hide_password=False)


def bench(kind: str, args, tmp: Path) -> dict:
    admin = None
    if kind == "sqlite":
        url = f"sqlite:///{tmp / 'bench.db'}"
    else:
        admin, name, url = server_db(PG if kind == "postgresql" else MARIADB)
    try:
        t0 = time.perf_counter()
        lg, tokens = setup(url, tmp / f"keys-{kind}", args.accounts, args.jobs)
        setup_s = time.perf_counter() - t0
        load_s = bulk_load(lg, tokens, args.jobs)
        print(f"[{kind}] data: {args.accounts} accounts via the service in {setup_s:.1f} s, "
              f"{args.jobs} jobs bulk-loaded in {load_s:.1f} s", flush=True)
        if args.verify:
            t = time.perf_counter()
            with db.read(lg.engine) as conn:
                v = verify(conn)
            print(f"[{kind}] journal verify: ok={v.ok} rows={v.rows} "
                  f"({time.perf_counter() - t:.1f} s){'' if v.ok else ' ' + str(v.problem)}")
            if not v.ok:
                raise SystemExit(1)
        if args.explain:
            explain(lg)
        result = run_reports(lg, Path(args.out or tmp) / kind)
        lg.engine.dispose()
        return result
    finally:
        if admin is not None:
            with admin.connect() as conn:
                conn.execute(text(f"DROP DATABASE IF EXISTS {name}"))
            admin.dispose()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--accounts", type=int, default=1000)
    p.add_argument("--jobs", type=int, default=1_000_000)
    p.add_argument("--quick", action="store_true", help="50 accounts, 20,000 jobs")
    p.add_argument("--db", action="append", choices=("sqlite", "postgresql", "mariadb"),
                   help="database(s) to run on (default: sqlite and postgresql)")
    p.add_argument("--explain", action="store_true", help="print the report queries' plans")
    p.add_argument("--verify", action="store_true", help="verify the journal chain after loading")
    p.add_argument("--out", help="directory for the rendered reports (default: a temp dir)")
    args = p.parse_args()
    if args.quick:
        args.accounts, args.jobs = 50, 20_000
    results = {}
    for kind in args.db or ("sqlite", "postgresql"):
        with tempfile.TemporaryDirectory(prefix="report-bench-") as tmp:
            r = bench(kind, args, Path(tmp))
        results[kind] = r
        verdict = "OK" if r["total_s"] < GOAL_S else "SLOW"
        print(f"[{kind}] {r['accounts']} accounts, {r['jobs']} jobs: queries {r['queries_s']:.1f} s"
              f" + render {r['render_s']:.1f} s ({r['files']} files) = {r['total_s']:.1f} s "
              f"(goal < {GOAL_S:.0f} s: {verdict}, ratio {r['total_s'] / GOAL_S:.2f}); "
              f"charged {r['charged_h']:.3f} GPU-h, busy {r['busy'] * 100:.1f} %", flush=True)


if __name__ == "__main__":
    main()
