"""Group sealing (ledger/journal.py): on a server database a writer that finds the chain
head taken leaves its journal rows pending instead of queueing on the head; the next writer
to take the head chains them before its own. Money moves at once (token wallets, holds);
the system wallets move when the rows are chained; everything that reads the journal sees
pending rows (a hold's facts, a token's birth, verify), or chains them first."""

from __future__ import annotations

import threading
from contextlib import contextmanager

from sqlalchemy import text

from ledger import audit
from ledger.errors import Reason, Refusal
from ledger.views import HoldRequest

H = 3600
REQ = HoldRequest(gpus=1, seconds=600, gpu_type="h100", user="alice")


def pending(lg) -> int:
    with lg.engine.connect() as c:
        return c.execute(text("SELECT COUNT(*) FROM journal_pending")).scalar()


def chained(lg) -> int:
    with lg.engine.connect() as c:
        return c.execute(text("SELECT seq FROM chain_head WHERE id = 1")).scalar()


@contextmanager
def head_taken(lg):
    """Another transaction holds the chain head's row lock (as a writer chaining would)."""
    with lg.engine.connect() as c, c.begin():
        c.execute(text("SELECT seq FROM chain_head WHERE id = 1 FOR UPDATE"))
        yield


def test_rows_wait_while_the_head_is_taken_and_the_next_writer_chains_them(ledger, db_url):
    token, view = ledger.mint("physics", 10 * H)
    spare, spare_view = ledger.mint("physics", H)
    before = chained(ledger)
    if db_url.startswith("sqlite"):  # one writer at a time: the head is never taken
        hold = ledger.reserve(token, REQ)
        ledger.post(hold.id, 300)
        assert pending(ledger) == 0 and chained(ledger) == before + 3
        assert ledger.seal_pending() == 0 and ledger.verify_journal().ok
        return
    with head_taken(ledger):
        hold = ledger.reserve(token, REQ)  # does not wait for the head
        assert pending(ledger) == 1 and chained(ledger) == before
        assert ledger.inspect(view.id).remaining == 10 * H - 600  # the token paid at once
        posted = ledger.post(hold.id, 300)  # the hold's facts include its pending reserve
        assert posted.state == "posted" and posted.charged == 300
        ledger.revoke(spare_view.id, reason="test")  # its birth row is chained: found
        with audit.snapshot(ledger.engine) as conn:
            result = audit.verify(conn)
        assert result.ok, result.problems
        assert result.pending == 4 and result.rows == before
        with ledger.engine.connect() as c:  # escrow and usage move when rows are chained
            usage = c.execute(text("SELECT balance FROM wallets WHERE code = 'system:usage'"))
            assert usage.scalar() == 0
    late, late_view = ledger.mint("physics", H)  # takes the head: chains the four, then its own
    assert pending(ledger) == 0 and chained(ledger) == before + 5
    rows = ledger.journal()[-5:]
    assert [r["kind"] for r in rows] == ["reserve", "charge", "release", "revoke", "mint"]
    assert rows[-1]["token_id"] == late_view.id
    assert ledger.wallet_balance("system:usage") == 300
    assert ledger.wallet_balance("system:escrow") == 0
    result = ledger.verify_journal()
    assert result.ok and result.pending == 0, result.problems


def test_a_token_minted_while_the_head_is_taken_can_be_spent_and_revoked(ledger, db_url):
    if db_url.startswith("sqlite"):
        assert ledger.seal_pending() == 0
        return
    with head_taken(ledger):
        token, view = ledger.mint("physics", H)  # its mint row pending
        hold = ledger.reserve(token, REQ)
        ledger.void(hold.id)
        ledger.revoke(view.id, reason="test")  # the pool is found from the pending mint row
        assert pending(ledger) == 4
    assert ledger.seal_pending() == 4 and pending(ledger) == 0
    pool = ledger.wallet_balance("account:physics")
    assert pool == H and ledger.verify_journal().ok


def test_seal_pending_waits_for_the_head_and_chains_everything(ledger, db_url):
    if db_url.startswith("sqlite"):
        assert ledger.seal_pending() == 0
        return
    token, _ = ledger.mint("physics", 10 * H)
    release = threading.Event()
    done: list[int] = []

    def holder():
        with head_taken(ledger):
            release.wait(10)

    t = threading.Thread(target=holder)
    t.start()
    try:
        for _ in range(3):
            ledger.reserve(token, REQ)
        assert pending(ledger) == 3
        sealer = threading.Thread(target=lambda: done.append(ledger.seal_pending()))
        sealer.start()
        sealer.join(0.5)
        assert sealer.is_alive() and not done  # waiting for the head
    finally:
        release.set()
        t.join(10)
    sealer.join(10)
    assert done == [3] and pending(ledger) == 0 and ledger.verify_journal().ok


def test_concurrent_writers_leave_a_sound_ledger_with_rows_pending_or_chained(ledger, db_url):
    """Eight threads reserve and post on two tokens: whatever they left pending, verify
    passes on the snapshot as it is, and again after chaining; balances add up."""
    tokens = [ledger.mint("physics", 100 * H) for _ in range(2)]
    errors: list[BaseException] = []

    def work(i):
        token = tokens[i % 2][0]
        try:
            for _ in range(15):
                hold = ledger.reserve(token, REQ)
                ledger.post(hold.id, 100)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    with audit.snapshot(ledger.engine) as conn:
        as_left = audit.verify(conn)
    assert as_left.ok, as_left.problems
    ledger.seal_pending()
    result = ledger.verify_journal()
    assert result.ok and result.pending == 0, result.problems
    for _token, view in tokens:
        assert ledger.inspect(view.id).remaining == 100 * H - 4 * 15 * 100
    assert ledger.wallet_balance("system:usage") == 8 * 15 * 100
    print(f"rows left pending by the writers: {as_left.pending}")


def test_an_overdraft_is_refused_while_rows_wait(ledger, db_url):
    token, view = ledger.mint("physics", 600)
    ctx = head_taken(ledger) if not db_url.startswith("sqlite") else _nothing()
    with ctx:
        ledger.reserve(token, REQ)
        try:
            ledger.reserve(token, REQ)
        except Refusal as exc:
            assert exc.reason in (Reason.INSUFFICIENT, Reason.EXHAUSTED)
        else:
            raise AssertionError("a second hold on a spent token was accepted")
    assert ledger.inspect(view.id).remaining == 0 and ledger.verify_journal().ok


@contextmanager
def _nothing():
    yield


def test_verify_names_a_pending_row_that_disagrees_with_the_tables(ledger, db_url):
    """A charge missing from the charges table is found whether its journal row is chained
    or still pending; both are named, the chained one first."""
    if db_url.startswith("sqlite"):
        assert ledger.seal_pending() == 0
        return
    token, _ = ledger.mint("physics", 10 * H)
    first = ledger.reserve(token, REQ)
    ledger.post(first.id, 100)
    with head_taken(ledger):
        second = ledger.reserve(token, REQ)
        ledger.post(second.id, 200)
        with ledger.engine.begin() as c:
            c.execute(text("DELETE FROM charges"))
        with audit.snapshot(ledger.engine) as conn:
            result = audit.verify(conn)
    assert not result.ok and result.pending == 3
    missing = [p for p in result.problems if "missing from the charges table" in p]
    assert len(missing) == 2 and first.id in missing[0] and second.id in missing[1]
    assert "(journal row pending " in missing[1]
