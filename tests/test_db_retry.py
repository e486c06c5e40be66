"""The one retry rule (``ledger.dbretry``) and the write runner that applies it
(``ledger.db.run_write``), without Patroni: driver errors classified from their codes; a
database that is away tried again for ``unavailable_wait`` and then named; a read-only
server (25006, as right after a failover) tried again on a fresh connection; a COMMIT
whose reply is lost (a TCP proxy cuts the connection, ``faultproxy``) or that came with a
WARNING (PostgreSQL's sign of a cancelled synchronous-replication wait) retried only by
operations that carry their idempotency key or set a state — and applied once —, while
the others fail with ``OutcomeUnknown``; PostgreSQL sessions run without
statement_timeout. The failover under load itself: tests/ha (tests/lanes/patroni).
"""

from __future__ import annotations

import socket
import time

import psycopg
import pymysql
import pytest
from conftest import PG_ADMIN_URL, _server_db, seeded
from faultproxy import AFTER_COMMIT, BEFORE_COMMIT, FaultProxy
from sqlalchemy import event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from ledger import db
from ledger.dbretry import Verdict, commit_warning, verdict
from ledger.errors import OutcomeUnknown, StorageError
from ledger.reserve import ReserveItem, hold_key, new_hold_id
from ledger.service import Ledger
from ledger.views import HoldRequest

H = 3600


def wrap(orig: Exception) -> DBAPIError:
    """The driver's exception as SQLAlchemy raises it (same class choice, same ``orig``)."""
    base = psycopg.Error if isinstance(orig, psycopg.Error) else pymysql.Error
    return DBAPIError.instance("COMMIT", None, orig, base)


# -- the classification ------------------------------------------------------------------

LOST = psycopg.OperationalError("consuming input failed: server closed the connection "
                                "unexpectedly")


@pytest.mark.parametrize("orig, at_commit, expected", [
    # conflicts roll back, at COMMIT too (serialization failure, Galera certification)
    (psycopg.errors.SerializationFailure("could not serialize"), False, Verdict.CONFLICT),
    (psycopg.errors.SerializationFailure("could not serialize"), True, Verdict.CONFLICT),
    (psycopg.errors.DeadlockDetected("deadlock"), False, Verdict.CONFLICT),
    (psycopg.errors.LockNotAvailable("lock timeout"), False, Verdict.CONFLICT),
    (pymysql.err.OperationalError(1213, "Deadlock found"), True, Verdict.CONFLICT),
    (pymysql.err.OperationalError(1205, "Lock wait timeout"), False, Verdict.CONFLICT),
    (pymysql.err.OperationalError(1020, "Record has changed"), False, Verdict.CONFLICT),
    # nothing committed, the server cannot write now: try again while the wait lasts
    (psycopg.errors.ReadOnlySqlTransaction("cannot execute INSERT in a read-only "
                                           "transaction"), False, Verdict.UNAVAILABLE),
    (psycopg.errors.AdminShutdown("terminating connection due to administrator command"),
     False, Verdict.UNAVAILABLE),
    (psycopg.errors.CannotConnectNow("the database system is starting up"), False,
     Verdict.UNAVAILABLE),
    (psycopg.errors.CrashShutdown("crash of another server process"), False,
     Verdict.UNAVAILABLE),
    (psycopg.OperationalError("connection failed: Connection refused"), False,
     Verdict.UNAVAILABLE),
    (LOST, False, Verdict.UNAVAILABLE),
    (pymysql.err.OperationalError(2013, "Lost connection to server during query"), False,
     Verdict.UNAVAILABLE),
    (pymysql.err.OperationalError(1290, "running with the --read-only option"), False,
     Verdict.UNAVAILABLE),
    # the session ended during COMMIT: it may have committed
    (LOST, True, Verdict.UNKNOWN),
    (psycopg.errors.AdminShutdown("terminating connection due to administrator command"),
     True, Verdict.UNKNOWN),
    (pymysql.err.OperationalError(2013, "Lost connection to server during query"), True,
     Verdict.UNKNOWN),
    (pymysql.err.OperationalError(2006, "server has gone away"), True, Verdict.UNKNOWN),
    # answers: never retried
    (psycopg.errors.UniqueViolation("duplicate key"), False, Verdict.FINAL),
    (psycopg.errors.UniqueViolation("duplicate key"), True, Verdict.FINAL),
    (psycopg.errors.CheckViolation("balance >= 0"), False, Verdict.FINAL),
    (psycopg.errors.DiskFull("could not extend file"), True, Verdict.FINAL),
    (pymysql.err.IntegrityError(1062, "Duplicate entry"), True, Verdict.FINAL),
])
def test_verdict(orig, at_commit, expected):
    assert verdict(wrap(orig), at_commit=at_commit) is expected


