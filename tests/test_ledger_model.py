"""Stateful model test: random operation sequences against an independent model of the ledger.

A hypothesis ``RuleBasedStateMachine`` drives mint, split, transfer, reserve (typed, untyped,
unknown-type requests, within and outside the token's scopes), post (partial, final, capped),
void, bind, resize, refund, revoke, expiry, rate changes and idempotent replays. The model
knows the rules only from the README — in particular the pricing oracle below is written
from its text and imports nothing of the ledger's pricing:

    a hold's cost is tasks × ceil(gpus × seconds × rate / 10⁶); a GPU type without a rate
    of its own is priced at ``default``; a request that names no type is held at the
    highest rate.

After every step each token's remaining, held and status, the account pool and the system
wallets equal the model's, all wallets sum to zero and none but issuance is negative; at
the end of a run every hold matches and ``verify`` passes.

Runs on each database. One database serves a whole test (a fresh one per example is too
slow on the servers), so each run works on an account and tokens of its own, books the
system wallets as deltas, and carries the rates table (shared by every run) in the model.
"""

from __future__ import annotations

import math
import uuid
from datetime import timedelta
from fractions import Fraction

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant, precondition,
                                 rule, run_state_machine_as_test)
from sqlalchemy import text

from ledger.errors import IdempotencyConflict, InvalidInput, Reason, Refusal, StateError
from ledger.tokens import Scopes
from ledger.views import HoldRequest

SYSTEM = ("system:escrow", "system:usage", "system:expired")
SEEDED_RATES = {"h100": 1_000_000, "a100": 600_000, "default": 500_000}  # tests/conftest.py
GPU_TYPES = [None, "", "h100", "a100", "v100", "l40s"]  # v100 may get a rate; l40s never
REQUEST_TYPES = st.sampled_from([None, "h100", "h100", "a100", "", "v100", "l40s"])
RATED = ["h100", "a100", "v100", "default"]
USERS, PARTITIONS = ("alice", "bob"), ("p1", "p2")
SCOPE_TYPES = ("h100", "a100", "l40s")


# -- the oracle: the README's rules, written independently ----------------------------------

def oracle_rate(rates: dict[str, int], gpu_type: str | None) -> int | None:
    if gpu_type is None or gpu_type.strip() == "":
        return max(rates.values()) if rates else None  # may land on any type: the highest
    if gpu_type in rates:
        return rates[gpu_type]
    return rates.get("default")


def oracle_cost(gpus: int, seconds: int, tasks: int, rate: int) -> int:
    return tasks * math.ceil(Fraction(gpus * seconds * rate, 1_000_000))


def scope_problem(t: dict, account: str | None, user, gpu_type, partition) -> Reason | None:
    """The first scope a request falls outside of (account, users, GPU types, partitions)."""
    s = t["scopes"]
    if account is not None and account != t["account"]:
        return Reason.WRONG_ACCOUNT
    if s["users"] and user not in s["users"]:
        return Reason.WRONG_USER
    if s["gpu_types"] and gpu_type not in s["gpu_types"]:
        return Reason.WRONG_GPU_TYPE
    candidates = [p for p in (partition or "").split(",") if p]
    if s["partitions"] and (not candidates or any(p not in s["partitions"] for p in candidates)):
        return Reason.WRONG_PARTITION
    return None


NO_SCOPES = {"users": set(), "gpu_types": set(), "partitions": set()}


def _scope_choice(values):  # mostly no restriction, so that jobs also get to run
    return st.sampled_from([frozenset()] * 4 + [frozenset(v) for v in values]).map(set)


scope_sets = st.fixed_dictionaries({
    "users": _scope_choice([{"alice"}, {"alice", "bob"}, {"bob"}]),
    "gpu_types": _scope_choice([{"h100"}, {"a100", "h100"}, {"l40s"}]),
    "partitions": _scope_choice([{"p1"}, {"p1", "p2"}, {"p2"}]),
})
rarely = st.sampled_from([False, False, False, False, True])
rate_values = st.one_of(st.sampled_from([143_000, 500_000, 600_000, 1_000_000, 1_500_000]),
                        st.integers(1, 2_000_000))
