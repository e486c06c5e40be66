"""Tiers: multipliers by partition, by QOS and by time of use; journaled like rates; one
price on every path; a run that straddles an off-peak boundary is charged to the ms."""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

import pytest
from conftest import counted_statements

from ledger.charging import charge_gpus
from ledger.errors import InvalidInput, Reason, Refusal
from ledger.tiers import Tiers, combine
from ledger.views import HoldRequest

H = 3600
BERLIN = ZoneInfo("Europe/Berlin")


def at(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=BERLIN).timestamp()


@pytest.fixture
def tiered(ledger):
    ledger.set_multiplier("partition", "scavenger", 250_000)
    ledger.set_multiplier("qos", "premium", 2_000_000)
    ledger.set_multiplier("offpeak", "22:00-06:00", 500_000, zone="Europe/Berlin")
    return ledger


def test_multipliers_are_journaled_like_rates(tiered):
    tiered.set_multiplier("partition", "scavenger", 300_000)
    tiered.unset_multiplier("qos", "premium")
    rows = [r for r in tiered.journal() if r["kind"].startswith("multiplier_")]
    assert [r["data"] for r in rows] == [
        {"kind": "partition", "name": "scavenger", "multiplier_ppm": 250_000,
         "previous_ppm": None},
        {"kind": "qos", "name": "premium", "multiplier_ppm": 2_000_000, "previous_ppm": None},
        {"kind": "offpeak", "name": "22:00-06:00", "multiplier_ppm": 500_000,
         "previous_ppm": None, "zone": "Europe/Berlin"},
        {"kind": "partition", "name": "scavenger", "multiplier_ppm": 300_000,
         "previous_ppm": 250_000},
        {"kind": "qos", "name": "premium", "previous_ppm": 2_000_000}]
    assert tiered.verify_journal().ok
    t = tiered.tiers()
    assert (t.partition, t.qos, t.offpeak, t.zone) == (
        {"scavenger": 300_000}, {}, (("22:00-06:00", 500_000),), "Europe/Berlin")


@pytest.mark.parametrize("window,zone,message", [
    ("05:00-07:00", "Europe/Berlin", "overlaps 22:00-06:00"),
    ("21:00-23:00", "Europe/Berlin", "overlaps 22:00-06:00"),
    ("12:00-13:00", "UTC", "site's time zone, Europe/Berlin"),
    ("25:00-26:00", "Europe/Berlin", "not an off-peak window"),
    ("08:00-08:00", "Europe/Berlin", "empty"),
    ("12:00-13:00", "Mars/Olympus", "unknown time zone"),
])
def test_bad_off_peak_windows_are_refused(tiered, window, zone, message):
    with pytest.raises(InvalidInput, match=message):
        tiered.set_multiplier("offpeak", window, 500_000, zone=zone)


def test_a_window_that_touches_another_is_fine(tiered):
    tiered.set_multiplier("offpeak", "06:00-08:00", 800_000, zone="Europe/Berlin")
    assert len(tiered.tiers().offpeak) == 2