def test_sqlite_busy_is_a_conflict_and_other_sqlite_errors_are_answers():
    import sqlite3
    busy = DBAPIError.instance("x", None, sqlite3.OperationalError("database is locked"),
                               sqlite3.Error)
    full = DBAPIError.instance("x", None, sqlite3.OperationalError("disk I/O error"),
                               sqlite3.Error)
    assert verdict(busy, at_commit=True) is Verdict.CONFLICT
    assert verdict(full, at_commit=False) is Verdict.FINAL


def test_commit_warning_is_any_warning_in_any_language():
    cancel = "canceling wait for synchronous replication due to user request"
    assert commit_warning([("NOTICE", "x"), ("WARNING", cancel)]) == cancel
    # the severity is the non-localized one; the message may be in the server's language
    assert commit_warning([("WARNING", "cancelando la espera")]) == "cancelando la espera"
    assert commit_warning([("NOTICE", "relation exists, skipping")]) is None
    assert commit_warning([]) is None


# -- run_write without a server ----------------------------------------------------------

def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_an_unreachable_database_is_tried_again_for_the_wait_then_named():
    engine = db.make_engine(f"postgresql+psycopg://gl@127.0.0.1:{_closed_port()}/x"
                            "?connect_timeout=2")
    calls = []
    t0 = time.monotonic()
    with pytest.raises(StorageError, match=r"^the ledger database is unavailable: .*"
                                           r"\(tried again for 0\.3 s\)$"):
        db.run_write(engine, lambda conn: calls.append(1), wait_s=0.3)
    took = time.monotonic() - t0
    assert calls == []  # never connected
    assert 0.3 <= took < 3
    with pytest.raises(StorageError, match="unavailable") as no_wait:
        db.run_write(engine, lambda conn: None, wait_s=0)
    assert "tried again" not in str(no_wait.value)
    engine.dispose()


def test_a_final_error_is_not_tried_again(tmp_path):
    engine = db.make_engine(f"sqlite:///{tmp_path / 'x.db'}")
    runs = []

    def fn(conn):
        runs.append(1)
        conn.exec_driver_sql("SELECT * FROM no_such_table")

    with pytest.raises(StorageError, match="no such table"):
        db.run_write(engine, fn, wait_s=5)
    assert runs == [1]


# -- on PostgreSQL, through a proxy that cuts COMMITs ----------------------------------

@pytest.fixture
def pg_url():
    yield from _server_db(PG_ADMIN_URL, "PostgreSQL on 127.0.0.1:5432")


@pytest.fixture
def pg_lg(pg_url, tmp_path):
    lg = seeded(pg_url, tmp_path / "keys")
    yield lg
    lg.engine.dispose()


@pytest.fixture
def pair(pg_url, tmp_path):
    """(ledger, proxy, ledger through the proxy): one database, a seeded ledger on a direct
    connection to check with and a second ledger whose COMMITs the proxy can cut."""
    lg = seeded(pg_url, tmp_path / "keys")
    url = make_url(pg_url)
    proxy = FaultProxy(url.host or "127.0.0.1", url.port or 5432)
    cut_url = url.set(host="127.0.0.1", port=proxy.port).update_query_dict(
        {"sslmode": "disable", "connect_timeout": "2"})
    engine = db.make_engine(cut_url)
    far = Ledger(engine, keys_dir=tmp_path / "keys", clock=lg.clock, unavailable_wait=5)
    far.reload_keys()  # a read's COMMIT is a COMMIT too: the cuts are for the writes
    yield lg, proxy, far
    engine.dispose()
    proxy.close()
    lg.engine.dispose()


def count(lg: Ledger, sql: str, **params) -> int:
    with lg.engine.connect() as conn:
        return conn.execute(text(sql), params).scalar()


def commits(engine) -> list[int]:
    seen: list[int] = []
    event.listen(engine, "commit", lambda conn: seen.append(1))
    return seen


REQ = HoldRequest(gpus=1, seconds=H, gpu_type="h100", account="physics")


@pytest.mark.parametrize("mode", [AFTER_COMMIT, BEFORE_COMMIT])
def test_a_keyed_reserve_whose_commit_was_cut_is_applied_once(pair, mode):
    lg, proxy, far = pair
    token, view = lg.mint("physics", 10 * H)
    tries = commits(far.engine)
    proxy.arm(mode)
    hold = far.reserve(token, REQ, key="slurm-42")
    assert proxy.cuts == [mode]
    assert len(tries) == 2  # the cut COMMIT, then the run that found (or made) the hold
    assert count(lg, "SELECT count(*) FROM holds WHERE token_id = :t", t=view.id) == 1
    assert count(lg, "SELECT count(*) FROM journal WHERE kind = 'reserve' AND hold_id = :h",
                 h=hold.id) == 1
    assert lg.inspect(view.id).remaining == 9 * H
    assert far.reserve(token, REQ, key="slurm-42").id == hold.id  # a later replay: the same
    assert lg.verify_journal().ok


