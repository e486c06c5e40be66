"""What a driver error means for the write that got it: the one retry rule.

A write transaction that fails is in one of four states, and the rule that decides which
is the same on SQLite, PostgreSQL (alone or under Patroni) and MariaDB:

* ``CONFLICT``: it lost a conflict (deadlock, lock wait timeout, serialization failure,
  MariaDB's snapshot-isolation "record has changed", SQLite's busy lock). Nothing was
  committed; the whole transaction runs again, a few times.
* ``UNAVAILABLE``: nothing was committed and the database cannot take writes right now:
  the connection could not be made or was lost *before* COMMIT, the server is read-only
  (PostgreSQL 25006 on a replica or a demoted primary just after a Patroni failover,
  MariaDB's ``--read-only``), shutting down, starting up or in recovery. The transaction
  runs again while the caller's wait lasts (``[database] unavailable_wait``).
* ``UNKNOWN``: the connection was lost, or the server ended the session, *during* COMMIT.
  The commit may have happened: a primary killed while it waited for its synchronous
  standby has the row locally, and the standby may have it too. Only an operation that is
  safe to replay — one that carries its idempotency key, or sets a state that a second run
  finds already set — may run again; any other raises :class:`OutcomeUnknown`.
* ``FINAL``: any other error (a constraint, a bad statement, a full disk): an answer.

One more case is ``UNKNOWN`` although COMMIT returned: PostgreSQL answers success, with
only a WARNING ("canceling wait for synchronous replication"), when a synchronous commit's
wait is cancelled — the row is committed on the primary alone and a failover can lose it.
:func:`commit_warning` finds that warning among the notices received during COMMIT; the
ledger's sessions also run without ``statement_timeout`` (``ledger.db``), which would
cancel that wait.
"""

from __future__ import annotations

from enum import Enum

from sqlalchemy.exc import DBAPIError, OperationalError


class Verdict(Enum):
    CONFLICT = "conflict"
    UNAVAILABLE = "unavailable"
    UNKNOWN = "unknown"
    FINAL = "final"


# PostgreSQL: a transaction that lost a conflict and may simply run again.
PG_CONFLICTS = frozenset({
    "40001",  # serialization_failure
    "40P01",  # deadlock_detected
    "55P03",  # lock_not_available (lock_timeout)
})
# PostgreSQL: the server cannot take this write now; nothing of it was committed (when the
# error came before COMMIT).
PG_UNAVAILABLE = frozenset({
    "25006",  # read_only_sql_transaction: a replica, or a primary Patroni just demoted
    "57P01",  # admin_shutdown: terminating connection due to administrator command
    "57P02",  # crash_shutdown: another server process crashed
    "57P03",  # cannot_connect_now: starting up, shutting down, in recovery
    "53300",  # too_many_connections
})
# 08xxx connection_exception: the session is gone.
PG_CONNECTION_CLASS = "08"
# The session ended while COMMIT was in flight.
PG_COMMIT_UNKNOWN = frozenset({"57P01", "57P02", "40003"})  # 40003: statement_completion_unknown

MARIADB_CONFLICTS = frozenset({
    1213,  # ER_LOCK_DEADLOCK (and a Galera certification failure)
    1205,  # ER_LOCK_WAIT_TIMEOUT
    1020,  # ER_CHECKREAD: innodb_snapshot_isolation saw a row change since its read view
})
MARIADB_UNAVAILABLE = frozenset({
    1290,  # ER_OPTION_PREVENTS_STATEMENT (--read-only)
    1792,  # ER_CANT_EXECUTE_IN_READ_ONLY_TRANSACTION
    1836,  # ER_READ_ONLY_MODE
    1047,  # ER_UNKNOWN_COM_ERROR: a Galera node that is not ready
    1053,  # ER_SERVER_SHUTDOWN
    1927,  # ER_CONNECTION_KILLED
    1040,  # ER_CON_COUNT_ERROR: too many connections
})
MARIADB_LOST = frozenset({
    2002, 2003,  # cannot connect
    2006,  # server has gone away
    2013,  # lost connection during query
    2055,  # lost connection (system error)
})


def _sqlstate(orig) -> str | None:
    state = getattr(orig, "sqlstate", None)
    return state if isinstance(state, str) else None


def _code(orig) -> int | None:
    args = getattr(orig, "args", ())
    return args[0] if args and isinstance(args[0], int) else None


def lost_connection(exc: DBAPIError) -> bool:
    """The session is gone (or never came): the driver said so, SQLAlchemy judged it a
    disconnect, or it is a PostgreSQL/MariaDB error of that kind."""
    if exc.connection_invalidated:
        return True
    orig = exc.orig
    state = _sqlstate(orig)
    if state is not None:
        return state.startswith(PG_CONNECTION_CLASS)
    if _code(orig) in MARIADB_LOST:
        return True
    # psycopg reports a connection that failed or broke without a SQLSTATE ("connection
    # refused", "server closed the connection unexpectedly", "consuming input failed").
    return isinstance(exc, OperationalError) and orig is not None and \
        type(orig).__module__.startswith("psycopg") and state is None


def verdict(exc: DBAPIError, *, at_commit: bool) -> Verdict:
    """The state a failed write transaction is in (see the module's docstring).

    ``at_commit``: the error came from COMMIT itself (everything before it succeeded)."""
    orig = exc.orig
    state, code = _sqlstate(orig), _code(orig)
    if state in PG_CONFLICTS or code in MARIADB_CONFLICTS or "database is locked" in str(orig):
        return Verdict.CONFLICT  # rolled back, at COMMIT too (serialization, certification)
    if at_commit and (lost_connection(exc) or state in PG_COMMIT_UNKNOWN or
                      code in (1053, 1927)):
        return Verdict.UNKNOWN
    if state in PG_UNAVAILABLE or code in MARIADB_UNAVAILABLE or lost_connection(exc):
        return Verdict.UNAVAILABLE
    return Verdict.FINAL


def commit_warning(notices: list[tuple[str, str]]) -> str | None:
    """The first WARNING among the (non-localized severity, message) notices received
    during COMMIT, as text; None when there was none.

    PostgreSQL sends one — "canceling wait for synchronous replication …", DETAIL "The
    transaction has already committed locally, but might not have been replicated to the
    standby" — when a synchronous commit's wait was cancelled and it returns success all
    the same. COMMIT sends no other warning in a transaction that wrote, so any WARNING
    (whatever the server's language) makes the outcome unknown."""
    for severity, message in notices:
        if severity == "WARNING":
            return message.strip() or "WARNING"
    return None
