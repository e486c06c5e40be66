"""Engines and transactions on SQLite, PostgreSQL and MariaDB.

SQLite runs in WAL mode with ``synchronous=FULL``; write transactions start
with ``BEGIN IMMEDIATE`` so two writers never deadlock on a lock upgrade.
Server databases run at READ COMMITTED with explicit row locks
(``SELECT … FOR UPDATE``), taken in a fixed order, the chain head last.

Every driver error — raised through SQLAlchemy or by the hot paths' raw driver
cursors — is judged by one rule (``ledger.dbretry``): conflicts (deadlock, lock wait
timeout, serialization failure, MariaDB's snapshot-isolation "record has changed") retry
the whole transaction; a database that is away, read-only or failing over (nothing
committed) is tried again for ``[database] unavailable_wait`` seconds; a connection lost
during COMMIT leaves the outcome unknown, and only an operation that is safe to replay
(its idempotency key, or a state a second run finds set) runs again — the others raise
:class:`OutcomeUnknown`. Anything else becomes a :class:`StorageError`.

PostgreSQL sessions run with ``statement_timeout = 0`` whatever the role or database
says: a timeout that fires while a synchronous COMMIT waits for its standby returns
success for a commit only the primary has. A WARNING received during COMMIT (that one's
sign) makes the outcome unknown too.
"""

from __future__ import annotations

import logging
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
from .dbretry import Verdict, commit_warning, verdict
from .errors import ConfigError, OutcomeUnknown, StorageError, UniqueViolation

BUSY_TIMEOUT_MS = 10_000
PING_IDLE_S = 1.0  # a server connection idle this long is pinged before it is used
UNAVAILABLE_WAIT_S = 0.5  # default of [database] unavailable_wait
NOTICES = "gpuledger_notices"  # the connection record's list of the server's notices
log = logging.getLogger("gpuledger.db")


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
        if backend == "postgresql":
            kw["connect_args"] = _no_statement_timeout(url, kw.get("connect_args"))
        engine = create_engine(url, **kw)
        if not kw.get("pool_pre_ping"):
            _ping_when_idle(engine)
        if backend == "postgresql":
            _keep_notices(engine)
        return engine
    raise ConfigError(f"unsupported database backend {backend!r} (sqlite, postgresql, mysql)")


def _no_statement_timeout(url: URL, connect_args: dict | None) -> dict:
    """libpq ``options`` that turn statement_timeout off for the session (after any the
    URL gives): set for the role or the database, it could cancel a COMMIT's wait for the
    synchronous standby, and PostgreSQL then reports success for a commit that is on the
    primary alone."""
    args = dict(connect_args or {})
    given = args.get("options", url.query.get("options", ""))
    if isinstance(given, tuple):
        given = " ".join(given)
    args["options"] = f"{given} -c statement_timeout=0".strip()
    return args


