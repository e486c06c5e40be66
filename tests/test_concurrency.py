"""Concurrent writers on each database: no overdraft, one effect per idempotency key."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from ledger.errors import Reason, Refusal
from ledger.views import HoldRequest

WORKERS = 64


def test_64_workers_reserve_against_one_token(ledger):
    amount = 600
    balance = 10 * amount + 599  # room for exactly 10 holds
    token, view = ledger.mint("physics", balance)
    request = HoldRequest(gpus=1, seconds=amount, gpu_type="h100")

    def attempt(i):
        try:
            return ledger.reserve(token, request, key=f"worker-{i}")
        except Refusal as exc:
            assert exc.reason is Reason.INSUFFICIENT
            return None

    with ThreadPoolExecutor(WORKERS) as pool:
        results = list(pool.map(attempt, range(WORKERS)))
    won = [r for r in results if r is not None]
    assert len(won) == balance // amount
    state = ledger.inspect(view.id)
    assert state.held == len(won) * amount
    assert state.remaining == balance - len(won) * amount
    assert ledger.sum_balances() == 0
    assert ledger.verify_journal().ok


def test_replays_have_exactly_one_effect(ledger):
    token, view = ledger.mint("physics", 100_000)
    request = HoldRequest(gpus=2, seconds=300, gpu_type="h100")
    keys = [f"job-{i}" for i in range(8)] * 4  # each key 4 times, interleaved

    with ThreadPoolExecutor(32) as pool:
        holds = list(pool.map(lambda k: ledger.reserve(token, request, key=k), keys))
    by_key = {}
    for k, h in zip(keys, holds):
        by_key.setdefault(k, set()).add(h.id)
    assert all(len(ids) == 1 for ids in by_key.values())
    assert ledger.inspect(view.id).held == 8 * 600

    ids = [next(iter(v)) for v in by_key.values()]
    jobs = [(hid, 123) for hid in ids] * 3
    with ThreadPoolExecutor(24) as pool:
        posted = list(pool.map(lambda a: ledger.post(a[0], a[1], key=f"settle-{a[0]}"), jobs))
    assert {p.state for p in posted} == {"posted"}
    assert ledger.wallet_balance("system:usage") == 8 * 123
    assert ledger.inspect(view.id).remaining == 100_000 - 8 * 123
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda _: ledger.expire(), range(8)))
    assert ledger.verify_journal().ok and ledger.sum_balances() == 0


def test_concurrent_splits_and_transfers_never_overdraw(ledger):
    token, view = ledger.mint("physics", 10_000)
    other, oview = ledger.mint("physics", 1)

    def op(i):
        try:
            if i % 2:
                ledger.split(token, 700)
            else:
                ledger.transfer(view.id, oview.id, 700, reason=f"t{i}")
            return True
        except Refusal:
            return False

    with ThreadPoolExecutor(32) as pool:
        ok = sum(pool.map(op, range(40)))
    assert ok == 10_000 // 700
    assert ledger.inspect(view.id).remaining == 10_000 - ok * 700
    assert ledger.verify_journal().ok and ledger.sum_balances() == 0
