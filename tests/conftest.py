"""Shared fixtures: a ledger on each database, a fixed clock, and the service rule.

Tests that need a service (PostgreSQL, MariaDB, the Slurm test cluster, …)
call :func:`need`: run by hand without it they skip; under CI (``CI=true``)
a missing service is a failure, never a skip.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import create_engine, event, text

import reports  # noqa: F401  (registers the reports' migration branch: ledgers get its tables)
from ledger import db, migrate
from ledger.service import Ledger

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
# tests/ha needs the Patroni lab and kills its members: collected only when its lane
# (tests/lanes/patroni) asks for them (GPULEDGER_HA=1; by hand: GPULEDGER_HA=1 pytest tests/ha).
collect_ignore = [] if os.environ.get("GPULEDGER_HA") == "1" else ["ha"]
PG_ADMIN_URL = os.environ.get("GPULEDGER_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
MARIADB_ADMIN_URL = os.environ.get("GPULEDGER_TEST_MARIADB", "mysql+pymysql://root@127.0.0.1:3306/test")
# Every connection of the tests' MariaDB ledgers runs as MariaDB 11.8 does by default
# (Debian 13): a locking read of a row changed since the transaction's read view fails
# with error 1020. 10.6.18+/10.11.8+ have the variable, off by default; it travels in the
# URL (the driver's init_command), so engines built from a config file get it too.
MARIADB_SESSION = "SET SESSION innodb_snapshot_isolation = ON"


def need(available: bool, what: str) -> None:
    """Skip when a service is missing — unless under CI, where that is a failure."""
    if available:
        return
    if IN_CI:
        pytest.fail(f"{what} is required under CI=true but is not available")
    pytest.skip(f"{what} not available")


@contextmanager
def counted_statements(engine, db_url: str) -> Iterator[list[str]]:
    """The SQL statements run on ``engine`` inside the block, those of the hot path's raw
    driver cursors (``ledger.rawsql``) too. Clear the list to count from a point on."""
    from ledger import rawsql

    counted: list[str] = []
    listen = ("before_cursor_execute", lambda *a: counted.append(a[2]))
    event.listen(engine, *listen)
    init = rawsql.Raw.__init__
    try:
        if db_url.startswith("sqlite"):  # the driver traces every statement, raw ones too
            engine.dispose()
            event.listen(engine, "connect",
                         lambda dbapi, _r: dbapi.set_trace_callback(counted.append))
        else:
            def counting_init(self, conn):
                init(self, conn)
                self.cur = _CountingCursor(self.cur, counted)

            rawsql.Raw.__init__ = counting_init
        yield counted
    finally:
        rawsql.Raw.__init__ = init
        event.remove(engine, *listen)


class _CountingCursor:
    """A driver cursor that notes each statement it runs (executemany: once per row)."""

    def __init__(self, cur, counted: list[str]):
        self._cur, self._counted = cur, counted

    def execute(self, sql, params=()):
        self._counted.append(sql)
        return self._cur.execute(sql, params)

    def executemany(self, sql, rows):
        rows = list(rows)
        self._counted.extend([sql] * len(rows))
        return self._cur.executemany(sql, rows)

    def __getattr__(self, name):
        return getattr(self._cur, name)


class Clock:
    """A settable clock for the ledger (aware UTC)."""

    def __init__(self, start: datetime | None = None):
        self.now = start or datetime(2026, 11, 1, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **kw) -> None:
        self.now += timedelta(**kw)


def _server_db(admin_url: str, what: str, init_command: str | None = None):
    """Create a throwaway database on a server; yield its URL; drop it afterwards."""
    name = "gl_" + uuid.uuid4().hex[:12]
    try:
        admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f"CREATE DATABASE {name}"))
    except Exception as exc:  # noqa: BLE001 - any failure means "service missing"
        need(False, f"{what} ({exc.__class__.__name__}: {str(exc).splitlines()[0]})")
    url = admin.url.set(database=name)
    if init_command:
        url = url.update_query_dict({"init_command": init_command})
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS {name}"))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql", "mariadb"])
def db_url(request, tmp_path):
    """A fresh, empty ledger database URL on each of the three databases."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'ledger.db'}"
    elif request.param == "postgresql":
        yield from _server_db(PG_ADMIN_URL, "PostgreSQL on 127.0.0.1:5432")
    else:
        yield from _server_db(MARIADB_ADMIN_URL, "MariaDB on 127.0.0.1:3306", MARIADB_SESSION)


@pytest.fixture
def clock():
    return Clock()


def make_ledger(url: str, keys_dir: Path, clock=None, *, pool_size: int = 5) -> Ledger:
    kw = {} if url.startswith("sqlite") else {"pool_size": pool_size, "max_overflow": 70}
    engine = db.make_engine(url, **kw)
    migrate.upgrade(engine)
    ledger = Ledger(engine, keys_dir=keys_dir, clock=clock or (lambda: datetime.now(UTC)))
    ledger.bootstrap()
    return ledger


def seeded(url: str, keys_dir: Path, clock=None) -> Ledger:
    """A migrated ledger with a signing key, accounts physics/chemistry and three rates."""
    lg = make_ledger(url, keys_dir, clock)
    lg.generate_key("k1")
    lg.create_account("physics")
    lg.create_account("chemistry")
    lg.set_rate("h100", 1_000_000)
    lg.set_rate("a100", 600_000)
    lg.set_rate("default", 500_000)
    return lg


@pytest.fixture
def ledger(db_url, tmp_path, clock):
    """A seeded ledger on each of the three databases."""
    lg = seeded(db_url, tmp_path / "keys", clock)
    yield lg
    lg.engine.dispose()


@pytest.fixture
def sqlite_ledger(tmp_path, clock):
    """A seeded ledger on SQLite only."""
    lg = seeded(f"sqlite:///{tmp_path / 'ledger.db'}", tmp_path / "keys", clock)
    yield lg
    lg.engine.dispose()


# The two-cluster lane's tests (tests/twocluster) start real Slurm daemons as root and take
# minutes: collected only when the lane (tests/lanes/twocluster) asks for them.
if os.environ.get("GPULEDGER_TWOCLUSTER") != "1":
    collect_ignore.append("twocluster")
