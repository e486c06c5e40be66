"""Shares of a GPU and MIG slices: one price on every path, the worst case held, integers.

``--gres=shard:N`` takes N of S_g shards of one GPU, ``--gres=mps:N`` N% of one; MIG slices
are GPU types of their own. Quote, the reserve fast path and the checked path must agree."""

from __future__ import annotations

import re

import pytest
from conftest import counted_statements

from ledger.errors import InvalidInput, Reason, Refusal
from ledger.pricing import fallback_rate, mig_share
from ledger.shares import GresFile, Inventory, SharedGpu, parse_gres_conf
from ledger.views import HoldRequest

H = 3600
GRES = """AutoDetect=off
NodeName=n1 Name=gpu Type=h100 File=/dev/nvidia[0-1]
NodeName=n1 Name=gpu Type=a100 File=/dev/nvidia2
NodeName=n1 Name=shard Count=4 File=/dev/nvidia0
NodeName=n1 Name=shard Count=8 File=/dev/nvidia1
NodeName=n1 Name=shard Count=4 File=/dev/nvidia2
NodeName=n2 Name=gpu Type=a100 File=/dev/nvidia[0-2]
NodeName=n2 Name=shard Count=10
"""


@pytest.fixture
def sharded(ledger, tmp_path):
    path = tmp_path / "gres.conf"
    path.write_text(GRES)
    ledger.gres = GresFile(path)
    return ledger


def test_gres_conf_gives_each_gpu_its_shard_count():
    inv = parse_gres_conf(GRES)
    assert inv.gpus == (
        SharedGpu("n1", 0, "h100", 4), SharedGpu("n1", 1, "h100", 8),
        SharedGpu("n1", 2, "a100", 4),
        # a node-wide count is spread evenly, the remainder to the first GPUs
        SharedGpu("n2", 0, "a100", 4), SharedGpu("n2", 1, "a100", 3),
        SharedGpu("n2", 2, "a100", 3))
    assert inv.shards_of("n1", 1) == 8 and inv.shards_of("n2", 2) == 3
    assert inv.shards_of("n1", 5) is None


@pytest.mark.parametrize("req,amount,rate,share", [
    # untyped: highest rate; smallest S_g over every GPU with >= 2 shards (n2's 3)
    (HoldRequest(gpus=2, seconds=H, gres="shard"), 2 * H // 3, 1_000_000, 3),
    # a100 with 4 shards: only GPUs with >= 4 (n1's 4, n2's first 4)
    (HoldRequest(gpus=4, seconds=H, gres="shard", gpu_type="a100"), H * 6 // 10, 600_000, 4),
    # h100, 5 shards: only the GPU cut into 8
    (HoldRequest(gpus=5, seconds=H, gres="shard", gpu_type="h100", tasks=3),
     3 * 5 * H // 8, 1_000_000, 8),
    # MPS is a percentage: S = 100 on every GPU; 7 x 0.6 x 3601 / 100 = 151.242 -> 152
    (HoldRequest(gpus=7, seconds=H + 1, gres="mps", gpu_type="a100"), 152, 600_000, 100),
    # two nodes x 2 shards of h100s: 4 x 1.0 / 4 (n1's GPU 0)
    (HoldRequest(gpus=4, per_node=2, seconds=H, gres="shard", gpu_type="h100"), H, 1_000_000,
     4),
])
def test_shares_are_priced_alike_on_every_path(sharded, req, amount, rate, share):
    ledger = sharded
    assert ledger.price_share(req) == (amount, rate, share)
    rich, _ = ledger.mint("physics", 100 * H)
    fast = ledger.reserve(rich, req)
    assert (fast.amount, fast.rate_ppm, fast.share, fast.gres) == (amount, rate, share, req.gres)
    exact, _ = ledger.mint("physics", amount)  # the checked path's figures are the same
    assert ledger.reserve(exact, req).amount == amount
    poor, _ = ledger.mint("physics", amount)
    ledger.transfer(poor, rich, 1, reason="one GPU-second short")
    with pytest.raises(Refusal) as exc:
        ledger.reserve(poor, req)
    assert exc.value.reason is Reason.INSUFFICIENT and exc.value.needed == amount


@pytest.mark.parametrize("req,message", [
    (HoldRequest(gpus=9, seconds=H, gres="shard"), "more shards than any GPU has (at most 8"),
    (HoldRequest(gpus=5, seconds=H, gres="shard", gpu_type="a100"),
     "more shards than any a100 GPU has (at most 4"),
    (HoldRequest(gpus=1, seconds=H, gres="shard", gpu_type="v100"), "no v100 GPU has shards"),
    (HoldRequest(gpus=101, seconds=H, gres="mps"), "an MPS share is 1 to 100"),
])
def test_a_share_no_gpu_can_give_is_refused_clearly(sharded, req, message):
    rich, _ = sharded.mint("physics", 100 * H)
    with pytest.raises(InvalidInput, match=re.escape(message)):
        sharded.price(req)
    with pytest.raises(InvalidInput, match=re.escape(message)):
        sharded.reserve(rich, req)


def test_unknown_gres_and_bad_share_counts_are_input_errors():
    with pytest.raises(InvalidInput, match="unknown GRES 'nic'"):
        HoldRequest(gpus=1, seconds=H, gres="nic")
    with pytest.raises(InvalidInput, match="per node must divide"):
        HoldRequest(gpus=5, per_node=2, seconds=H, gres="shard")
    with pytest.raises(InvalidInput, match="no GPU has shards"):
        Inventory().hold_share("shard", None, 1)


def test_mig_profiles_default_to_their_share_of_the_default_rate(ledger):
    assert mig_share("1g.10gb") == mig_share("nvidia_a100_1g.10gb") == pytest.approx(1 / 7)
    assert mig_share("3g.40gb").numerator == 3 and mig_share("h100") is None
    assert fallback_rate("3g.40gb", 500_000) == 214_286  # 3/7 x 0.5 rounded up to a ppm
    req = HoldRequest(gpus=2, seconds=H, gpu_type="3g.40gb")
    assert ledger.price(req) == (2 * 771 + 1, 214_286)  # ceil(2 x 3600 x 0.214286)
    ledger.set_rate("3g.40gb", 400_000)  # a rate of its own wins
    assert ledger.price(req) == (2 * H * 4 // 10, 400_000)
    rich, _ = ledger.mint("physics", 10 * H)
    assert ledger.reserve(rich, HoldRequest(gpus=1, seconds=H, gpu_type="1g.10gb")).rate_ppm \
        == 71_429


def test_a_share_reserve_takes_no_more_statements_than_a_whole_gpu(sharded, tmp_path, db_url):
    """Pricing a share is decided from gres.conf in memory: the reserve fast path runs the
    same statements for a shard as for a whole GPU."""
    ledger = sharded
    rich, _ = ledger.mint("physics", 100 * H)
    with counted_statements(ledger.engine, db_url) as counted:
        runs = []
        for req in (HoldRequest(gpus=1, seconds=H, gpu_type="h100"),
                    HoldRequest(gpus=2, seconds=H, gpu_type="h100", gres="shard")):
            ledger.reserve(rich, req)  # warm (the wallet ids are cached after the first)
            counted.clear()
            ledger.reserve(rich, req)
            runs.append(len(counted))
    assert runs[0] == runs[1] and runs[0] > 0
