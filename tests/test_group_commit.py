"""Group commit on SQLite (ledger/groupcommit.py): operations that threads ask for while
another transaction commits share the next transaction, each in its own savepoint, and
each caller still gets its own outcome — a result made durable, its own refusal, or the
error its own operation raises."""

from __future__ import annotations

import sqlite3
import threading
import time

import pytest

from ledger.errors import Reason, Refusal
from ledger.views import HoldRequest

H = 3600
REQ = HoldRequest(gpus=1, seconds=600, gpu_type="h100", user="alice")  # 600 GPU-s


def _db_path(lg) -> str:
    return lg.engine.url.database


class Queued:
    """Run callables in threads while another connection holds SQLite's write lock, so
    that the first becomes the leader blocked in BEGIN IMMEDIATE and the rest queue behind
    it; release() lets them go. outcomes[i] is the i-th callable's result or exception."""

    def __init__(self, lg, calls):
        self.lg = lg
        self.blocker = sqlite3.connect(_db_path(lg), isolation_level=None)
        self.blocker.execute("BEGIN IMMEDIATE")
        self.outcomes: list = [None] * len(calls)
        self.threads = []
        for i, call in enumerate(calls):
            thread = threading.Thread(target=self._run, args=(i, call))
            thread.start()
            self.threads.append(thread)
            if i == 0:  # the leader first, alone in its batch
                self._wait(lambda: lg._group._leading)
        self._wait(lambda: len(lg._group._queue) == len(calls) - 1)

    def _run(self, i, call):
        try:
            self.outcomes[i] = call()
        except Exception as exc:  # noqa: BLE001 - the outcome under test
            self.outcomes[i] = exc

    @staticmethod
    def _wait(cond, timeout=10.0):
        end = time.monotonic() + timeout
        while not cond():
            assert time.monotonic() < end, "threads did not queue"
            time.sleep(0.005)

    def release(self) -> list:
        self.blocker.execute("COMMIT")
        self.blocker.close()
        for thread in self.threads:
            thread.join(30)
            assert not thread.is_alive()
        return self.outcomes


def test_waiting_operations_share_one_transaction_and_each_gets_its_own_result(sqlite_ledger):
    lg = sqlite_ledger
    tokens = [lg.mint("physics", 10 * H)[0] for _ in range(5)]
    batches, grouped = lg._group.batches, lg._group.grouped
    queued = Queued(lg, [lambda t=t: lg.reserve(t, REQ) for t in tokens])
    holds = queued.release()
    assert all(h.state == "pending" and h.amount == 600 for h in holds)
    assert len({h.id for h in holds}) == 5
    # the leader alone, then the four that waited behind it in one transaction
    assert lg._group.batches - batches == 2 and lg._group.grouped - grouped == 4
    for token, hold in zip(tokens, holds):
        assert lg.inspect(token).remaining == 10 * H - 600
        assert lg.hold(hold.id).state == "pending"
    assert lg.verify_journal().ok


def test_a_refusal_in_a_shared_transaction_undoes_only_its_own_operation(sqlite_ledger):
    lg = sqlite_ledger
    token, _view = lg.mint("physics", 1500)  # two holds of 600 fit, the third does not
    other = lg.mint("physics", 10 * H)[0]
    rows_before = lg.head()[0]
    queued = Queued(lg, [lambda: lg.reserve(other, REQ)] +
                    [lambda: lg.reserve(token, REQ) for _ in range(3)] +
                    [lambda: lg.reserve(other, REQ)])
    out = queued.release()
    refused = [o for o in out if isinstance(o, Refusal)]
    assert len(refused) == 1 and refused[0].reason is Reason.INSUFFICIENT
    assert refused[0].needed == 600 and refused[0].available == 300
    held = [o for o in out if not isinstance(o, Exception)]
    assert len(held) == 4
    assert lg.inspect(token).remaining == 300
    assert lg.inspect(other).remaining == 10 * H - 1200
    assert lg._group.grouped >= 4
    # four reserve rows, nothing of the refused one
    assert lg.head()[0] == rows_before + 4
    result = lg.verify_journal()
    assert result.ok, result.problems


def test_a_refused_operation_leaves_no_row_and_no_balance_behind(sqlite_ledger):
    """An operation that wrote and then refused, inside a shared transaction: its savepoint
    takes back its balance movement and its journal row; the others commit."""
    lg = sqlite_ledger
    token, view = lg.mint("physics", 10 * H)

    def writes_then_refuses(tx):
        wallet = lg._token_row(tx.conn, view.id).wallet_id
        tx.move("test", wallet, tx.wallet_id("system:usage"), 1000, token_id=view.id)
        tx.flush()  # the balance moved in this transaction
        raise Refusal(Reason.INSUFFICIENT, "changed its mind")

    rows_before = lg.head()[0]
    queued = Queued(lg, [lambda: lg.reserve(token, REQ),
                         lambda: lg._write(writes_then_refuses),
                         lambda: lg.reserve(token, REQ)])
    first, refused, second = queued.release()
    assert isinstance(refused, Refusal) and str(refused) == "changed its mind"
    assert first.amount == second.amount == 600
    assert lg.inspect(token).remaining == 10 * H - 1200
    assert lg.head()[0] == rows_before + 2
    assert lg.verify_journal().ok