@pytest.mark.parametrize("mode, exists", [(AFTER_COMMIT, 1), (BEFORE_COMMIT, 0)])
def test_a_reserve_without_key_whose_commit_was_cut_is_outcome_unknown(pair, mode, exists):
    """The client cannot tell the two cuts apart: the hold exists after one, not after the
    other. Without a key the ledger says so instead of guessing."""
    lg, proxy, far = pair
    token, view = lg.mint("physics", 10 * H)
    proxy.arm(mode)
    with pytest.raises(OutcomeUnknown, match=r"may or may not have made this change \(the "
                                             r"connection was lost during COMMIT"):
        far.reserve(token, REQ)
    assert count(lg, "SELECT count(*) FROM holds WHERE token_id = :t", t=view.id) == exists
    assert lg.verify_journal().ok


def test_post_void_and_link_whose_commits_were_cut_are_applied_once(pair):
    lg, proxy, far = pair
    token, view = lg.mint("physics", 10 * H)
    a = lg.reserve(token, REQ, key="a")
    b = lg.reserve(token, REQ, key="b")
    proxy.arm(AFTER_COMMIT, times=3)
    far.link_job(a.id, "77", 0)
    far.post(a.id, 1800, key=f"{a.id}:77:0:node1", final=False, cap=True, job_id="77",
             node="node1", restart=0)
    far.void(b.id, reason="cancelled")
    assert proxy.cuts == [AFTER_COMMIT] * 3
    assert count(lg, "SELECT count(*) FROM charges WHERE hold_id = :h", h=a.id) == 1
    assert count(lg, "SELECT count(*) FROM journal WHERE kind = 'charge'") == 1
    assert count(lg, "SELECT count(*) FROM journal WHERE kind = 'void'") == 1
    assert count(lg, "SELECT count(*) FROM journal WHERE kind = 'link'") == 1
    assert lg.hold(b.id).state == "voided"
    assert lg.wallet_balance("system:usage") == 1800
    assert lg.inspect(view.id).remaining == 10 * H - H  # b returned, a still holds an hour
    assert lg.verify_journal().ok


def test_bind_and_resize_are_replay_safe_without_a_key(pair):
    """Neither carries a key from the daemon: a second run finds the job bound, the hold
    priced at the new figures, and moves nothing (resize journals a zero resize)."""
    lg, proxy, far = pair
    token, view = lg.mint("physics", 10 * H)
    hold = lg.reserve(token, REQ, key="c")
    proxy.arm(AFTER_COMMIT, times=2)
    far.bind(hold.id, "78")
    far.resize(hold.id, seconds=3 * H)
    assert proxy.cuts == [AFTER_COMMIT] * 2
    assert lg.hold(hold.id).amount == 3 * H
    assert lg.inspect(view.id).remaining == 7 * H
    assert count(lg, "SELECT count(*) FROM journal WHERE kind = 'bind'") == 1
    moved = count(lg, "SELECT coalesce(sum(amount), 0) FROM journal WHERE kind = 'resize'")
    assert moved == 2 * H
    assert lg.verify_journal().ok


def test_the_daemons_batched_holds_are_keyed_by_their_ids(pair):
    lg, proxy, far = pair
    token, view = lg.mint("physics", 10 * H)
    items = [ReserveItem(new_hold_id(), token, REQ) for _ in range(3)]
    proxy.arm(AFTER_COMMIT)
    out = far.reserve_many(items)
    assert [h.id for h in out] == [i.hold_id for i in items]
    assert count(lg, "SELECT count(*) FROM holds WHERE token_id = :t", t=view.id) == 3
    assert count(lg, "SELECT count(*) FROM idempotency WHERE " + '"key"' + " = :k",
                 k=hold_key(items[0].hold_id)) == 1
    assert lg.inspect(view.id).remaining == 7 * H


def test_the_retry_after_an_unknown_outcome_writes_so_its_commit_waits_for_the_standby(pair):
    lg, proxy, far = pair
    token, _ = lg.mint("physics", 10 * H)
    touched: list[str] = []
    event.listen(far.engine, "before_cursor_execute",
                 lambda *a: touched.append(a[2]) if "chain_head SET seq = seq" in a[2] else None)
    far.reserve(token, REQ, key="d")
    assert touched == []  # not in a plain run
    proxy.arm(AFTER_COMMIT)
    far.reserve(token, REQ, key="e")
    assert len(touched) == 1


