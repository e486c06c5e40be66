"""``verify`` reads one consistent snapshot: it passes while writers keep the ledger busy."""

from __future__ import annotations

import threading

from sqlalchemy import text

from ledger.views import HoldRequest

WRITERS = 3
VERIFIES = 12


def test_verify_passes_every_time_while_writers_run(ledger):
    tokens = [ledger.mint("physics", 10**9)[0] for _ in range(WRITERS)]
    stop, errors, done = threading.Event(), [], [0] * WRITERS

    def writer(i: int) -> None:
        try:
            while not stop.is_set():
                hold = ledger.reserve(tokens[i], HoldRequest(gpus=1, seconds=60,
                                                             gpu_type="h100"))
                ledger.post(hold.id, 30, key=f"w{i}-{done[i]}")
                done[i] += 1
        except Exception as exc:  # noqa: BLE001 - reported by the test below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(WRITERS)]
    for t in threads:
        t.start()
    results = []
    try:
        while sum(done) < WRITERS:  # every writer is under way
            stop.wait(0.01)
        for _ in range(VERIFIES):
            results.append(ledger.verify_journal())
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors
    assert [r.problem for r in results if not r.ok] == []
    heads = [r.head_seq for r in results]
    assert heads[-1] > heads[0], "the writers made no progress while verify ran"
    assert ledger.verify_journal().ok


def test_verify_under_load_still_names_real_tampering(ledger):
    token, view = ledger.mint("physics", 10**9)
    hold = ledger.reserve(token, HoldRequest(gpus=1, seconds=60, gpu_type="h100"))
    with ledger.engine.begin() as conn:
        conn.execute(text("UPDATE holds SET amount = amount + 1 WHERE id = :h"), {"h": hold.id})
    stop = threading.Event()

    def writer() -> None:
        other = ledger.mint("physics", 10**9)[0]
        while not stop.is_set():
            h = ledger.reserve(other, HoldRequest(gpus=1, seconds=60, gpu_type="h100"))
            ledger.void(h.id)

    t = threading.Thread(target=writer)
    t.start()
    try:
        results = [ledger.verify_journal() for _ in range(4)]
    finally:
        stop.set()
        t.join()
    assert all(not r.ok and r.problems == [f"hold {hold.id}: amount is 61 but the journal "
                                           "says 60"] for r in results), \
        [r.problems for r in results]
