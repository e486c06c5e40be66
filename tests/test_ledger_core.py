"""Ledger operations on each database: balances, holds, refusals, state rules."""

from __future__ import annotations

from datetime import timedelta

import pytest

from ledger.errors import (AlreadyExists, IdempotencyConflict, InvalidInput, NotFound, Reason,
                           Refusal, StateError)
from ledger.queries import account_views
from ledger.tokens import Scopes
from ledger.views import HoldRequest

H = 3600


def req(gpus=1, minutes=60, gpu_type="h100", **kw):
    return HoldRequest(gpus=gpus, seconds=minutes * 60, gpu_type=gpu_type, **kw)


def test_mint_split_reserve_post_balances(ledger):
    token, view = ledger.mint("physics", 10 * H)
    assert (view.face, view.remaining, view.status) == (10 * H, 10 * H, "active")
    child, cview = ledger.split(token, 2 * H + 1800)
    assert ledger.inspect(token).remaining == 7 * H + 1800
    assert cview.remaining == 2 * H + 1800 and cview.parent == view.id
    hold = ledger.reserve(token, req(gpus=2, minutes=60, user="alice"), key="j1")
    assert hold.amount == 2 * H and hold.state == "pending"
    assert ledger.inspect(token).held == 2 * H
    assert ledger.inspect(token).remaining == 5 * H + 1800
    done = ledger.post(hold.id, 1800)
    assert (done.state, done.charged, done.returned) == ("posted", 1800, 2 * H - 1800)
    assert ledger.inspect(token).remaining == 7 * H
    assert ledger.wallet_balance("system:usage") == 1800
    assert ledger.wallet_balance("system:escrow") == 0
    assert ledger.sum_balances() == 0
    assert ledger.verify_journal().ok


def test_rates_apply_to_new_holds_and_round_up(ledger):
    token, _ = ledger.mint("physics", 10 * H)
    a = ledger.reserve(token, req(gpus=1, minutes=10, gpu_type="a100"))
    assert a.amount == 360 and a.rate_ppm == 600_000
    ledger.set_rate("a100", 700_000)
    assert ledger.hold(a.id).rate_ppm == 600_000
    b = ledger.reserve(token, HoldRequest(gpus=1, seconds=7, gpu_type="l40s"))
    assert b.amount == 4 and b.rate_ppm == 500_000  # default rate, ceil(3.5)
    j = [r for r in ledger.journal() if r["kind"] == "rate_set"]
    assert j[-1]["data"] == {"gpu_type": "a100", "rate_ppm": 700_000, "previous_ppm": 600_000}


def test_refusals_carry_reason_and_numbers(ledger, clock):
    token, view = ledger.mint("physics", 2 * H + 1800,
                              scopes=Scopes.parse(users="alice", gpu_types="h100,a100"))
    with pytest.raises(Refusal) as exc:
        ledger.reserve(token, req(gpus=2, minutes=240, user="alice"))
    r = exc.value
    assert r.reason is Reason.INSUFFICIENT and (r.needed, r.available) == (8 * H, 2 * H + 1800)
    assert r.message == (f"needs 8.000 GPU-h (2 x h100 x 4:00:00), token {view.id} "
                         "has 2.500 GPU-h left: 5.500 GPU-h short; -t 1:15:00 would fit")
    cases = [
        (req(user="bob"), Reason.WRONG_USER),
        (req(user="alice", gpu_type="l40s"), Reason.WRONG_GPU_TYPE),
        (req(user="alice", account="chemistry"), Reason.WRONG_ACCOUNT),
    ]
    for request, reason in cases:
        with pytest.raises(Refusal) as exc:
            ledger.reserve(token, request)
        assert exc.value.reason is reason
    later, _ = ledger.mint("physics", H, not_before=clock.now + timedelta(days=1),
                           expires=clock.now + timedelta(days=2))
    with pytest.raises(Refusal) as exc:
        ledger.reserve(later, req())
    assert exc.value.reason is Reason.NOT_YET_VALID
    clock.advance(days=3)
    with pytest.raises(Refusal) as exc:
        ledger.reserve(later, req())
    assert exc.value.reason is Reason.EXPIRED
    assert ledger.sum_balances() == 0


