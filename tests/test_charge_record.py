"""One charge formula and one typed charge record, from the epilog/reconciler to the reports."""

from __future__ import annotations

from datetime import UTC, datetime

from ledger import settlement as settle
from ledger.charge_record import VERSION, ChargeRecord
from ledger.charging import charge_gpus
from ledger.views import HoldRequest
from reports.figures import Measure
from slurm_plugin.receipt import receipt
from slurm_plugin.reconcile import run_charge
from slurm_plugin.slurm import JobRecord
from slurm_plugin.usage import held_only

H = 3600
RATES = {"h100": 1_000_000, "a100": 600_000, "default": 500_000}


def three_gpus_two_measured() -> list[dict]:
    return [{"index": i, "uuid": f"GPU-{i}", "held_ms": 100_000, "busy_ms": busy,
             "energy_mj": 5_000, "peak_mem_bytes": 0, "measured": measured}
            for i, (busy, measured) in enumerate([(50_000, True), (25_000, True), (0, False)])]


def test_two_of_three_measured_count_in_reports_and_receipts(ledger):
    """The epilog's record with GPUs 0 and 1 measured and GPU 2 not: efficiency is their busy
    over their held, coverage 2/3 (before: n/a and 0, the record's top flag hid both)."""
    tok, _ = ledger.mint("physics", 10 * H)
    hold = ledger.reserve(tok, HoldRequest(gpus=3, seconds=600, gpu_type="h100"))
    ledger.bind(hold.id, "901")
    rec = charge_gpus(three_gpus_two_measured(), {0: "h100", 1: "h100", 2: "h100"},
                      ledger.rates(), hold.rate_ppm, "measured", "1/4", source="agent",
                      node="n1", restart=0)
    assert rec.version == VERSION and rec.measured_gpus == 2 and not rec.all_measured
    settle.post_node(ledger, hold.id, "901", 0, "n1", rec.amount, rec)
    stored = ledger.charges(hold.id)[0]["usage"]
    assert stored["version"] == VERSION
    assert [g["measured"] for g in stored["gpus"]] == [True, True, False]
    m = Measure.of_usage(stored)
    assert (m.busy_ms, m.held_ms, m.held_all_ms) == (75_000, 200_000, 300_000)
    assert m.efficiency == 75_000 / 200_000 and m.coverage == 2 / 3
    r = receipt(ledger, "901")["holds"][0]
    assert r["efficiency"] == 75_000 / 200_000 and r["charges"][0]["measured_gpus"] == 2
    assert r["charges"][0]["energy_mj"] == 15_000


def test_version_less_rows_of_the_old_writer_read_per_gpu():
    """A row the old epilog wrote (top-level "measured" meant *all* measured) still reads
    per GPU; the reconciler's old per-type rows expand to unmeasured GPUs."""
    old_epilog = {"policy": "measured", "floor": "0.25", "gpus": three_gpus_two_measured(),
                  "by_type": [{"gpu_type": "h100", "rate_ppm": 1_000_000, "charge": 153}],
                  "held_ms": 300_000, "busy_ms": 75_000, "energy_mj": 15_000,
                  "measured": False, "source": "agent", "node": "n1", "restart": 0}
    rec = ChargeRecord.from_dict(old_epilog)
    assert rec.version == 1 and rec.measured_gpus == 2 and rec.busy_ms == 75_000
    assert (rec.source, rec.node, rec.policy) == ("agent", "n1", "measured")
    old_sacct = {"source": "sacct", "policy": "allocated", "measured": False, "node": "n1",
                 "restart": 0, "elapsed_s": 10, "state": "COMPLETED",
                 "by_type": [{"gpu_type": "a100", "gpus": 2, "rate_ppm": 600_000,
                              "held_ms": 20_000, "charge": 12}],
                 "held_ms": 20_000, "busy_ms": 0, "energy_mj": 0}
    rec = ChargeRecord.from_dict(old_sacct)
    assert [(g.held_ms, g.measured, g.gpu_type) for g in rec.gpus] == [(10_000, False, "a100")] * 2
    assert Measure.of_usage(old_sacct).coverage == 0
    again = ChargeRecord.from_dict(rec.to_dict())
    assert again == rec  # a round trip keeps every figure (and the row's version, 1)


def test_reconciler_charges_by_the_epilogs_formula(ledger, clock):
    """Three a100 GPUs for 1 s: each GPU rounds up on its own (3 × ceil(0.6) = 3 GPU-s), on
    the reconciler's path as on the epilog's (the reconciler rounded the group: ceil(1.8))."""
    tok, _ = ledger.mint("physics", 10 * H)
    hold = ledger.reserve(tok, HoldRequest(gpus=3, seconds=60, gpu_type="a100"))
    run = JobRecord(job_id="5", display_id="5", state="COMPLETED", restarts=0, nodes=["n1"],
                    start=datetime(2026, 11, 1, tzinfo=UTC), elapsed_s=1, gpus={"a100": 3})
    [(node, amount, rec)] = run_charge(ledger.rates(), hold, run)
    epilog_way = charge_gpus(held_only([0, 1, 2], 1000, "agent has no record of the job"),
                             {0: "a100", 1: "a100", 2: "a100"}, ledger.rates(), hold.rate_ppm,
                             "allocated")
    assert amount == epilog_way.amount == 3 and node == "n1"
    assert rec.version == VERSION and rec.source == "sacct" and len(rec.gpus) == 3
    assert [(g.gpu_type, g.rate_ppm, g.measured) for g in rec.gpus] == [("a100", 600_000, False)] * 3


def test_post_node_returns_what_was_charged_not_what_was_asked(ledger):
    """A node asking for more than the hold still holds is capped; the result says the cap."""
    tok, _ = ledger.mint("physics", 10 * H)
    hold = ledger.reserve(tok, HoldRequest(gpus=1, seconds=1200, gpu_type="h100"))
    rec = charge_gpus(held_only([0], 1_000_000, "held"), {0: "h100"}, RATES, hold.rate_ppm,
                      "allocated")
    first = settle.post_node(ledger, hold.id, "7", 0, "n1", 1000, rec)
    assert (first.charged, first.amount) == (True, 1000)
    second = settle.post_node(ledger, hold.id, "7", 0, "n2", rec.amount, rec)
    assert second.charged and second.amount == 200 and "capped" in second.note
    assert ledger.hold(hold.id).charged == 1200
    stored = {c["node"]: c for c in ledger.charges(hold.id)}
    assert stored["n2"]["amount"] == 200
    assert ChargeRecord.from_dict(stored["n2"]["usage"]).uncapped_amount == rec.amount
    assert settle.post_node(ledger, hold.id, "7", 0, "n2", rec.amount, rec).amount == 0