def test_the_database_away_longer_than_the_wait_leaves_a_keyed_reserve_unknown(pair):
    lg, proxy, far = pair
    token, view = lg.mint("physics", 10 * H)
    far.unavailable_wait = 0.4
    proxy.arm(AFTER_COMMIT)
    proxy.close()  # and nothing answers any more
    with pytest.raises(OutcomeUnknown, match="did not answer again within 0.4 s"):
        far.reserve(token, REQ, key="f")
    assert count(lg, "SELECT count(*) FROM holds WHERE token_id = :t", t=view.id) == 1


# -- on PostgreSQL: read-only servers, warnings at COMMIT, statement_timeout --------------

def test_a_read_only_server_is_tried_again_on_a_fresh_connection(pg_url, pg_lg, tmp_path):
    lg = pg_lg
    token, view = lg.mint("physics", 10 * H)
    engine = db.make_engine(pg_url)
    connects: list[int] = []

    @event.listens_for(engine, "connect")
    def _first_is_a_replica(dbapi_conn, _record):
        connects.append(1)
        if len(connects) == 1:  # as a demoted primary, or a replica HAProxy still sent us to
            with dbapi_conn.cursor() as cur:
                cur.execute("SET default_transaction_read_only = on")
            dbapi_conn.commit()

    far = Ledger(engine, keys_dir=tmp_path / "keys", clock=lg.clock, unavailable_wait=5)
    try:
        _read_only(far, lg, engine, pg_url, token, view, connects)
    finally:
        engine.dispose()


def _read_only(far, lg, engine, pg_url, token, view, connects):
    hold = far.reserve(token, REQ)  # no key needed: nothing was committed
    assert len(connects) == 2
    assert lg.hold(hold.id).state == "pending"
    far.unavailable_wait = 0
    with engine.connect() as conn:  # every connection read-only now: named at once
        conn.exec_driver_sql("ALTER DATABASE " + make_url(pg_url).database +
                             " SET default_transaction_read_only = on")
        conn.commit()
    engine.dispose()
    with pytest.raises(StorageError, match="^the ledger database is read-only: cannot execute"):
        far.reserve(token, REQ)
    assert lg.inspect(view.id).remaining == 9 * H


WARN_AT_COMMIT = """
CREATE SEQUENCE gl_warn_once;
CREATE FUNCTION gl_warn() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF nextval('gl_warn_once') = 1 THEN
    RAISE WARNING 'canceling wait for synchronous replication due to user request'
      USING DETAIL = 'The transaction has already committed locally, but might not have '
                     'been replicated to the standby.';
  END IF;
  RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER gl_warn AFTER INSERT ON holds
  DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION gl_warn();
"""


@pytest.mark.parametrize("key", ["g", None])
def test_a_warning_at_commit_is_an_unknown_outcome(pg_lg, key):
    """A deferred trigger raises, during COMMIT, the WARNING PostgreSQL sends when a
    synchronous commit's wait is cancelled: COMMIT succeeds, and the ledger does not take
    that as acknowledged."""
    lg = pg_lg
    with lg.engine.connect() as conn:
        conn.exec_driver_sql(WARN_AT_COMMIT)
        conn.commit()
    token, view = lg.mint("physics", 10 * H)
    lg.reload_keys()  # its read's COMMIT is not counted below
    tries = commits(lg.engine)
    if key is None:
        with pytest.raises(OutcomeUnknown, match="COMMIT returned with a warning: canceling "
                                                 "wait for synchronous replication"):
            lg.reserve(token, REQ)
    else:
        lg.reserve(token, REQ, key=key)
        assert len(tries) == 2
    assert count(lg, "SELECT count(*) FROM holds WHERE token_id = :t", t=view.id) == 1
    assert lg.inspect(view.id).remaining == 9 * H


def test_sessions_run_without_statement_timeout(pg_url, tmp_path):
    admin = db.make_engine(pg_url)
    with admin.connect() as conn:
        conn.exec_driver_sql("ALTER DATABASE " + make_url(pg_url).database +
                             " SET statement_timeout = '20ms'")
        conn.commit()
    admin.dispose()
    url = make_url(pg_url).update_query_dict({"options": "-c lock_timeout=5s"})
    engine = db.make_engine(url)
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SHOW statement_timeout").scalar() == "0"
        assert conn.exec_driver_sql("SHOW lock_timeout").scalar() == "5s"  # the URL's kept
        conn.exec_driver_sql("SELECT pg_sleep(0.1)")  # would be cancelled at 20 ms
    engine.dispose()