def test_exhausted_and_revoked(ledger):
    token, view = ledger.mint("physics", H)
    hold = ledger.reserve(token, req(minutes=60))
    ledger.post(hold.id, H)
    assert ledger.inspect(token).status == "exhausted"
    with pytest.raises(Refusal) as exc:
        ledger.reserve(token, req(minutes=1))
    assert exc.value.reason is Reason.EXHAUSTED
    t2, v2 = ledger.mint("physics", 3 * H)
    pending = ledger.reserve(t2, req(minutes=60))
    ledger.revoke(t2, "leaked")
    with pytest.raises(Refusal) as exc:
        ledger.reserve(t2, req(minutes=1))
    assert exc.value.reason is Reason.REVOKED and "leaked" in exc.value.message
    assert ledger.inspect(t2).status == "revoked"
    # the pending hold still settles; its remainder goes to the account pool
    ledger.post(pending.id, 600)
    (acct,) = account_views(ledger, "physics")
    assert acct.pool == 3 * H - 600
    with pytest.raises(StateError):
        ledger.revoke(t2, "again")


def test_expire_moves_remainders_and_holds_still_settle(ledger, clock):
    token, view = ledger.mint("physics", 5 * H, expires=clock.now + timedelta(days=1))
    hold = ledger.reserve(token, req(minutes=60))
    clock.advance(days=2)
    done = ledger.expire()
    assert done == [{"token_id": view.id, "account": "physics", "amount": 4 * H}]
    assert ledger.expire() == []
    ledger.post(hold.id, 60)
    assert ledger.wallet_balance("system:expired") == 5 * H - 60
    assert ledger.inspect(view.id).status == "expired"
    assert ledger.verify_journal().ok


def test_resize_grows_shrinks_or_refuses(ledger):
    token, _ = ledger.mint("physics", 3 * H)
    hold = ledger.reserve(token, req(minutes=60))
    assert ledger.resize(hold.id, seconds=2 * H).amount == 2 * H
    assert ledger.inspect(token).remaining == H
    with pytest.raises(Refusal) as exc:
        ledger.resize(hold.id, seconds=4 * H)
    assert exc.value.reason is Reason.INSUFFICIENT and exc.value.needed == 2 * H
    assert ledger.resize(hold.id, seconds=1800).amount == 1800
    assert ledger.inspect(token).remaining == 3 * H - 1800


def test_partial_posts_then_close(ledger):
    token, _ = ledger.mint("physics", 10 * H)
    hold = ledger.reserve(token, req(minutes=60, tasks=3))
    assert hold.amount == 3 * H
    for task in range(3):
        ledger.post(hold.id, 1000, final=False, key=f"{hold.id}:task{task}")
        ledger.post(hold.id, 1000, final=False, key=f"{hold.id}:task{task}")  # replay
    assert ledger.hold(hold.id).charged == 3000
    closed = ledger.void(hold.id, reason="array finished")
    assert (closed.state, closed.charged, closed.returned) == ("posted", 3000, 3 * H - 3000)
    with pytest.raises(StateError):
        ledger.post(hold.id, 1)


def test_post_caps_only_when_asked(ledger):
    token, _ = ledger.mint("physics", 10 * H)
    hold = ledger.reserve(token, req(minutes=10))
    with pytest.raises(InvalidInput):
        ledger.post(hold.id, 601)
    done = ledger.post(hold.id, 700, cap=True, key="k")
    assert done.charged == 600
    assert ledger.charges(hold.id)[0]["usage"] == {"uncapped_amount": 700}
    # what ran beyond the hold is owed: one journaled debt, in the charge's transaction
    debts = [e for e in ledger.journal() if e["kind"] == "debt" and e["hold_id"] == hold.id]
    assert len(debts) == 1 and debts[0]["data"]["owed"] == 100 and debts[0]["amount"] == 0
    assert ledger.post(hold.id, 700, cap=True, key="k").charged == 600  # a replay adds none
    assert len([e for e in ledger.journal() if e["kind"] == "debt"]) == 1
    assert ledger.verify_journal().ok
    from reports import alerts
    with ledger.engine.connect() as conn:
        owed = [c for c in alerts.evaluate(conn, ledger.clock()) if c.kind == "debt"]
    assert [(c.account, c.threshold) for c in owed] == [("physics", 100)]
    assert "beyond its hold" in owed[0].describe() and hold.id in owed[0].describe()