@pytest.mark.parametrize("partition,qos,multiplier", [
    ("scavenger", None, 250_000),
    ("gpu,scavenger", None, 1_000_000),  # may run in gpu: the worst case
    ("scavenger", "premium", 500_000),
    ("gpu", "premium", 2_000_000),
    ("gpu", "premium,normal", 2_000_000),
])
def test_holds_take_the_worst_case_on_every_path(tiered, partition, qos, multiplier):
    req = HoldRequest(gpus=2, seconds=H, gpu_type="a100", partition=partition, qos=qos)
    amount = -(-2 * H * 600_000 * multiplier // 10**12)
    assert tiered.price_tiered(req) == (amount, 600_000, 1, multiplier)
    rich, _ = tiered.mint("physics", 100 * H)
    fast = tiered.reserve(rich, req)
    assert (fast.amount, fast.multiplier_ppm, fast.qos) == (amount, multiplier, qos)
    poor, _ = tiered.mint("physics", amount)
    tiered.transfer(poor, rich, 1, reason="one short")
    with pytest.raises(Refusal) as exc:  # the checked path prices it the same
        tiered.reserve(poor, req)
    assert exc.value.reason is Reason.INSUFFICIENT and exc.value.needed == amount


def test_a_surcharge_window_is_held_at_its_multiplier(ledger):
    ledger.set_multiplier("offpeak", "09:00-17:00", 1_500_000)  # a peak surcharge
    assert ledger.price(HoldRequest(gpus=1, seconds=H, gpu_type="h100")) == (H * 3 // 2,
                                                                             1_000_000)


def test_resize_to_another_partition_reprices_the_multiplier(tiered):
    rich, _ = tiered.mint("physics", 100 * H)
    hold = tiered.reserve(rich, HoldRequest(gpus=1, seconds=H, gpu_type="h100",
                                            partition="gpu"))
    assert hold.amount == H
    moved = tiered.resize(hold.id, partition="scavenger")
    assert (moved.amount, moved.multiplier_ppm) == (H // 4, 250_000)
    assert tiered.inspect(hold.token_id).held == H // 4


def test_bind_reprices_the_hold_for_the_qos_the_job_runs_in(tiered):
    """A job without --qos runs in its association's default QOS (job_submit cannot see it)
    or one `scontrol update` set: PrologSlurmctld binds with it and the hold follows."""
    rich, _ = tiered.mint("physics", 100 * H)
    hold = tiered.reserve(rich, HoldRequest(gpus=1, seconds=H, gpu_type="h100",
                                            partition="gpu"))
    rows = len(tiered.journal())
    same = tiered.bind(hold.id, "77", qos="normal")  # no multiplier: the same price
    assert (same.amount, same.qos, same.job_id) == (H, "normal", "77")
    assert len(tiered.journal()) == rows + 1  # the bind; no resize row
    up = tiered.bind(hold.id, "77", qos="premium")
    assert (up.amount, up.qos, up.multiplier_ppm) == (2 * H, "premium", 2_000_000)
    assert tiered.inspect(hold.token_id).held == 2 * H
    last = tiered.journal()[-1]
    assert (last["kind"], last["amount"]) == ("resize", H)
    assert tiered.bind(hold.id, "77", qos="premium").amount == 2 * H  # again: nothing
    down = tiered.bind(hold.id, "77", qos="normal")
    assert (down.amount, down.multiplier_ppm) == (H, 1_000_000)
    assert tiered.verify_journal().ok


def test_bind_narrows_a_one_run_hold_to_the_partition_it_runs_in(tiered):
    """-p gpu,scavenger is held at the dearer gpu; it runs in scavenger (0.25): the bind
    returns the difference, and the settlement (the reconciler's too) sees scavenger. A job
    without -p runs in the default partition, which job_submit cannot see. An array's hold
    keeps its candidates: its tasks may run in either."""
    rich, _ = tiered.mint("physics", 100 * H)
    req = HoldRequest(gpus=1, seconds=H, gpu_type="h100", partition="gpu,scavenger")
    hold = tiered.reserve(rich, req)
    assert hold.amount == H
    ran = tiered.bind(hold.id, "80", partition="scavenger")
    assert (ran.amount, ran.partition, ran.multiplier_ppm) == (H // 4, "scavenger", 250_000)
    assert tiered.inspect(hold.token_id).held == H // 4
    bare = tiered.reserve(rich, HoldRequest(gpus=1, seconds=H, gpu_type="h100"))
    assert tiered.bind(bare.id, "81", partition="scavenger").amount == H // 4
    same = tiered.reserve(rich, HoldRequest(gpus=1, seconds=H, gpu_type="h100"))
    rows = len(tiered.journal())
    same = tiered.bind(same.id, "82", partition="gpu")  # no multiplier: the price stands
    assert (same.amount, same.partition) == (H, "gpu") and len(tiered.journal()) == rows + 1
    array = tiered.reserve(rich, HoldRequest(gpus=1, seconds=H, gpu_type="h100", tasks=3,
                                             partition="gpu,scavenger"))
    kept = tiered.bind(array.id, "83", partition="scavenger")
    assert (kept.amount, kept.partition) == (3 * H, "gpu,scavenger")
    assert tiered.verify_journal().ok


def test_a_token_that_cannot_pay_the_qos_refuses_the_bind_and_nothing_moves(tiered):
    poor, _ = tiered.mint("physics", H + H // 2)
    hold = tiered.reserve(poor, HoldRequest(gpus=1, seconds=H, gpu_type="h100"))
    with pytest.raises(Refusal) as exc:
        tiered.bind(hold.id, "78", qos="premium")
    assert exc.value.reason == Reason.INSUFFICIENT
    assert exc.value.message == (f"the job runs in QOS premium (2x): needs 1.000 GPU-h more, "
                                 f"token {hold.token_id} has 0.500 GPU-h left")
    h = tiered.hold(hold.id)
    assert (h.amount, h.job_id, h.qos, h.state) == (H, None, None, "pending")
    assert tiered.verify_journal().ok


def test_quote_names_the_multiplier_and_the_cheapest_tier(tiered):
    q = tiered.tier_quote(HoldRequest(gpus=1, seconds=H, gpu_type="h100", partition="gpu"))
    assert q == {"multiplier_ppm": 1_000_000, "cheapest": "partition scavenger",
                 "cheapest_multiplier_ppm": 250_000, "cheapest_amount": H // 4}
    assert "cheapest" not in tiered.tier_quote(
        HoldRequest(gpus=1, seconds=H, gpu_type="h100", partition="scavenger"))


def test_a_run_straddling_the_off_peak_boundary_is_charged_exactly():
    """21:30 → 22:30 Berlin: 30 min at 1, 30 min at 0.5; in scavenger at 0.25."""
    t = Tiers(partition={"scavenger": 250_000}, offpeak=(("22:00-06:00", 500_000),),
              zone="Europe/Berlin")
    start, end = at("2026-12-01T21:30:00"), at("2026-12-01T22:30:00")
    assert t.segments(start, end, 3_600_000) == [(None, 1_800_000, 1_000_000),
                                                 ("22:00-06:00", 1_800_000, 500_000)]
    for partition, expected in (("gpu", 1800 + 900), ("scavenger", 450 + 225)):
        run_ppm, split = t.terms(partition, None, start, end)
        rec = charge_gpus([{"index": 0, "held_ms": 3_600_000, "measured": False}],
                          {0: "h100"}, {"h100": 1_000_000}, 1_000_000, "allocated",
                          run_ppm=run_ppm, split=split)
        assert rec.amount == expected
        assert [(p["tier"], p["ms"], p["amount"]) for p in rec.gpus[0].tiers] == [
            ("standard", 1_800_000, expected * 2 // 3),
            ("22:00-06:00", 1_800_000, expected // 3)]


def test_time_of_use_follows_the_site_zone_across_midnight_and_dst():
    t = Tiers(offpeak=(("22:00-06:00", 500_000),), zone="Europe/Berlin")
    # a whole day: 8 off-peak hours
    start = at("2026-12-01T12:00:00")
    day = t.segments(start, start + 86400, 86_400_000)
    assert day == [(None, 16 * 3_600_000, 1_000_000), ("22:00-06:00", 8 * 3_600_000, 500_000)]
    # the night the clocks go back (25 hours long): 9 off-peak hours between 22:00 and 06:00
    night = at("2026-10-24T22:00:00"), at("2026-10-25T06:00:00")
    assert night[1] - night[0] == 9 * 3600
    assert t.segments(*night, 9 * 3_600_000) == [("22:00-06:00", 9 * 3_600_000, 500_000)]


def test_combined_multipliers_round_up_to_a_ppm():
    assert combine(333_333, 1_500_000) == 500_000  # 499999.5 -> 500000
    assert combine(250_000, 2_000_000, 500_000) == 250_000


def test_tiers_add_no_statement_to_the_reserve_fast_path(ledger, db_url):
    """The multipliers come as subqueries of the fast path's second statement: a reserve
    with every kind of tier set runs as many statements as one with none."""
    rich, _ = ledger.mint("physics", 100 * H)
    req = HoldRequest(gpus=1, seconds=H, gpu_type="h100", partition="gpu,scavenger",
                      qos="premium")
    with counted_statements(ledger.engine, db_url) as counted:
        runs = []
        for setup in (lambda: None, lambda: (
                ledger.set_multiplier("partition", "scavenger", 250_000),
                ledger.set_multiplier("qos", "premium", 2_000_000),
                ledger.set_multiplier("offpeak", "22:00-06:00", 500_000))):
            setup()
            ledger.reserve(rich, req)
            counted.clear()
            hold = ledger.reserve(rich, req)
            runs.append(len(counted))
    assert runs[0] == runs[1] > 0 and hold.multiplier_ppm == 2_000_000
