"""A job's scopes are checked over every partition it may start in, and again whenever
``scontrol update`` changes what it asks for (GPU type, partitions, account)."""

from __future__ import annotations

import pytest

from ledger.errors import InvalidInput, Reason, Refusal
from ledger.slurmsyntax import parse_gres
from ledger.tokens import Scopes
from ledger.views import HoldRequest


def _mint(ledger, **scopes):
    return ledger.mint("physics", 10 * 3600, scopes=Scopes(**scopes))[0]


def test_every_candidate_partition_must_be_in_scope(ledger):
    token = _mint(ledger, partitions=("gpu",))
    for candidates in ("gpu,short", "short,gpu", "short"):
        with pytest.raises(Refusal) as err:
            ledger.reserve(token, HoldRequest(gpus=1, seconds=60, gpu_type="h100",
                                              partition=candidates))
        assert err.value.reason is Reason.WRONG_PARTITION
        assert "partition short" in err.value.message
    with pytest.raises(Refusal) as err:  # unknown partition: cannot be inside the scope
        ledger.reserve(token, HoldRequest(gpus=1, seconds=60, gpu_type="h100"))
    assert err.value.reason is Reason.WRONG_PARTITION
    hold = ledger.reserve(token, HoldRequest(gpus=1, seconds=60, gpu_type="h100",
                                             partition="gpu"))
    assert hold.partition == "gpu"
    assert ledger.totals()["system:escrow"] == 60


def test_resize_to_another_gpu_type_reprices_and_rechecks(ledger):
    token = _mint(ledger, gpu_types=("a100", "h100"))
    hold = ledger.reserve(token, HoldRequest(gpus=2, seconds=3600, gpu_type="a100"))
    assert hold.amount == 2 * 2160
    up = ledger.resize(hold.id, gpu_type="h100")
    assert (up.gpu_type, up.rate_ppm, up.amount) == ("h100", 1_000_000, 7200)
    assert ledger.totals()["system:escrow"] == 7200
    with pytest.raises(Refusal) as err:  # untyped may land on any type: outside the scope
        ledger.resize(hold.id, gpu_type=None)
    assert err.value.reason is Reason.WRONG_GPU_TYPE
    again = ledger.hold(hold.id)
    assert (again.gpu_type, again.amount) == ("h100", 7200)
    down = ledger.resize(hold.id, gpu_type="a100", seconds=1800)
    assert down.amount == 2 * 1080 and ledger.totals()["system:escrow"] == 2160
    assert ledger.verify_journal().ok


def test_untyped_resize_holds_the_highest_rate(ledger):
    token = _mint(ledger)
    hold = ledger.reserve(token, HoldRequest(gpus=1, seconds=3600, gpu_type="a100"))
    same = ledger.resize(hold.id, seconds=3600)  # the type stays: the hold's own rate
    assert (same.gpu_type, same.amount) == ("a100", 2160)
    any_type = ledger.resize(hold.id, gpu_type=None)
    assert (any_type.gpu_type, any_type.rate_ppm, any_type.amount) == (None, 1_000_000, 3600)


def test_resize_cannot_move_a_job_out_of_its_tokens_scopes(ledger):
    token = _mint(ledger, partitions=("gpu",))
    hold = ledger.reserve(token, HoldRequest(gpus=1, seconds=600, gpu_type="h100",
                                             partition="gpu", account="physics"))
    with pytest.raises(Refusal) as err:
        ledger.resize(hold.id, partition="gpu,short")
    assert err.value.reason is Reason.WRONG_PARTITION
    with pytest.raises(Refusal) as err:
        ledger.resize(hold.id, account="chemistry")
    assert err.value.reason is Reason.WRONG_ACCOUNT
    assert ledger.hold(hold.id) == hold
    unrated = ledger.resize(hold.id, gpu_type="l40s")  # no rate of its own: the default
    assert (unrated.rate_ppm, unrated.amount) == (500_000, 300)


def test_quote_reads_whole_gpus_and_shares_and_refuses_bad_gres():
    assert parse_gres("gpu:h100:2,nic:1", known=("nic",)) == (2, "h100", "gpu")
    assert parse_gres("shard:2") == (2, None, "shard")
    assert parse_gres("gres:mps:a100:50") == (50, "a100", "mps")
    assert parse_gres("gres/shard:h100:1") == (1, "h100", "shard")
    with pytest.raises(InvalidInput, match="not both"):
        parse_gres("gpu:1,shard:1")
    with pytest.raises(InvalidInput, match="unknown GRES 'shrad'"):
        parse_gres("shrad:2")
