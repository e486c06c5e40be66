"""Engines and transactions on SQLite, PostgreSQL and MariaDB.

SQLite runs in WAL mode with ``synchronous=FULL``; write transactions start
with ``BEGIN IMMEDIATE`` so two writers never deadlock on a lock upgrade.
Server databases run at READ COMMITTED with explicit row locks
(``SELECT … FOR UPDATE``), taken in a fixed order, the chain head last.

Every driver error — raised through SQLAlchemy or by the hot paths' raw driver
cursors — is judged here by one rule: conflicts (deadlock, lock wait timeout,
serialization failure, MariaDB's snapshot-isolation "record has changed") retry
the whole transaction; anything else becomes a :class:`StorageError`.
"""

from __future__ import annotations

import random
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import DBAPIError, DisconnectionError, IntegrityError, OperationalError

from .config import Config
from .errors import ConfigError, StorageError, UniqueViolation

BUSY_TIMEOUT_MS = 10_000
PING_IDLE_S = 1.0  # a server connection idle this long is pinged before it is used


def resolve_url(config: Config) -> URL:
    """The configured URL, relative SQLite paths made absolute, the password read from its file."""
    if not config.database.url:
        raise ConfigError(f"{config.path}: [database] url is not set: no ledger on this host "
                          "(compute nodes send their charges to the daemon)")
    try:
        url = make_url(config.database.url)
    except Exception as exc:  # sqlalchemy raises ArgumentError with little context
        raise ConfigError(f"{config.path}: [database] url is not a database URL: {exc}") from None
    if url.password:
        raise ConfigError(
            f"{config.path}: [database] url must not contain a password; use password_file"
        )
    if url.get_backend_name() == "sqlite":
        db = url.database or ""
        if db and db != ":memory:" and not db.startswith("file:") and not Path(db).is_absolute():
            url = url.set(database=str(config.path.parent / db))
        return url
    if config.database.password_file:
        try:
            password = Path(config.database.password_file).read_text().strip()
        except OSError as exc:
            raise ConfigError(
                f"cannot read database password_file {config.database.password_file}: "
                f"{exc.strerror}"
            ) from None
        url = url.set(password=password)
    return url


def make_engine(url: URL | str, **kw) -> Engine:
    url = make_url(url)
    backend = url.get_backend_name()
    if backend == "sqlite":
        engine = create_engine(url, connect_args={"timeout": BUSY_TIMEOUT_MS / 1000}, **kw)
        _sqlite_setup(engine)
        return engine
    if backend in ("mysql", "mariadb", "postgresql"):
        kw.setdefault("isolation_level", "READ COMMITTED")
        engine = create_engine(url, **kw)
        if not kw.get("pool_pre_ping"):
            _ping_when_idle(engine)
        return engine
    raise ConfigError(f"unsupported database backend {backend!r} (sqlite, postgresql, mysql)")


