"""Daemon handlers over a real ledger: what each peer may do, and what comes back."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest

from ledger.daemon.auth import Peer, Policy
from ledger.daemon.handlers import Handlers
from ledger.tokens import Scopes

ROOT = Peer(1, 0, 0, "root", True)
SLURM = Peer(2, 64030, 64030, "slurm", True)
ALICE = Peer(3, 1001, 1001, "alice", False)
BOB = Peer(4, 1002, 1002, "bob", False)
MEMBERS = {"alice": frozenset({"physics", "chemistry"}), "bob": frozenset({"chemistry"})}


@pytest.fixture
def handlers(sqlite_ledger):
    return Handlers(sqlite_ledger, Policy("slurm"), accounts=lambda u: MEMBERS.get(u, frozenset()))


@pytest.fixture
def token(sqlite_ledger):
    tok, _ = sqlite_ledger.mint("physics", 10 * 3600)
    return tok


def reserve(h, peer, token, **kw):
    fields = {"op": "reserve", "token": token, "gpus": "2", "type": "h100", "seconds": "3600",
              "user": "alice", "account": "physics", "partition": "gpu", "key": "k-1"}
    fields.update({k: str(v) for k, v in kw.items() if v is not None})
    return h.handle(peer, {k: v for k, v in fields.items() if v != "None"})


def test_reserve_holds_gpus_times_time_times_rate(handlers, sqlite_ledger, token):
    resp = reserve(handlers, SLURM, token)
    assert resp["ok"] == 1 and resp["amount"] == 2 * 3600 and resp["hours"] == "2.000"
    hold = sqlite_ledger.hold(resp["hold"])
    assert (hold.user, hold.gpus, hold.seconds, hold.state) == ("alice", 2, 3600, "pending")
    assert resp["token_id"] == hold.token_id


def test_reserve_replay_with_same_key_is_one_hold(handlers, sqlite_ledger, token):
    first = reserve(handlers, ROOT, token)
    again = reserve(handlers, ROOT, token)
    assert first["hold"] == again["hold"]
    assert len(sqlite_ledger.holds()) == 1


def test_array_tasks_multiply(handlers, token):
    resp = reserve(handlers, SLURM, token, tasks=10, gpus=1, seconds=600, key="k-arr")
    assert resp["amount"] == 10 * 600


def test_insufficient_refusal_carries_ledger_message_and_numbers(handlers, token):
    resp = reserve(handlers, SLURM, token, gpus=2, seconds=4 * 3600 * 2, key="k-big")
    assert resp["ok"] == 0 and resp["reason"] == "insufficient"
    assert resp["message"].startswith("needs 16.000 GPU-h (2 x h100 x 8:00:00), token tok_")
    assert resp["message"].endswith("has 10.000 GPU-h left: 6.000 GPU-h short; -t 5:00:00 would fit")
    assert resp["needed"] == 16 * 3600 and resp["available"] == 10 * 3600


def test_wrong_account_and_garbage_and_forged(handlers, token):
    wrong = reserve(handlers, SLURM, token, account="chemistry", key="k-w")
    assert wrong["reason"] == "wrong_account"
    assert "belongs to account physics, not chemistry" in wrong["message"]
    garbage = reserve(handlers, SLURM, "not-a-token", key="k-g")
    assert garbage["reason"] == "malformed"
    head, payload, sig = token.split(".")
    forged = reserve(handlers, SLURM, f"{head}.{payload}.{'A' * len(sig)}", key="k-f")
    assert forged["reason"] == "bad_signature"


def test_unprivileged_peers_cannot_reserve_resize_or_void(handlers, token):
    for op in ("reserve", "resize", "void"):
        resp = handlers.handle(ALICE, {"op": op, "token": token, "hold": "hold_00", "gpus": "1",
                                       "seconds": "60", "user": "alice"})
        assert resp["ok"] == 0 and resp["reason"] == "forbidden", op


def test_resize_grows_shrinks_and_refuses(handlers, sqlite_ledger, token):
    hold = reserve(handlers, SLURM, token)["hold"]
    grown = handlers.handle(SLURM, {"op": "resize", "hold": hold, "seconds": str(2 * 3600)})
    assert grown["ok"] == 1 and grown["amount"] == 4 * 3600 and grown["delta"] == 2 * 3600
    same = handlers.handle(SLURM, {"op": "resize", "hold": hold, "seconds": str(2 * 3600)})
    assert same["amount"] == 4 * 3600 and same["delta"] == 0
    too_much = handlers.handle(SLURM, {"op": "resize", "hold": hold, "seconds": str(10 * 3600)})
    assert too_much["ok"] == 0 and too_much["reason"] == "insufficient"
    assert too_much["message"].startswith("needs 16.000 GPU-h more (2 x h100 x 10:00:00)")
    shrunk = handlers.handle(SLURM, {"op": "resize", "hold": hold, "gpus": "1"})
    assert shrunk["amount"] == 2 * 3600
    assert sqlite_ledger.hold(hold).amount == 2 * 3600


def test_void_returns_everything(handlers, sqlite_ledger, token):
    hold = reserve(handlers, SLURM, token)["hold"]
    resp = handlers.handle(SLURM, {"op": "void", "hold": hold})
    assert resp["ok"] == 1 and resp["state"] == "voided" and resp["returned"] == 2 * 3600
    assert sqlite_ledger.inspect(token).remaining == 10 * 3600


def test_quote_for_self_only(handlers, token):
    mine = handlers.handle(ALICE, {"op": "quote", "gpus": "4", "type": "h100",
                                   "seconds": "7200", "token": token})
    assert mine["ok"] == 1 and mine["hours"] == "8.000" and mine["covers"] is True
    assert mine["user"] == "alice" and mine["remaining_hours"] == "10.000"
    big = handlers.handle(ALICE, {"op": "quote", "gpus": "4", "type": "h100",
                                  "seconds": str(4 * 3600), "token": token})
    assert big["ok"] == 1 and big["covers"] is False
    other = handlers.handle(ALICE, {"op": "quote", "gpus": "1", "seconds": "60", "user": "bob"})
    assert other["reason"] == "forbidden"
    for_bob = handlers.handle(SLURM, {"op": "quote", "gpus": "1", "seconds": "3600",
                                      "user": "bob"})
    assert for_bob["ok"] == 1 and for_bob["amount"] == 3600  # untyped: the highest rate (h100)


def test_quote_refusal_keeps_price(handlers, sqlite_ledger, clock):
    tok, _ = sqlite_ledger.mint("physics", 3600, scopes=Scopes(users=("bob",)))
    resp = handlers.handle(ALICE, {"op": "quote", "gpus": "1", "type": "h100",
                                   "seconds": "600", "token": tok})
    assert resp["ok"] == 0 and resp["reason"] == "wrong_user" and resp["amount"] == 600


def test_balance_shows_own_and_account_tokens_only(handlers, sqlite_ledger):
    physics, _ = sqlite_ledger.mint("physics", 3600)
    for_bob, _ = sqlite_ledger.mint("physics", 3600, scopes=Scopes(users=("bob",)))
    chem_alice, _ = sqlite_ledger.mint("chemistry", 3600, scopes=Scopes(users=("alice",)))
    ids = {t: sqlite_ledger.token_id_of(t) for t in (physics, for_bob, chem_alice)}
    alice = json.loads(handlers.handle(ALICE, {"op": "balance"})["json"])
    bob = json.loads(handlers.handle(BOB, {"op": "balance"})["json"])
    assert {t["id"] for t in alice["tokens"]} == {ids[physics], ids[chem_alice]}
    assert {t["id"] for t in bob["tokens"]} == {ids[for_bob]}
    assert [a["name"] for a in bob["accounts"]] == ["chemistry"]
    assert handlers.handle(BOB, {"op": "balance", "user": "alice"})["reason"] == "forbidden"
    assert json.loads(handlers.handle(ROOT, {"op": "balance", "user": "bob"})["json"])[
        "user"] == "bob"


def test_jobs_lists_own_holds(handlers, token):
    reserve(handlers, SLURM, token, user="alice", key="a")
    reserve(handlers, SLURM, token, user="bob", key="b", account=None)
    alice = json.loads(handlers.handle(ALICE, {"op": "jobs"})["json"])
    assert [h["user"] for h in alice["holds"]] == ["alice"]
    assert handlers.handle(ALICE, {"op": "jobs", "user": "bob"})["reason"] == "forbidden"


def test_expired_and_not_yet_valid(handlers, sqlite_ledger, clock):
    later, _ = sqlite_ledger.mint("physics", 3600, not_before=clock.now + timedelta(days=1))
    resp = reserve(handlers, SLURM, later, key="nyv")
    assert resp["reason"] == "not_yet_valid" and "is not valid before" in resp["message"]
    soon, _ = sqlite_ledger.mint("physics", 3600, expires=clock.now + timedelta(hours=1))
    clock.advance(hours=2)
    resp = reserve(handlers, SLURM, soon, key="exp")
    assert resp["reason"] == "expired" and "expired on" in resp["message"]


def test_key_added_after_start_is_picked_up(handlers, sqlite_ledger):
    sqlite_ledger.reload_keys()  # daemon started with key k1 only
    sqlite_ledger.generate_key("k2")
    tok, _ = sqlite_ledger.mint("physics", 3600, kid="k2")
    sqlite_ledger.reload_keys()
    sqlite_ledger._verifier = type(sqlite_ledger.verifier())({})  # a daemon that knows no key
    resp = reserve(handlers, SLURM, tok, gpus=1, seconds=60, key="k2")
    assert resp["ok"] == 1


@pytest.mark.parametrize("fields,reason", [
    ({}, "bad_request"),
    ({"op": "nope"}, "bad_request"),
    ({"op": "reserve", "token": "x", "gpus": "-1", "seconds": "60"}, "bad_request"),
    ({"op": "reserve", "token": "x", "gpus": "0", "seconds": "60"}, "invalid"),
    ({"op": "reserve", "token": "x", "gpus": "1", "seconds": "60", "user": "a b"}, "bad_request"),
    ({"op": "resize", "hold": "hold_0"}, "bad_request"),
    ({"op": "resize", "hold": "hold_0", "seconds": "60"}, "not_found"),
    ({"op": "jobs", "state": "weird"}, "bad_request"),
])
def test_bad_requests_are_answered(handlers, fields, reason):
    resp = handlers.handle(ROOT, fields)
    assert resp["ok"] == 0 and resp["reason"] == reason


# -- Slurm's own fields (what job_submit.lua forwards), read by ledger.jobrequest ----------

def slurm_reserve(h, token=None, **kw):
    fields = {"op": "reserve", "uid": "1001", "user": "alice", "account": "physics",
              "candidates": "gpu:60:1440::4,short::240:2:3", "key": "js-1"}
    if token:
        fields["token"] = token
    fields.update({k: str(v) for k, v in kw.items()})
    return h.handle(SLURM, fields)


def test_reserve_from_slurms_fields(handlers, sqlite_ledger, token):
    resp = slurm_reserve(handlers, token, tres_per_node="gres/gpu:h100:2", num_tasks=3,
                         time_limit=10, array_inx="0-1", qos="high")
    assert resp["ok"] == 1, resp
    hold = sqlite_ledger.hold(resp["hold"])
    # -n 3 over the candidates' most nodes (gpu: 4 nodes): 3 nodes x 2 GPUs, 2 array tasks
    assert (hold.gpus, hold.gpu_type, hold.seconds, hold.tasks, hold.partition, hold.qos,
            hold.user) == (6, "h100", 600, 2, "gpu,short", "high", "alice")
    assert resp["desc"] == "2 tasks x 6 x h100 x 0:10:00"


def test_slurms_fields_answer_free_none_and_refusals_without_a_hold(sqlite_ledger, token):
    h = Handlers(sqlite_ledger, Policy("slurm"), free_accounts=("ops",))
    assert slurm_reserve(h, account="ops", tres_per_node="gres:gpu:8") == {"ok": 1,
                                                                          "result": "free"}
    assert slurm_reserve(h, token, tres_per_node="gres:gpu:0,gres:nic:1") == {
        "ok": 1, "result": "none"}
    bare = slurm_reserve(h, tres_per_job="gres:gpu:2", time_limit=5)
    assert (bare["ok"], bare["reason"]) == (0, "no_token")
    assert bare["message"].startswith("this job asks for 2 GPU(s) but carries no GPU token")
    untimed = slurm_reserve(h, token, tres_per_node="gres:gpu:1", candidates="nolimit::::")
    assert (untimed["reason"], untimed["message"]) == (
        "time_limit", "partition nolimit has no default or maximum time limit; give the job "
        "one with -t/--time (e.g. -t 2:00:00)")
    mixed = slurm_reserve(h, token, tres_per_node="gres:gpu:1", gpus=1, seconds=60)
    assert mixed["reason"] == "bad_request" and "not both" in mixed["message"]
    odd = slurm_reserve(h, token, tres_per_node="gres:gpu:1", candidates="gpu:x:::")
    assert odd["ok"] == 0 and odd["reason"] == "invalid", odd
    assert sqlite_ledger.holds() == []


def test_resize_from_an_update_and_its_job_record(handlers, sqlite_ledger, token):
    hold = slurm_reserve(handlers, token, tres_per_node="gres:gpu:h100:1", time_limit=60,
                         min_nodes=2, max_nodes=2)["hold"]
    record = {"rec_tres_per_node": "gres:gpu:h100:1", "rec_min_nodes": "2",
              "rec_max_nodes": "2", "rec_account": "physics"}

    def update(**kw):
        return handlers.handle(SLURM, {"op": "resize", "hold": hold, **record,
                                       **{k: str(v) for k, v in kw.items()}})

    wider = update(max_nodes=3, min_nodes=3)
    assert (wider["ok"], wider["delta"]) == (1, 3600)  # 3 nodes x 1 GPU x 1 h
    assert sqlite_ledger.hold(hold).gpus == 3
    assert update(time_limit=4294967295)["reason"] == "time_limit"
    nothing = update(min_nodes=4294967294)
    assert nothing == {"ok": 1, "hold": hold, "amount": 3 * 3600, "hours": "3.000", "delta": 0}
    gone = update(tres_per_node="")
    assert (gone["ok"], gone["state"]) == (1, "voided")
    added = handlers.handle(SLURM, {"op": "resize", "tres_per_node": "gres:gpu:1",
                                    "rec_account": "physics"})
    assert (added["ok"], added["reason"]) == (0, "denied")
    assert "GPUs cannot be added" in added["message"]


def test_quote_from_slurms_fields(sqlite_ledger, token):
    h = Handlers(sqlite_ledger, Policy("slurm"), free_accounts=("ops",))
    q = h.handle(ALICE, {"op": "quote", "tres_per_node": "gres/gpu:h100:2", "time_limit": "30",
                         "partition": "gpu", "token": token})
    assert (q["ok"], q["amount"], q["covers"], q["seconds"], q["gres"]) == (1, 3600, True,
                                                                           1800, "gpu")
    assert h.handle(ALICE, {"op": "quote", "tres_per_node": "gres:gpu:1", "time_limit": "5",
                            "account": "ops"})["result"] == "free"
    none = h.handle(ALICE, {"op": "quote", "tres_per_node": "gres:nic:1", "time_limit": "5"})
    assert none["reason"] == "bad_request" and "asks for no GPU" in none["message"]


def test_slurms_fields_never_fault_on_hostile_values(sqlite_ledger, token):
    """Whatever Slurm's fields say (a user writes most of them), the reader answers with a
    typed refusal or a result, never an internal fault."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from ledger.jobrequest import SLURM_KEYS

    h = Handlers(sqlite_ledger, Policy("slurm"), free_accounts=("ops",))
    faults = []
    h.on_fault = lambda peer, fields, exc: faults.append((fields, exc))
    value = st.one_of(st.text("gres:/pushardm0129=,.-+x()% ", max_size=24),
                      st.integers(0, 2**33).map(str), st.sampled_from(["", "4294967295"]))

    @settings(max_examples=300, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.sampled_from(["reserve", "resize", "quote"]),
           st.dictionaries(st.sampled_from(sorted(SLURM_KEYS)), value, min_size=1, max_size=6),
           st.booleans())
    def check(op, fields, held):
        extra = {"token": token, "key": "fuzz"} if op == "reserve" else {}
        if op == "resize" and held:
            extra["hold"] = "hold_00"
        resp = h.handle(SLURM, {"op": op, **extra, **fields})
        assert resp["ok"] in (0, 1) and resp.get("reason") != "internal", (fields, resp)

    check()
    assert faults == []
