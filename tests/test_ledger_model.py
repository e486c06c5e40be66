"""Property test: random operation sequences against a small in-memory model.

After every step the ledger's balances equal the model's, Σ debits = Σ
credits (all wallets sum to zero) and no wallet except issuance is negative.
Runs on each database; examples share one ledger, so the model tracks the
tokens and holds it created and the deltas of the system wallets.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import text

from ledger.amounts import cost
from ledger.errors import InvalidInput, Refusal, StateError
from ledger.views import HoldRequest

RATES = {"h100": 1_000_000, "a100": 600_000}
SYSTEM = ("system:escrow", "system:usage", "system:expired")


class Model:
    def __init__(self, ledger):
        self.ledger = ledger
        self.tokens: dict[str, dict] = {}  # id -> balance, status, expires, token, account
        self.holds: dict[str, dict] = {}
        self.base = {w: ledger.wallet_balance(w) for w in SYSTEM}
        self.delta = dict.fromkeys(SYSTEM, 0)
        self.pool = 0  # physics pool delta

    def live(self, tid):
        t = self.tokens[tid]
        return t["status"] == "active" and self.ledger.clock() < t["expires"]

    def sink(self, tid):
        t = self.tokens[tid]
        if t["status"] == "revoked":
            return "pool"
        if t["status"] == "expired" or self.ledger.clock() >= t["expires"]:
            return "system:expired"
        return tid

    def credit(self, dest, amount):
        if dest == "pool":
            self.pool += amount
        elif dest in self.delta:
            self.delta[dest] += amount
        else:
            self.tokens[dest]["balance"] += amount

    def check(self):
        lg = self.ledger
        for tid, t in self.tokens.items():
            view = lg.inspect(tid)
            held = sum(h["amount"] - h["charged"] for h in self.holds.values()
                       if h["token"] == tid and h["state"] == "pending")
            assert (view.remaining, view.held) == (t["balance"], held), tid
        for w in SYSTEM:
            assert lg.wallet_balance(w) - self.base[w] == self.delta[w], w
        assert self.delta["system:escrow"] == sum(
            h["amount"] - h["charged"] for h in self.holds.values() if h["state"] == "pending")
        assert lg.sum_balances() == 0
        with lg.engine.connect() as conn:
            negative = conn.execute(text(
                "SELECT count(*) FROM wallets WHERE balance < 0 AND code <> 'system:issuance'"
            )).scalar()
        assert negative == 0


amounts = st.integers(min_value=1, max_value=20_000)


@pytest.mark.timeout(900)
def test_random_operations_match_the_model(ledger, clock):
    examples = 60 if ledger.engine.dialect.name == "sqlite" else 20

    seen: dict[str, int] = {}
    start = clock.now

    @settings(max_examples=examples, deadline=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(st.data())
    def run(data):
        # Every example starts at the same time, so the same draws take the same branches
        # (tokens of earlier examples may expire again; the model books that as base).
        clock.now = start
        m = Model(ledger)
        for _step in range(data.draw(st.integers(3, 14))):
            op = data.draw(st.sampled_from(
                ["mint", "split", "transfer", "reserve", "post", "void", "resize", "revoke",
                 "expire", "refund"] if m.tokens else ["mint"]))
            seen[op] = seen.get(op, 0) + 1
            tids = list(m.tokens)  # creation order: random ids must not steer the draws
            pending = [h for h, v in m.holds.items() if v["state"] == "pending"]
            if op == "mint":
                amount = data.draw(amounts)
                days = data.draw(st.integers(1, 5))
                tok, view = ledger.mint("physics", amount,
                                        expires=clock.now + timedelta(days=days))
                m.tokens[view.id] = {"balance": amount, "status": "active",
                                     "expires": view.expires, "token": tok}
            elif op == "split":
                tid = data.draw(st.sampled_from(tids))
                amount = data.draw(amounts)
                ok = m.live(tid) and amount <= m.tokens[tid]["balance"]
                try:
                    tok, view = ledger.split(tid, amount)
                except (Refusal, StateError):
                    assert not ok
                else:
                    assert ok
                    m.tokens[tid]["balance"] -= amount
                    m.tokens[view.id] = {"balance": amount, "status": "active",
                                         "expires": view.expires, "token": tok}
            elif op == "transfer" and len(tids) > 1:
                a, b = data.draw(st.permutations(tids))[:2]
                amount = data.draw(amounts)
                ok = m.live(a) and m.live(b) and amount <= m.tokens[a]["balance"]
                try:
                    ledger.transfer(a, b, amount, reason="model")
                except (Refusal, StateError):
                    assert not ok
                else:
                    assert ok
                    m.tokens[a]["balance"] -= amount
                    m.tokens[b]["balance"] += amount
            elif op == "reserve":
                tid = data.draw(st.sampled_from(tids))
                gtype = data.draw(st.sampled_from(sorted(RATES)))
                req = HoldRequest(gpus=data.draw(st.integers(1, 4)),
                                  seconds=data.draw(st.integers(1, 3000)), gpu_type=gtype,
                                  tasks=data.draw(st.integers(1, 3)))
                need = req.tasks * cost(req.gpus * req.seconds, RATES[gtype])
                ok = m.live(tid) and need <= m.tokens[tid]["balance"]
                try:
                    hold = ledger.reserve(m.tokens[tid]["token"], req)
                except Refusal:
                    assert not ok
                else:
                    assert ok and hold.amount == need
                    m.tokens[tid]["balance"] -= need
                    m.delta["system:escrow"] += need
                    m.holds[hold.id] = {"token": tid, "amount": need, "charged": 0,
                                        "refunded": 0, "state": "pending", "rate": RATES[gtype],
                                        "req": req}
            elif op == "post" and pending:
                hid = data.draw(st.sampled_from(pending))
                h = m.holds[hid]
                amount = data.draw(st.integers(0, h["amount"] - h["charged"]))
                final = data.draw(st.booleans())
                ledger.post(hid, amount, final=final, key=f"{hid}:{len(m.holds)}:{_step}")
                h["charged"] += amount
                m.delta["system:escrow"] -= amount
                m.delta["system:usage"] += amount
                if final:
                    rest = h["amount"] - h["charged"]
                    m.delta["system:escrow"] -= rest
                    m.credit(m.sink(h["token"]), rest)
                    h["state"] = "posted"
            elif op == "void" and pending:
                hid = data.draw(st.sampled_from(pending))
                h = m.holds[hid]
                ledger.void(hid)
                rest = h["amount"] - h["charged"]
                m.delta["system:escrow"] -= rest
                m.credit(m.sink(h["token"]), rest)
                h["state"] = "posted" if h["charged"] else "voided"
            elif op == "resize" and pending:
                hid = data.draw(st.sampled_from(pending))
                h = m.holds[hid]
                seconds = data.draw(st.integers(1, 3000))
                req = h["req"]
                new = req.tasks * cost(req.gpus * seconds, h["rate"])
                delta = new - h["amount"]
                tid = h["token"]
                if new < h["charged"]:
                    with pytest.raises(InvalidInput):
                        ledger.resize(hid, seconds=seconds)
                    continue
                ok = delta <= 0 or (m.live(tid) and delta <= m.tokens[tid]["balance"])
                try:
                    ledger.resize(hid, seconds=seconds)
                except Refusal:
                    assert not ok
                else:
                    assert ok
                    if delta > 0:
                        m.tokens[tid]["balance"] -= delta
                    else:
                        m.credit(m.sink(tid), -delta)
                    m.delta["system:escrow"] += delta
                    h["amount"] = new
                    h["req"] = HoldRequest(gpus=req.gpus, seconds=seconds,
                                           gpu_type=req.gpu_type, tasks=req.tasks)
            elif op == "revoke":
                tid = data.draw(st.sampled_from(tids))
                t = m.tokens[tid]
                if t["status"] == "revoked":
                    continue
                ledger.revoke(tid, "model")
                m.pool += t["balance"]
                t["balance"], t["status"] = 0, "revoked"
            elif op == "expire":
                clock.advance(hours=data.draw(st.integers(1, 60)))
                for d in ledger.expire():
                    if d["token_id"] in m.tokens:
                        t = m.tokens[d["token_id"]]
                        assert d["amount"] == t["balance"]
                        m.delta["system:expired"] += t["balance"]
                        t["balance"], t["status"] = 0, "expired"
                    else:  # a token of an earlier example
                        m.base["system:expired"] += d["amount"]
            elif op == "refund":
                done = [h for h, v in m.holds.items() if v["charged"] > v["refunded"]]
                if not done:
                    continue
                hid = data.draw(st.sampled_from(done))
                h = m.holds[hid]
                amount = data.draw(st.integers(1, h["charged"] - h["refunded"]))
                dest = m.sink(h["token"])
                ledger.refund(hid, amount, "model")
                h["refunded"] += amount
                m.delta["system:usage"] -= amount
                m.credit(dest, amount)
            m.check()
        assert ledger.verify_journal().ok

    run()
    assert set(seen) == {"mint", "split", "transfer", "reserve", "post", "void", "resize",
                         "revoke", "expire", "refund"}, seen
    print(seen)