def test_an_error_that_is_not_a_refusal_runs_each_operation_alone(sqlite_ledger):
    """A bug (or a driver error) fails the shared transaction as a whole: every operation
    runs again in its own, so the others still succeed and the failing one gets its own
    error, once."""
    lg = sqlite_ledger
    token = lg.mint("physics", 10 * H)[0]
    calls = []

    def buggy(tx):
        calls.append(1)
        raise ZeroDivisionError("a bug")

    batches = lg._group.grouped
    queued = Queued(lg, [lambda: lg.reserve(token, REQ), lambda: lg.reserve(token, REQ),
                         lambda: lg._write(buggy), lambda: lg.reserve(token, REQ)])
    out = queued.release()
    assert isinstance(out[2], ZeroDivisionError)
    assert len(calls) == 2  # once in the shared transaction, once alone
    assert [o.amount for i, o in enumerate(out) if i != 2] == [600, 600, 600]
    assert lg._group.grouped == batches  # the shared one did not commit
    assert lg.inspect(token).remaining == 10 * H - 1800
    assert lg.verify_journal().ok


def test_replays_in_one_shared_transaction_are_answered_once(sqlite_ledger):
    """Two posts of one hold under one key, in the same transaction: the second finds the
    first's idempotency record (same transaction) and returns its result."""
    lg = sqlite_ledger
    token = lg.mint("physics", 10 * H)[0]
    hold = lg.reserve(token, REQ)
    queued = Queued(lg, [lambda: lg.reserve(token, REQ)] +
                    [lambda: lg.post(hold.id, 200, key="k-1") for _ in range(3)])
    out = queued.release()
    posts = out[1:]
    assert all(p.state == "posted" and p.charged == 200 for p in posts)
    assert lg.inspect(token).remaining == 10 * H - 200 - 600
    assert lg.verify_journal().ok


def test_many_threads_group_and_lose_nothing(sqlite_ledger):
    lg = sqlite_ledger
    tokens = [lg.mint("physics", 100 * H)[0] for _ in range(8)]
    errors = []

    def work(token):
        try:
            for _ in range(25):
                hold = lg.reserve(token, REQ)
                lg.post(hold.id, 100)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in tokens]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for token in tokens:
        assert lg.inspect(token).remaining == 100 * H - 25 * 100
    result = lg.verify_journal()
    assert result.ok, result.problems
    assert lg.head()[0] >= 8 * 25 * 3


def test_a_write_inside_a_write_is_an_error_not_a_hang(sqlite_ledger):
    lg = sqlite_ledger
    token = lg.mint("physics", 10 * H)[0]
    with pytest.raises(RuntimeError, match="inside another write"):
        lg._write(lambda tx: lg.reserve(token, REQ))
    assert lg.inspect(token).remaining == 10 * H
    assert lg.reserve(token, REQ).amount == 600  # the group is usable again


def test_only_sqlite_groups(ledger, db_url):
    """Server databases run writers side by side (group sealing keeps them off the head)."""
    assert (ledger._group is not None) == db_url.startswith("sqlite")


def test_the_daemons_threads_share_commits(sqlite_ledger):
    """The daemon's shape: one thread per connection, each asking for a reserve; those that
    arrive while a commit is under way are written in one transaction, and every client
    gets its own hold, durable when it is answered."""
    from daemon_helpers import LiveDaemon

    from ledger.daemon.client import Client

    lg = sqlite_ledger
    tokens = [lg.mint("physics", 10 * H)[0] for _ in range(6)]
    daemon = LiveDaemon(lg, accounts=lambda user: frozenset({"physics"})).start()
    try:
        def reserve(token, i):
            with Client(daemon.path) as c:
                return c.call("reserve", token=token, gpus=1, type="h100", seconds=600,
                              user="alice", account="physics", key=f"daemon-{i}")

        grouped = lg._group.grouped
        out = Queued(lg, [lambda t=t, i=i: reserve(t, i)
                          for i, t in enumerate(tokens)]).release()
    finally:
        daemon.close()
    assert [r["ok"] for r in out] == ["1"] * 6, out
    assert lg._group.grouped - grouped == 5  # all but the leader, in one transaction
    for token, reply in zip(tokens, out):
        assert lg.hold(reply["hold"]).amount == 600
        assert lg.inspect(token).remaining == 10 * H - 600
    assert lg.verify_journal().ok
