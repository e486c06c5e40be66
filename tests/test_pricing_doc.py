"""docs/pricing.md's worked examples, recomputed by the pricing functions themselves."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ledger.amounts import fmt_hours
from ledger.charging import charge_gpus
from ledger.shares import MPS, MPS_PER_GPU, GresFile, parse_gres_conf
from ledger.slurmsyntax import parse_gres, time_limit_seconds
from ledger.views import HoldRequest

DOC = Path(__file__).resolve().parents[1] / "docs" / "pricing.md"
TEXT = DOC.read_text()


def block(name: str) -> str:
    m = re.search(rf"```{re.escape(name)}\n(.*?)```", TEXT, re.S)
    assert m, f"docs/pricing.md has no {name} block"
    return m.group(1)


def rows() -> list[list[str]]:
    table = re.search(r"\| request \|.*?\n\|[-|]+\|\n((?:\|.*\|\n)+)", TEXT)
    assert table, "docs/pricing.md has no worked-example table"
    return [[c.strip().strip("`") for c in line.strip().strip("|").split("|")]
            for line in table.group(1).splitlines()]


@pytest.fixture
def site(sqlite_ledger, tmp_path):
    gres = tmp_path / "gres.conf"
    gres.write_text(block("gres.conf"))
    sqlite_ledger.gres = GresFile(gres)
    for line in block("rates").splitlines():
        gpu_type, rate = line.split()
        sqlite_ledger.set_rate(gpu_type, int(float(rate) * 1_000_000))
    return sqlite_ledger


def test_the_doc_has_its_examples():
    assert len(rows()) >= 8


@pytest.mark.parametrize("row", rows(), ids=lambda r: r[0])
def test_worked_example(site, row):
    spec, time, array, held, ran_on, held_for, charged = row
    count, gpu_type, kind = parse_gres(spec)
    req = HoldRequest(gpus=count, seconds=time_limit_seconds(time), tasks=int(array),
                      gpu_type=gpu_type, gres=kind)
    amount, rate = site.price(req)
    assert amount == int(held), f"{spec}: held {amount}, the doc says {held}"
    node, index = re.fullmatch(r"(\S+) GPU (\d+)", ran_on).groups()
    gpu = next(g for g in parse_gres_conf(block("gres.conf")).gpus
               if g.node == node and g.index == int(index))
    shares = {}
    if kind != "gpu":
        shares = {gpu.index: (count, MPS_PER_GPU if kind == MPS else gpu.shards)}
    record = charge_gpus([{"index": gpu.index, "held_ms": int(held_for) * 1000,
                           "measured": False}], {gpu.index: gpu.gpu_type}, site.rates(), rate,
                         "allocated", shares=shares)
    assert record.amount == int(charged), f"{spec}: charged {record.amount}, doc {charged}"


def test_the_quote_example(site):
    m = re.search(r"`gpuledger quote --gres=(\S+) -t (\S+)` shows the hold \(`(\S+) GPU-h`\) "
                  r"and the\s+share it was priced at \(`(\d+) of (\d+) shards", TEXT)
    assert m
    count, gpu_type, kind = parse_gres(m.group(1))
    req = HoldRequest(gpus=count, seconds=time_limit_seconds(m.group(2)), gpu_type=gpu_type,
                      gres=kind)
    assert fmt_hours(site.price(req)[0]) == m.group(3)
    assert (count, site.hold_share(req)) == (int(m.group(4)), int(m.group(5)))


def test_the_refusal_example(site):
    m = re.search(r'`shard:9` is refused: "(shard:9 asks for more shards than any GPU\s+has '
                  r'\(at most 8 per GPU)', TEXT)
    assert m
    with pytest.raises(Exception, match=re.escape(re.sub(r"\s+", " ", m.group(1)))):
        site.price(HoldRequest(gpus=9, seconds=60, gres="shard"))


def tier_rows() -> list[list[str]]:
    table = re.search(r"\| partition \| qos \|.*?\n\|[-|]+\|\n((?:\|.*\|\n)+)", TEXT)
    assert table, "docs/pricing.md has no tier table"
    return [[c.strip().strip("`") for c in line.strip().strip("|").split("|")]
            for line in table.group(1).splitlines()]


@pytest.fixture
def tiered_site(site):
    for line in re.search(r"```sh\n(gpuledger tiers set.*?)```", TEXT, re.S).group(1) \
            .splitlines():
        args = line.split("#")[0].split()
        if args[:3] != ["gpuledger", "tiers", "set"]:
            continue
        zone = args[args.index("--zone") + 1] if "--zone" in args else None
        site.set_multiplier(args[3], args[4], int(float(args[5]) * 1_000_000), zone=zone)
    return site


@pytest.mark.parametrize("row", tier_rows(), ids=lambda r: "-".join(r[:3]))
def test_tier_example(tiered_site, row):
    from datetime import datetime
    from zoneinfo import ZoneInfo

    partition, qos, run, charged = row
    zone = ZoneInfo(tiered_site.tiers().zone)
    first, _, last = run.partition(" → ")
    start_text = first.strip()
    end_text = last.strip() if " " in last.strip() else f"{start_text[:10]} {last.strip()}"
    start = datetime.fromisoformat(start_text).replace(tzinfo=zone).timestamp()
    end = datetime.fromisoformat(end_text).replace(tzinfo=zone).timestamp()
    held_ms = round((end - start) * 1000)
    run_ppm, split = tiered_site.tiers().terms(partition, None if qos == "-" else qos,
                                               start, end)
    record = charge_gpus([{"index": 0, "held_ms": held_ms, "measured": False}], {0: "h100"},
                         tiered_site.rates(), 1_000_000, "allocated", run_ppm=run_ppm,
                         split=split)
    assert record.amount == int(charged), f"{row}: charged {record.amount}"