def _keep_notices(engine: Engine) -> None:
    """Collect each PostgreSQL connection's notices (psycopg 3) in its record's info, so
    that a write can tell whether COMMIT came with a WARNING (``dbretry.commit_warning``)."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, record):
        notices: list[tuple[str, str]] = []
        record.info[NOTICES] = notices

        def keep(diag) -> None:  # the Diagnostic is valid only during this call: copy it
            if len(notices) < 100:
                notices.append((diag.severity_nonlocalized or diag.severity or "",
                                diag.message_primary or ""))

        add = getattr(dbapi_conn, "add_notice_handler", None)
        if add is not None:
            add(keep)


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


def storage_error(exc: DBAPIError, *, waited: float | None = None) -> StorageError:
    text = _first_line(exc)
    tail = f" (tried again for {waited:g} s)" if waited else ""
    if "readonly" in text or "read-only" in text or "read only" in text:
        return StorageError(f"the ledger database is read-only: {text}{tail}")
    if isinstance(exc, IntegrityError) and any(
            w in text.lower() for w in ("unique", "duplicate")):
        return UniqueViolation(f"the ledger database refused a duplicate: {text}")
    if isinstance(exc, OperationalError) or verdict(exc, at_commit=False) is not Verdict.FINAL:
        return StorageError(f"the ledger database is unavailable: {text}{tail}")
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


def run_write(engine: Engine, fn, *, attempts: int = 8, replay_safe: bool = False,
              wait_s: float = UNAVAILABLE_WAIT_S, confirm=None, sleep=time.sleep,
              clock=time.monotonic):
    """Run ``fn(conn)`` in a write transaction and commit; retry what ``ledger.dbretry``
    says may run again; map driver errors to StorageError.

    * conflicts: up to ``attempts`` runs, with a short random backoff;
    * the database away, read-only or failing over (nothing committed): again until
      ``wait_s`` seconds have passed since the first such error;
    * outcome unknown (connection lost during COMMIT, a WARNING with it): again within
      the same wait when ``replay_safe`` — ``fn`` carries its idempotency key, or finds
      its state already set —, else :class:`OutcomeUnknown` at once. The runs after an
      unknown outcome call ``confirm(conn)`` before committing: a statement that writes,
      so that their COMMIT waits for the synchronous standby even when ``fn`` finds its
      work done (a replay writes nothing, and the first commit may be on a primary
      alone).

    Raw driver errors arrive here wrapped by :func:`_transaction`, so every path —
    SQLAlchemy statements and driver cursors alike — is judged the same way."""
    conflicts = 0
    waiting_since: float | None = None
    unknown: str | None = None  # why an earlier run's outcome is unknown
    pause = 0.02
    while True:
        at_commit = False
        judged: Verdict | None = None  # the verdict on this run's error, once
        try:
            with engine.connect() as conn:
                try:
                    with _transaction(conn):
                        result = fn(conn)
                        if unknown is not None and confirm is not None:
                            confirm(conn)
                        notices = conn.info.get(NOTICES)
                        if notices:
                            notices.clear()
                        at_commit = True
                except DBAPIError as exc:
                    judged = verdict(exc, at_commit=at_commit)
                    if not conn.invalidated and judged in (Verdict.UNAVAILABLE,
                                                           Verdict.UNKNOWN):
                        conn.invalidate()  # a replica, a demoted primary: connect afresh
                    raise
                warning = commit_warning(notices) if notices else None
                if warning is not None:
                    conn.invalidate()  # it may be a primary that lost its standby
                    raise _Unknown(f"COMMIT returned with a warning: {warning}")
            return result
        except DBAPIError as exc:
            kind = judged if judged is not None else verdict(exc, at_commit=at_commit)
            if kind is Verdict.CONFLICT:
                conflicts += 1
                if conflicts < attempts:
                    sleep(0.002 * (2**conflicts) * random.uniform(0.5, 1.5))
                    continue
                raise storage_error(exc) from None
            if kind is Verdict.FINAL:
                raise storage_error(exc) from None
            if kind is Verdict.UNKNOWN:
                why = "the connection was lost during COMMIT: " + _first_line(exc)
                if not replay_safe:
                    raise outcome_unknown(why) from None
                _replaying(why)
                unknown = why
            error = exc
        except _Unknown as exc:
            if not replay_safe:
                raise outcome_unknown(str(exc)) from None
            _replaying(str(exc))
            unknown, error = str(exc), None
        now = clock()
        waiting_since = now if waiting_since is None else waiting_since
        if now - waiting_since >= wait_s:
            if unknown is not None:
                raise outcome_unknown(f"{unknown}; the database did not answer again within "
                                      f"{wait_s:g} s") from None
            raise storage_error(error, waited=wait_s) from None
        sleep(min(pause, max(0.0, waiting_since + wait_s - now)))
        pause = min(pause * 2, 0.5)


def _replaying(why: str) -> None:
    log.warning("gpuledger: COMMIT outcome unknown (%s); running the operation again, which "
                "is safe to replay (its idempotency key, or a state it finds set)", why)


class _Unknown(Exception):
    """COMMIT returned, but with a warning that it may be on the primary alone."""


def _first_line(exc: DBAPIError) -> str:
    text = str(exc.orig).strip() if exc.orig is not None else str(exc)
    return text.splitlines()[0] if text else type(exc.orig or exc).__name__


def outcome_unknown(why: str) -> OutcomeUnknown:
    return OutcomeUnknown(
        f"the ledger database may or may not have made this change ({why}); an operation "
        "with an idempotency key may be repeated with the same key, check anything else "
        "before repeating it")