def _ping_when_idle(engine: Engine) -> None:
    """Ping a pooled server connection before use only when it has been idle for
    ``PING_IDLE_S``: one round trip saved per transaction under load (SQLAlchemy's
    ``pool_pre_ping`` pings at every checkout), while a connection the server dropped in
    a quiet spell — a restart, an idle timeout — is still found out and replaced."""

    @event.listens_for(engine, "checkin")
    def _checkin(_dbapi_conn, record):
        record.info["gpuledger_idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checkout(dbapi_conn, record, _proxy):
        since = record.info.get("gpuledger_idle_since")
        if since is None or time.monotonic() - since < PING_IDLE_S:
            return
        try:
            engine.dialect.do_ping(dbapi_conn)
        except Exception as exc:
            if engine.dialect.is_disconnect(exc, dbapi_conn, None):
                raise DisconnectionError(str(exc)) from exc  # the pool connects afresh
            raise


def _sqlite_setup(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        if engine.url.database not in (None, "", ":memory:"):
            cur.execute("PRAGMA journal_mode = WAL")
        cur.execute("PRAGMA synchronous = FULL")
        cur.execute("PRAGMA foreign_keys = ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):
        # On the driver's connection: SQLAlchemy's execute would add ~50 µs to every
        # transaction. A driver error leaves wrapped as SQLAlchemy wraps its own.
        statement = _BEGIN[conn.get_execution_options().get("sqlite_begin", "IMMEDIATE")]
        try:
            conn.connection.driver_connection.execute(statement)
        except sqlite3.Error as exc:
            raise DBAPIError.instance(statement, (), exc, sqlite3.Error) from exc


_BEGIN = {"IMMEDIATE": "BEGIN IMMEDIATE", "DEFERRED": "BEGIN DEFERRED"}


def is_sqlite(conn_or_engine: Connection | Engine) -> bool:
    return conn_or_engine.dialect.name == "sqlite"


# Driver error codes of a transaction that lost a conflict and may simply run again.
_PG_CONFLICTS = frozenset({
    "40001",  # serialization_failure
    "40P01",  # deadlock_detected
    "55P03",  # lock_not_available (lock_timeout)
})
_MARIADB_CONFLICTS = frozenset({
    1213,  # ER_LOCK_DEADLOCK
    1205,  # ER_LOCK_WAIT_TIMEOUT
    1020,  # ER_CHECKREAD: innodb_snapshot_isolation saw a row change since its read view
})


def _retryable(exc: DBAPIError) -> bool:
    """The one retry rule: a conflict the whole transaction may be retried after."""
    orig = exc.orig
    if getattr(orig, "sqlstate", None) in _PG_CONFLICTS:
        return True
    args = getattr(orig, "args", ())
    if args and args[0] in _MARIADB_CONFLICTS:
        return True
    return "database is locked" in str(orig)


def as_dbapi_error(conn: Connection, exc: BaseException) -> DBAPIError | None:
    """A driver's own exception (from a raw driver cursor) wrapped as SQLAlchemy wraps its
    own — same classes (OperationalError, IntegrityError, …), same ``orig`` — so that one
    rule retries and maps both; a lost connection is invalidated like SQLAlchemy does.
    None for anything that is not a driver error."""
    if isinstance(exc, DBAPIError):
        return exc
    dbapi = conn.dialect.loaded_dbapi
    if dbapi is None or not isinstance(exc, dbapi.Error):
        return None
    if not conn.invalidated and conn.dialect.is_disconnect(
            exc, conn.connection.dbapi_connection, None):
        conn.invalidate(exc)
    return DBAPIError.instance(None, None, exc, dbapi.Error)


def storage_error(exc: DBAPIError) -> StorageError:
    text = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
    if "readonly" in text or "read-only" in text or "read only" in text:
        return StorageError(f"the ledger database is read-only: {text}")
    if isinstance(exc, IntegrityError) and any(
            w in text.lower() for w in ("unique", "duplicate")):
        return UniqueViolation(f"the ledger database refused a duplicate: {text}")
    if isinstance(exc, OperationalError):
        return StorageError(f"the ledger database is unavailable: {text}")
    return StorageError(f"the ledger database refused the operation: {text}")


@contextmanager
def _transaction(conn: Connection) -> Iterator[Connection]:
    """``conn.begin()``; a raw driver error leaves it as SQLAlchemy's (see as_dbapi_error)."""
    try:
        with conn.begin():
            yield conn
    except Exception as exc:
        wrapped = as_dbapi_error(conn, exc)
        if wrapped is None or wrapped is exc:
            raise
        raise wrapped from exc


@contextmanager
def write(engine: Engine) -> Iterator[Connection]:
    """One write transaction (BEGIN IMMEDIATE on SQLite); commits on success."""
    with engine.connect() as conn, _transaction(conn):
        yield conn


@contextmanager
def read(engine: Engine) -> Iterator[Connection]:
    """A read-only transaction (deferred BEGIN on SQLite); driver errors become StorageError."""
    try:
        with (engine.connect().execution_options(sqlite_begin="DEFERRED") as conn,
              _transaction(conn)):
            yield conn
    except DBAPIError as exc:
        raise storage_error(exc) from None


def run_write(engine: Engine, fn, *, attempts: int = 8):
    """Run ``fn(conn)`` in a write transaction, retrying conflicts; map driver errors.

    Raw driver errors arrive here wrapped by :func:`write`, so every path — SQLAlchemy
    statements and driver cursors alike — retries and maps the same way."""
    for attempt in range(attempts):
        try:
            with write(engine) as conn:
                return fn(conn)
        except DBAPIError as exc:
            if _retryable(exc) and attempt < attempts - 1:
                time.sleep(0.002 * (2**attempt) * random.uniform(0.5, 1.5))
                continue
            raise storage_error(exc) from None
    raise AssertionError("unreachable")
