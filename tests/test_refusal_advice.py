"""Refusals that say what to do: the partition a scoped token wants (``-p``), by how much a
token falls short, the ``-t`` and the cheaper tier that would fit, and a revoked token's
reason — in the reserve's refusal (what sbatch shows) and in ``quote`` alike."""

from __future__ import annotations

import random

import pytest

from ledger.advice import fitting_minutes
from ledger.daemon.auth import Peer, Policy
from ledger.daemon.handlers import Handlers
from ledger.errors import Reason, Refusal
from ledger.pricing import hold_cost
from ledger.tokens import Scopes
from ledger.views import HoldRequest

H = 3600
ALICE = Peer(3, 1001, 1001, "alice", False)


def refusal(ledger, token, request) -> Refusal:
    with pytest.raises(Refusal) as exc:
        ledger.reserve(token, request)
    return exc.value


def test_a_partition_scoped_token_says_which_partition(sqlite_ledger):
    token, view = sqlite_ledger.mint("physics", 10 * H, scopes=Scopes.parse(partitions="gpu"))
    none = refusal(sqlite_ledger, token, HoldRequest(gpus=1, seconds=H, gpu_type="h100"))
    assert none.reason is Reason.WRONG_PARTITION and none.message == (
        f"token {view.id} is not valid without a partition (only gpu): submit with -p gpu")
    short = refusal(sqlite_ledger, token, HoldRequest(gpus=1, seconds=H, gpu_type="h100",
                                                      partition="gpu,short"))
    assert short.message == (f"token {view.id} is not valid in partition short (only gpu): "
                             "submit with -p gpu")
    two, _ = sqlite_ledger.mint("physics", H, scopes=Scopes.parse(partitions="a,b"))
    assert refusal(sqlite_ledger, two, HoldRequest(gpus=1, seconds=60)).message.endswith(
        "(only a, b): submit with -p a or -p b")


def test_short_by_how_much_and_the_time_limit_that_fits(sqlite_ledger):
    token, view = sqlite_ledger.mint("physics", int(2.5 * H))
    r = refusal(sqlite_ledger, token, HoldRequest(gpus=2, seconds=4 * H, gpu_type="h100"))
    assert r.reason is Reason.INSUFFICIENT and (r.needed, r.available) == (8 * H, 2.5 * H)
    assert r.message == (f"needs 8.000 GPU-h (2 x h100 x 4:00:00), token {view.id} has 2.500 "
                         "GPU-h left: 5.500 GPU-h short; -t 1:15:00 would fit")
    array = refusal(sqlite_ledger, token, HoldRequest(gpus=1, seconds=H, tasks=10,
                                                      gpu_type="a100"))
    assert array.message.endswith("3.500 GPU-h short; -t 0:25:00 would fit")  # 10 x 0.6 x 25 m
    crumbs, _ = sqlite_ledger.mint("physics", 30)  # not even a minute of 2 GPUs
    assert refusal(sqlite_ledger, crumbs, HoldRequest(gpus=2, seconds=H)).message.endswith(
        "has 0.008 GPU-h left: 1.992 GPU-h short")


def test_the_cheaper_tier_that_would_fit(sqlite_ledger):
    lg = sqlite_ledger
    lg.set_multiplier("partition", "scavenger", 250_000)
    lg.set_multiplier("qos", "low", 500_000)
    token, _ = lg.mint("physics", int(2.5 * H))
    r = refusal(lg, token, HoldRequest(gpus=2, seconds=4 * H, gpu_type="h100", partition="gpu"))
    assert r.message.endswith("5.500 GPU-h short; -t 1:15:00 would fit, or -p scavenger "
                              "(x0.25) would hold 2.000 GPU-h")
    scoped, _ = lg.mint("physics", int(2.5 * H), scopes=Scopes.parse(partitions="gpu"))
    r = refusal(lg, scoped, HoldRequest(gpus=2, seconds=4 * H, gpu_type="h100",
                                        partition="gpu"))
    assert "scavenger" not in r.message  # its token may not go there
    poor, _ = lg.mint("physics", int(1.5 * H))
    r = refusal(lg, poor, HoldRequest(gpus=1, seconds=2 * H, gpu_type="h100", partition="gpu"))
    assert r.message.endswith("-t 1:30:00 would fit, or -p scavenger (x0.25) would hold "
                              "0.500 GPU-h")  # the cheapest that fits, not the first


def test_quote_says_the_same_and_shows_a_revoked_tokens_reason(sqlite_ledger):
    lg = sqlite_ledger
    h = Handlers(lg, Policy("slurm"), accounts=lambda user: frozenset({"physics"}))
    token, view = lg.mint("physics", int(2.5 * H))
    fields = {"op": "quote", "token": token, "gpus": "2", "type": "h100", "seconds": "14400"}
    short = h.handle(ALICE, fields)
    assert short["ok"] == 1 and short["covers"] is False and short["reason"] == "insufficient"
    assert short["message"] == refusal(lg, token, HoldRequest(
        gpus=2, seconds=4 * H, gpu_type="h100", user="alice")).message
    lg.revoke(view.id, "leaked in a repo")
    revoked = h.handle(ALICE, fields)
    assert revoked["covers"] is False and revoked["reason"] == "revoked"
    assert revoked["message"] == f"token {view.id} was revoked: leaked in a repo"
    assert refusal(lg, token, HoldRequest(gpus=1, seconds=60)).message == revoked["message"]


def test_fitting_minutes_is_the_longest_that_fits():
    rnd = random.Random(24)
    for _ in range(500):
        req = HoldRequest(gpus=rnd.randint(1, 16), seconds=rnd.randint(1, 3 * 1440) * 60,
                          tasks=rnd.choice([1, 1, 3, 100]))
        rate, share = rnd.choice([1_000_000, 600_000, 142_858]), rnd.choice([1, 1, 7])
        mult = rnd.choice([1_000_000, 250_000, 2_000_000])
        need = hold_cost(req.gpus, req.seconds, req.tasks, rate, share, mult)
        available = rnd.randint(0, need)
        m = fitting_minutes(req, rate, share, mult, available)

        def cost(minutes, req=req, rate=rate, share=share, mult=mult):
            return hold_cost(req.gpus, minutes * 60, req.tasks, rate, share, mult)

        if m is None:
            assert cost(1) > available or req.seconds <= 60
        else:
            assert m * 60 < req.seconds and cost(m) <= available
            assert (m + 1) * 60 >= req.seconds or cost(m + 1) > available