def test_idempotency_same_key_same_result_other_fields_conflict(ledger):
    token, _ = ledger.mint("physics", 10 * H)
    a = ledger.reserve(token, req(minutes=60), key="job-1")
    b = ledger.reserve(token, req(minutes=60), key="job-1")
    assert a == b and ledger.inspect(token).held == H
    with pytest.raises(IdempotencyConflict):
        ledger.reserve(token, req(minutes=61), key="job-1")
    p1 = ledger.post(a.id, 100)
    assert ledger.post(a.id, 100) == p1
    with pytest.raises(StateError):
        ledger.post(a.id, 200)


def test_refund_and_transfer(ledger):
    t1, v1 = ledger.mint("physics", 10 * H)
    t2, v2 = ledger.mint("chemistry", H)
    hold = ledger.reserve(t1, req(minutes=60))
    ledger.post(hold.id, H)
    with pytest.raises(InvalidInput):
        ledger.refund(hold.id, 600, "  ")
    ledger.refund(hold.id, 600, "node failure")
    with pytest.raises(InvalidInput):
        ledger.refund(hold.id, H, "too much")
    assert ledger.inspect(t1).remaining == 9 * H + 600
    ledger.transfer(v1.id, v2.id, 2 * H, reason="collaboration")
    assert ledger.inspect(t2).remaining == 3 * H
    with pytest.raises(Refusal):
        ledger.transfer(v2.id, v1.id, 4 * H, reason="too much")
    assert ledger.verify_journal().ok and ledger.sum_balances() == 0


def test_split_scopes_only_narrow(ledger, clock):
    token, view = ledger.mint("physics", 10 * H, scopes=Scopes.parse(users="alice,bob"))
    with pytest.raises(InvalidInput, match="scopes can only narrow"):
        ledger.split(token, H, scopes=Scopes.parse(users="carol"))
    with pytest.raises(InvalidInput, match="outlive"):
        ledger.split(token, H, expires=view.expires + timedelta(days=1))
    child, cview = ledger.split(token, H, scopes=Scopes.parse(users="bob", gpu_types="a100"),
                                account="chemistry")
    assert cview.scopes == {"users": ["bob"], "gpu_types": ["a100"]}
    assert cview.account == "chemistry"
    with pytest.raises(Refusal):
        ledger.reserve(child, req(user="alice", gpu_type="a100", account="chemistry"))


def test_unknown_things_and_bad_amounts(ledger):
    with pytest.raises(NotFound, match="unknown account 'nope'"):
        ledger.mint("nope", H)
    with pytest.raises(AlreadyExists):
        ledger.create_account("physics")
    for bad in (0, -5, 2**60):
        with pytest.raises(InvalidInput):
            ledger.mint("physics", bad)
    with pytest.raises(InvalidInput):
        HoldRequest(gpus=0, seconds=60)
    with pytest.raises(NotFound):
        ledger.post("hold_nope", 1)
    ledger.engine.dispose()


def test_retired_key_signs_nothing_but_its_tokens_verify(ledger):
    token, _ = ledger.mint("physics", H, kid="k1")
    ledger.generate_key("k2")
    ledger.retire_key("k1")
    from ledger.errors import KeyError_
    with pytest.raises(KeyError_, match="retired"):
        ledger.mint("physics", H, kid="k1")
    assert ledger.reserve(token, req(minutes=1)).amount == 60
    assert ledger.mint("physics", H)[1].kid == "k2"
