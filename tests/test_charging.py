"""The charge policy: integer amounts, both policies, the floor, unmeasured GPUs."""

from dataclasses import dataclass
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ledger.charging import charge_for


@dataclass
class U:
    index: int
    held_ms: int
    busy_ms: int
    measured: bool = True
    gaps_ms: int = 0
    uuid: str | None = "GPU-x"
    energy_mj: int = 0
    peak_mem_bytes: int = 0


def test_allocated_is_held_time_times_rate_rounded_up_per_gpu():
    r = charge_for([U(0, 3_600_000, 0), U(1, 1_001, 1_001)], 1_000_000, "allocated")
    assert [x.charge for x in r.lines] == [3600, 2]  # 1.001 s -> 2
    assert r.total == 3602 and r.policy == "allocated" and r.rate_ppm == 1_000_000


def test_rate_in_ppm():
    r = charge_for([U(0, 10_000, 0)], 143_000, "allocated")  # 10 s x 0.143 = 1.43
    assert r.total == 2
    r = charge_for([U(0, 3_600_000, 0)], 143_000, "allocated")
    assert r.total == 515  # 3600 x 0.143 = 514.8


def test_measured_takes_busy_or_floor():
    lines = [U(0, 100_000, 60_000), U(1, 100_000, 10_000), U(2, 100_000, 0)]
    r = charge_for(lines, 1_000_000, "measured", 0.25)
    assert [x.charge for x in r.lines] == [60, 25, 25]
    assert [x.billed_ms for x in r.lines] == [60_000, 25_000, 25_000]
    assert r.total == 110 and r.allocated_total == 300 and r.measured_total == 110
    assert r.floor == "1/4"


def test_unmeasured_gpu_pays_held_time():
    r = charge_for([U(0, 50_000, 0, measured=False)], 1_000_000, "measured", 0.25)
    assert r.total == 50 and r.lines[0].measured is False


def test_gaps_count_as_busy():
    r = charge_for([U(0, 100_000, 40_000, gaps_ms=20_000)], 1_000_000, "measured", 0.25)
    assert r.total == 60 and r.lines[0].gaps_ms == 20_000


def test_floor_forms_are_exact():
    u = [U(0, 10_000, 0)]
    assert charge_for(u, 1_000_000, "measured", 0.1).total == 1
    assert charge_for(u, 1_000_000, "measured", "0.15").total == 2  # 1.5 s -> 2
    assert charge_for(u, 1_000_000, "measured", Fraction(1, 3)).lines[0].billed_ms == 3_334
    assert charge_for(u, 1_000_000, "measured", 1).total == 10


def test_result_records_figures_and_serialises():
    u = U(3, 7_000, 2_000, energy_mj=123, peak_mem_bytes=456, uuid="GPU-a")
    d = charge_for([u], 600_000, "measured", 0.25).to_dict()
    line = d["lines"][0]
    assert (line["index"], line["uuid"], line["energy_mj"], line["peak_mem_bytes"]) == (
        3, "GPU-a", 123, 456)
    assert (line["held_ms"], line["busy_ms"], line["measured"]) == (7_000, 2_000, True)
    assert (line["allocated"], line["measured_amount"], line["charge"]) == (5, 2, 2)
    assert (d["policy"], d["rate_ppm"], d["total"]) == ("measured", 600_000, 2)


def test_accepts_mappings():
    r = charge_for([{"index": 0, "held_ms": 2_000, "busy_ms": 2_000, "measured": True}],
                   1_000_000, "measured")
    assert r.total == 2


@pytest.mark.parametrize("args", [
    ("hourly", 0.25, 1_000_000), ("measured", 1.5, 1_000_000), ("measured", -0.1, 1_000_000),
    ("measured", 0.25, -1), ("measured", 0.25, 1.0), ("measured", True, 1_000_000),
])
def test_bad_inputs(args):
    policy, floor, rate = args
    with pytest.raises((ValueError, TypeError)):
        charge_for([U(0, 1000, 0)], rate, policy, floor)


def test_bad_usage_values():
    with pytest.raises(ValueError):
        charge_for([U(0, -5, 0)], 1_000_000, "allocated")
    with pytest.raises(ValueError):
        charge_for([U(0, 5.5, 0)], 1_000_000, "allocated")


def test_busy_beyond_held_is_clamped():
    r = charge_for([U(0, 1_000, 5_000)], 1_000_000, "measured")
    assert r.lines[0].busy_ms == 1_000 and r.total == 1


@given(
    held=st.integers(0, 10**9), busy=st.integers(0, 10**9), gaps=st.integers(0, 10**9),
    rate=st.integers(0, 10**9), floor=st.fractions(0, 1),
)
def test_measured_never_exceeds_allocated_and_never_below_floor(held, busy, gaps, rate, floor):
    line = charge_for([U(0, held, busy, gaps_ms=gaps)], rate, "measured", floor).lines[0]
    assert 0 <= line.measured_amount <= line.allocated
    assert line.billed_ms * floor.denominator >= held * floor.numerator
    assert line.allocated * 10**9 >= held * rate > (line.allocated - 1) * 10**9 or held * rate == 0