amounts = st.integers(min_value=1, max_value=40_000)
picks = st.integers(min_value=0, max_value=10_000)


def to_scopes(s: dict) -> Scopes:
    return Scopes(users=tuple(sorted(s["users"])), gpu_types=tuple(sorted(s["gpu_types"])),
                  partitions=tuple(sorted(s["partitions"])))


def machine_for(ledger, clock, rates: dict[str, int], seen: dict[str, int]):
    """A state machine class over one ledger; ``rates`` is the model of the shared table."""

    class LedgerMachine(RuleBasedStateMachine):
        def __init__(self):
            super().__init__()
            self.run = uuid.uuid4().hex[:10]
            self.account = f"m{self.run}"
            ledger.create_account(self.account)
            self.tokens: dict[str, dict] = {}
            self.holds: dict[str, dict] = {}
            self.keyed: list[tuple] = []  # reserves: key, request, token id, hold id
            self.posts: list[tuple[str, str, int, bool, bool, dict]] = []
            self.base = {w: ledger.wallet_balance(w) for w in SYSTEM}
            self.delta = dict.fromkeys(SYSTEM, 0)
            self.pool = 0
            self.n = 0

        # -- model helpers ------------------------------------------------------------------

        def key(self, what: str) -> str:
            self.n += 1
            return f"{self.run}:{what}:{self.n}"

        def pick(self, items, i):
            items = list(items)
            return items[i % len(items)]

        def now(self):
            return clock.now

        def time_valid(self, t) -> Reason | None:
            if self.now() < t["not_before"]:
                return Reason.NOT_YET_VALID
            if self.now() >= t["expires"]:
                return Reason.EXPIRED
            return None

        def spendable(self, t) -> bool:
            return t["status"] == "active" and self.now() < t["expires"]

        def sink(self, t) -> str:
            if t["status"] == "revoked":
                return "pool"
            if t["status"] == "expired" or self.now() >= t["expires"]:
                return "system:expired"
            return t["id"]

        def credit(self, dest: str, amount: int) -> None:
            if dest == "pool":
                self.pool += amount
            elif dest in self.delta:
                self.delta[dest] += amount
            else:
                self.tokens[dest]["balance"] += amount

        def held(self, tid: str) -> int:
            return sum(h["amount"] - h["charged"] for h in self.holds.values()
                       if h["token"] == tid and h["state"] == "pending")

        def status(self, t) -> str:
            if t["status"] == "revoked":
                return "revoked"
            if t["status"] == "expired" or self.now() >= t["expires"]:
                return "expired"
            if t["balance"] == 0 and self.held(t["id"]) == 0:
                return "exhausted"
            return "active"

        def add_token(self, tok: str, view, scopes: dict) -> None:
            self.tokens[view.id] = {
                "id": view.id, "token": tok, "balance": view.remaining, "status": "active",
                "not_before": view.not_before, "expires": view.expires, "scopes": scopes,
                "account": view.account}

        def close(self, h: dict, state: str) -> None:
            rest = h["amount"] - h["charged"]
            self.delta["system:escrow"] -= rest
            self.credit(self.sink(self.tokens[h["token"]]), rest)
            h["state"] = state

        def pending(self) -> list[str]:
            return [k for k, h in self.holds.items() if h["state"] == "pending"]

        def same_hold(self, view, h: dict) -> None:
            assert (view.amount, view.charged, view.refunded, view.state, view.rate_ppm,
                    view.job_id) == (h["amount"], h["charged"], h["refunded"], h["state"],
                                     h["rate"], h["job_id"]), (view, h)

        # -- rules --------------------------------------------------------------------------

        @initialize(amount=amounts, days=st.integers(1, 20), scopes=scope_sets,
                    start=st.fixed_dictionaries({t: rate_values for t in RATED}))
        def first_token(self, amount, days, scopes, start):
            # Every rate this run can meet is set here, so a run never depends on the rates
            # an earlier run left in the shared table (a run must replay the same way).
            for gpu_type, rate in start.items():
                ledger.set_rate(gpu_type, rate)
                rates[gpu_type] = rate
            self.mint(amount, days, False, scopes)

        @rule(amount=amounts, days=st.integers(1, 20), later=rarely, scopes=scope_sets)
        def mint(self, amount, days, later, scopes):
            seen["mint"] = seen.get("mint", 0) + 1
            nbf = (self.now() + timedelta(hours=1)) if later else None
            tok, view = ledger.mint(self.account, amount, not_before=nbf,
                                    expires=self.now() + timedelta(days=days),
                                    scopes=to_scopes(scopes))
            assert (view.face, view.remaining) == (amount, amount)
            self.add_token(tok, view, scopes)

        @rule(gpu_type=st.sampled_from(RATED), rate=rate_values)
        def set_rate(self, gpu_type, rate):
            seen["set_rate"] = seen.get("set_rate", 0) + 1
            ledger.set_rate(gpu_type, rate)
            rates[gpu_type] = rate

        @rule(i=picks, amount=amounts, scopes=scope_sets, inherit=st.booleans())
        def split(self, i, amount, scopes, inherit):
            seen["split"] = seen.get("split", 0) + 1
            parent = self.tokens[self.pick(self.tokens, i)]
            child = {k: set() for k in scopes} if inherit else scopes
            narrow = all(not child[k] or not parent["scopes"][k] or child[k] <= parent["scopes"][k]
                         for k in child)
            try:
                tok, view = ledger.split(parent["id"], amount, scopes=to_scopes(child))
            except StateError:
                assert not self.spendable(parent)
                return
            except Refusal as exc:
                assert self.spendable(parent) and amount > parent["balance"]
                assert exc.reason is Reason.INSUFFICIENT
                return
            except InvalidInput:
                assert self.spendable(parent) and amount <= parent["balance"] and not narrow
                return
            assert self.spendable(parent) and amount <= parent["balance"] and narrow
            parent["balance"] -= amount
            got = {k: child[k] or parent["scopes"][k] for k in child}
            assert view.scopes == {k: sorted(v) for k, v in got.items() if v}
            assert view.not_before == max(parent["not_before"],
                                          self.now().replace(microsecond=0))
            self.add_token(tok, view, got)

        @precondition(lambda self: len(self.tokens) > 1)
        @rule(i=picks, j=picks, amount=amounts)
        def transfer(self, i, j, amount):
            seen["transfer"] = seen.get("transfer", 0) + 1
            a = self.tokens[self.pick(self.tokens, i)]
            b = self.tokens[self.pick([t for t in self.tokens if t != a["id"]], j)]
            ok = self.spendable(a) and self.spendable(b) and amount <= a["balance"]
            try:
                ledger.transfer(a["id"], b["id"], amount, reason="model")
            except (Refusal, StateError):
                assert not ok
            else:
                assert ok
                a["balance"] -= amount
                b["balance"] += amount

        @rule(i=picks, gpus=st.integers(1, 4), seconds=st.integers(1, 900),
              tasks=st.integers(1, 3), gpu_type=REQUEST_TYPES,
              user=st.sampled_from(["alice", "alice", "bob"]),
              partition=st.sampled_from(["p1", "p1", "p2", "p1,p2", None]),
              wrong_account=rarely, keyed=st.booleans(), job=st.sampled_from([None, "101"]))
        def reserve(self, i, gpus, seconds, tasks, gpu_type, user, partition, wrong_account,
                    keyed, job):
            seen["reserve"] = seen.get("reserve", 0) + 1
            t = self.tokens[self.pick(self.tokens, i)]
            account = "physics" if wrong_account else self.account
            req = HoldRequest(gpus=gpus, seconds=seconds, gpu_type=gpu_type, tasks=tasks,
                              account=account, user=user, partition=partition)
            rate = oracle_rate(rates, gpu_type)
            need = oracle_cost(gpus, seconds, tasks, rate)
            expected = (self.time_valid(t) or scope_problem(t, account, user, gpu_type, partition)
                        or (Reason.REVOKED if t["status"] == "revoked" else None))
            if expected is None and need > t["balance"]:
                expected = Reason.EXHAUSTED if t["balance"] == 0 and self.held(t["id"]) == 0 \
                    else Reason.INSUFFICIENT
            key = self.key("reserve") if keyed else None
            try:
                hold = ledger.reserve(t["token"], req, key=key)
            except Refusal as exc:
                assert exc.reason is expected, (str(exc), expected)
                if expected in (Reason.INSUFFICIENT, Reason.EXHAUSTED):
                    assert exc.needed == need
                seen["refused"] = seen.get("refused", 0) + 1
                seen[str(expected)] = seen.get(str(expected), 0) + 1
                return
            assert expected is None, expected
            assert (hold.amount, hold.rate_ppm) == (need, rate)
            t["balance"] -= need
            self.delta["system:escrow"] += need
            self.holds[hold.id] = {"token": t["id"], "amount": need, "charged": 0,
                                   "refunded": 0, "state": "pending", "rate": rate,
                                   "req": req, "job_id": None, "voided": None}
            if key:
                self.keyed.append((key, req, t["id"], hold.to_dict()))
            if job is not None:  # the prolog binds the job as soon as it starts
                self.bind(len(self.holds) - 1, job)

        @precondition(lambda self: self.keyed)
        @rule(i=picks, other=st.booleans())
        def replay_reserve(self, i, other):
            """The same key and request return the first hold and move nothing; the same key
            with another request is a conflict."""
            seen["replay_reserve"] = seen.get("replay_reserve", 0) + 1
            key, req, tid, first = self.pick(self.keyed, i)
            late = self.time_valid(self.tokens[tid])
            if late is not None:  # the token's own checks run before the key is looked up
                with pytest.raises(Refusal) as exc:
                    ledger.reserve(self.tokens[tid]["token"], req, key=key)
                assert exc.value.reason is late
                return
            if other:
                changed = HoldRequest(gpus=req.gpus + 1, seconds=req.seconds,
                                      gpu_type=req.gpu_type, tasks=req.tasks,
                                      account=req.account, user=req.user,
                                      partition=req.partition)
                with pytest.raises(IdempotencyConflict):
                    ledger.reserve(self.tokens[tid]["token"], changed, key=key)
                return
            again = ledger.reserve(self.tokens[tid]["token"], req, key=key)
            assert again.to_dict() == first  # the first result, as it was then

        @precondition(lambda self: self.pending())
        @rule(i=picks, part=st.integers(0, 120), final=st.booleans(), cap=st.booleans(),
              then=st.sampled_from([None, "replay", "conflict", "refund"]),
              back=st.integers(1, 120))
        def post(self, i, part, final, cap, then, back):
            seen["post"] = seen.get("post", 0) + 1
            hid = self.pick(self.pending(), i)
            h = self.holds[hid]
            left = h["amount"] - h["charged"]
            amount = left * part // 100  # up to 20 % more than is left
            key = self.key("post")
            if amount > left and not cap:
                with pytest.raises(InvalidInput):
                    ledger.post(hid, amount, final=final, cap=cap, key=key)
                return
            view = ledger.post(hid, amount, final=final, cap=cap, key=key)
            charge = min(amount, left)
            h["charged"] += charge
            self.delta["system:escrow"] -= charge
            self.delta["system:usage"] += charge
            if final:
                self.close(h, "posted")
            self.same_hold(view, h)
            self.posts.append((key, hid, amount, final, cap, view.to_dict()))
            if then in ("replay", "conflict"):  # a retried settlement, at once
                self.replay_post(len(self.posts) - 1, then == "conflict")
            elif then == "refund" and h["charged"] > h["refunded"]:
                self.refund(list(self.holds).index(hid), back, only=hid)

        @precondition(lambda self: self.posts)
        @rule(i=picks, other=st.booleans())
        def replay_post(self, i, other):
            """A settlement retried under its key charges nothing again (even after the hold
            closed); other figures under the same key are a conflict."""
            seen["replay_post"] = seen.get("replay_post", 0) + 1
            key, hid, amount, final, cap, first = self.pick(self.posts, i)
            if other:
                with pytest.raises(IdempotencyConflict):
                    ledger.post(hid, amount + 1, final=final, cap=cap, key=key)
                return
            again = ledger.post(hid, amount, final=final, cap=cap, key=key)
            assert again.to_dict() == first

        @precondition(lambda self: self.holds)
        @rule(i=picks)
        def void(self, i):
            seen["void"] = seen.get("void", 0) + 1
            hid = self.pick(self.holds, i)
            h = self.holds[hid]
            if h["state"] != "pending" and h["voided"] is None:
                with pytest.raises(StateError):
                    ledger.void(hid)
                return
            view = ledger.void(hid)
            if h["voided"] is not None:  # a replay: the first void's result, nothing moves
                assert view.to_dict() == h["voided"]
                return
            self.close(h, "posted" if h["charged"] else "voided")
            self.same_hold(view, h)
            h["voided"] = view.to_dict()

        @precondition(lambda self: self.holds)
        @rule(i=picks, job=st.sampled_from(["101", "102"]))
        def bind(self, i, job):
            seen["bind"] = seen.get("bind", 0) + 1
            hid = self.pick(self.holds, i)
            h = self.holds[hid]
            job_id = f"{self.run}-{job}"
            if h["job_id"] not in (None, job_id):
                with pytest.raises(StateError):
                    ledger.bind(hid, job_id)
                return
            view = ledger.bind(hid, job_id)
            h["job_id"] = job_id
            self.same_hold(view, h)

        @precondition(lambda self: self.pending())
        @rule(i=picks, seconds=st.integers(1, 1200),
              gpu_type=st.one_of(st.just("keep"), st.sampled_from(GPU_TYPES)))
        def resize(self, i, seconds, gpu_type):
            seen["resize"] = seen.get("resize", 0) + 1
            hid = self.pick(self.pending(), i)
            h = self.holds[hid]
            t = self.tokens[h["token"]]
            req = h["req"]
            new_type = req.gpu_type if gpu_type == "keep" else gpu_type
            rate = h["rate"] if new_type == req.gpu_type else oracle_rate(rates, new_type)
            new = oracle_cost(req.gpus, seconds, req.tasks, rate)
            delta = new - h["amount"]
            scope = scope_problem(t, req.account, req.user, new_type, req.partition)
            kw = {} if gpu_type == "keep" else {"gpu_type": gpu_type}
            if scope is not None:
                with pytest.raises(Refusal) as exc:
                    ledger.resize(hid, seconds=seconds, **kw)
                assert exc.value.reason is scope
                return
            if new < h["charged"]:
                with pytest.raises(InvalidInput):
                    ledger.resize(hid, seconds=seconds, **kw)
                return
            ok = delta <= 0 or (t["status"] == "active" and self.time_valid(t) is None
                                and delta <= t["balance"])
            try:
                view = ledger.resize(hid, seconds=seconds, **kw)
            except Refusal:
                assert not ok
                return
            assert ok
            if delta > 0:
                t["balance"] -= delta
            else:
                self.credit(self.sink(t), -delta)
            self.delta["system:escrow"] += delta
            h.update(amount=new, rate=rate, req=HoldRequest(
                gpus=req.gpus, seconds=seconds, gpu_type=new_type, tasks=req.tasks,
                account=req.account, user=req.user, partition=req.partition))
            self.same_hold(view, h)

        @precondition(lambda self: any(h["charged"] > h["refunded"] for h in self.holds.values()))
        @rule(i=picks, part=st.integers(1, 120))
        def refund(self, i, part, only=None):
            seen["refund"] = seen.get("refund", 0) + 1
            hid = only or self.pick(
                [k for k, h in self.holds.items() if h["charged"] > h["refunded"]], i)
            h = self.holds[hid]
            refundable = h["charged"] - h["refunded"]
            amount = max(1, refundable * part // 100)
            if amount > refundable:
                with pytest.raises(InvalidInput):
                    ledger.refund(hid, amount, "model")
                return
            dest = self.sink(self.tokens[h["token"]])
            ledger.refund(hid, amount, "model")
            h["refunded"] += amount
            self.delta["system:usage"] -= amount
            self.credit(dest, amount)

        @rule(i=picks, go=rarely)
        def revoke(self, i, go):
            if not go:
                return
            seen["revoke"] = seen.get("revoke", 0) + 1
            t = self.tokens[self.pick(self.tokens, i)]
            if not self.spendable(t):  # revoked, or expired (swept or not)
                with pytest.raises(StateError):
                    ledger.revoke(t["id"], "model")
                return
            view = ledger.revoke(t["id"], "model")
            self.pool += t["balance"]
            t["balance"], t["status"] = 0, "revoked"
            assert view.status == "revoked"

        @rule(hours=st.sampled_from([1, 1, 2, 6, 30]))
        def expire(self, hours):
            seen["expire"] = seen.get("expire", 0) + 1
            clock.advance(hours=hours)
            for d in ledger.expire():
                t = self.tokens.get(d["token_id"])
                if t is None:  # a token of an earlier run
                    self.base["system:expired"] += d["amount"]
                    continue
                assert t["status"] == "active" and self.now() >= t["expires"]
                assert d["amount"] == t["balance"]
                self.delta["system:expired"] += t["balance"]
                t["balance"], t["status"] = 0, "expired"
            for t in self.tokens.values():
                assert not (t["status"] == "active" and self.now() >= t["expires"]), t["id"]

        # -- invariants ---------------------------------------------------------------------

        @invariant()
        def balances_match(self):
            for tid, t in self.tokens.items():
                view = ledger.inspect(tid)
                assert (view.remaining, view.held, view.status) == (
                    t["balance"], self.held(tid), self.status(t)), (tid, t)
            for w in SYSTEM:
                assert ledger.wallet_balance(w) - self.base[w] == self.delta[w], w
            assert self.delta["system:escrow"] == sum(
                h["amount"] - h["charged"] for h in self.holds.values()
                if h["state"] == "pending")
            assert ledger.wallet_balance(f"account:{self.account}") == self.pool
            assert ledger.sum_balances() == 0
            with ledger.engine.connect() as conn:
                assert conn.execute(text(
                    "SELECT count(*) FROM wallets WHERE balance < 0 "
                    "AND code <> 'system:issuance'")).scalar() == 0

        def teardown(self):
            for hid, h in self.holds.items():
                self.same_hold(ledger.hold(hid), h)
            assert ledger.rates() == rates
            result = ledger.verify_journal()
            assert result.ok, result.problems

    return LedgerMachine


@pytest.mark.timeout(900)
def test_ledger_follows_the_model(ledger, clock):
    server = ledger.engine.dialect.name != "sqlite"
    assert ledger.rates() == SEEDED_RATES
    rates = dict(SEEDED_RATES)  # the model of the rates table, shared by every run
    seen: dict[str, int] = {}
    machine = machine_for(ledger, clock, rates, seen)
    run_state_machine_as_test(machine, settings=settings(
        max_examples=20 if server else 50, stateful_step_count=35, deadline=None))
    print(seen)
    # the rules that nearly every run reaches; the rest are reached most runs, not all
    assert {"mint", "reserve", "refused", "split", "expire", "set_rate"} <= set(seen), seen
    assert {"post", "void"} & set(seen), seen


def test_oracle_reads_the_readme_rule():
    """The oracle's own check: the README's examples (h100 1.0, a100 0.6, default 0.5)."""
    rates = {"h100": 1_000_000, "a100": 600_000, "default": 500_000}
    assert oracle_cost(2, 3600, 1, oracle_rate(rates, "a100")) == 4320
    assert oracle_cost(1, 3600, 1, oracle_rate(rates, "l40s")) == 1800  # default
    assert oracle_cost(1, 3600, 2, oracle_rate(rates, None)) == 7200  # untyped: highest
    assert oracle_cost(1, 3600, 1, oracle_rate(rates, "")) == 3600
    assert oracle_cost(1, 1, 1, 143_000) == 1  # rounds up
