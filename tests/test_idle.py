"""Idle GPUs (ledger.idle): the agent counts idle time and stretches, the charge record keeps
them, `gpuledger idle send` flags, refunds once and mails one digest per owner, the agent
cancels a wholly idle job after the grace (off by default), and the report says what idle
time cost per user."""

from __future__ import annotations

from email import message_from_bytes
from email import policy as email_policy
from fractions import Fraction

import pytest
from conftest import Clock
from fakenvml import FakeClock, FakeNvmlLib, install
from fakenvml.scenario import run_until, two_h100
from report_fixtures import H, SmtpServer, at
from sqlalchemy import select

from ledger import config, db
from ledger.charge_record import ChargeRecord
from ledger.charging import charge_gpus
from ledger.errors import ConfigError
from ledger.idle import IdlePolicy, idle_cost, parse, record_idle
from ledger.views import HoldRequest
from reports.idle import IN, send_idle
from reports.mail import SmtpSettings
from slurm_plugin.agent import accounting
from slurm_plugin.agent.config import AgentConfig
from slurm_plugin.agent.core import Agent
from slurm_plugin.agent.spool import Spool
from slurm_plugin.nvml import Sample

RATES = {"h100": 1_000_000, "a100": 600_000}
MIN = 60_000


# -- the policy -----------------------------------------------------------------------------


def test_defaults_flag_after_an_hour_below_five_percent_and_never_refund_or_cancel():
    p = parse({})
    assert (p.threshold_bp, p.flag_after_s, p.refund_share, p.cancel_at_ms) == (500, 3600, 0,
                                                                                None)
    p = parse({"threshold_pct": 2.5, "flag_after_s": 600, "refund_share": "1/2",
               "cancel_after_s": 300, "user_mail": "{user}@hpc.example"})
    assert (p.threshold_bp, p.refund_share, p.cancel_at_ms) == (250, Fraction(1, 2), 900_000)
    assert p.recipients("alice") == ["alice@hpc.example"]


@pytest.mark.parametrize("table, says", [
    ({"threshold_pct": 0}, "threshold_pct must be above 0"),
    ({"threshold_pct": 101}, "threshold_pct must be above 0 and at most 100"),
    ({"threshold_pct": "lots"}, "threshold_pct must be a number, got 'lots'"),
    ({"refund_share": 1.5}, "refund_share must be between 0 and 1"),
    ({"flag_after_s": -1}, "flag_after_s must be a whole number of seconds"),
    ({"flag_after_s": 1.5}, "flag_after_s must be a whole number of seconds"),
    ({"flag_after_s": 0, "cancel_after_s": 60}, "cancel_after_s needs flag_after_s"),
    ({"flag_after_s": 0, "refund_share": 0.5}, "refund_share needs flag_after_s"),
    ({"user_mail": "alice@example.org"}, "user_mail must be an address pattern with {user}"),
    ({"user_mail": "{user}@{domain}"}, "user_mail may name only {user}"),
    ({"treshold_pct": 5}, "unknown setting(s) treshold_pct"),
])
def test_a_bad_idle_setting_is_named(table, says):
    with pytest.raises(ConfigError, match="idle") as exc:
        parse(table)
    assert says in str(exc.value)


def test_the_config_file_and_the_agent_read_the_same_table(tmp_path):
    path = tmp_path / "gpuledger.toml"
    path.write_text('[database]\nurl = "sqlite:///x.db"\n[idle]\nthreshold_pct = 10\n'
                    'flag_after_s = 120\ncancel_after_s = 60\n[agent]\ninterval = 2\n')
    assert config.load(path).idle == AgentConfig.load(str(path)).idle == parse(
        {"threshold_pct": 10, "flag_after_s": 120, "cancel_after_s": 60})
    path.write_text('[database]\nurl = "sqlite:///x.db"\n[idle]\nrefund_share = 2\n')
    with pytest.raises(ConfigError, match=rf"{path}: \[idle\]: refund_share must be between"):
        config.load(path)
    with pytest.raises(ValueError, match="refund_share must be between"):
        AgentConfig.load(str(path))


# -- the agent counts ------------------------------------------------------------------------


def _sample(util):
    return {"u": None if util is None else Sample("u", util, "fake", None, None, None)}


def test_idle_time_and_the_longest_stretch_a_gap_breaks_it():
    job = accounting.JobState(1, 0, 0, 0, [accounting.GpuState(0, "u", True)])
    # 10 s busy, 30 s at 1 %, a 5 s gap, 20 s at 4.99 %, 10 s at exactly 5 % (not idle)
    t = 0
    for util, seconds in ((80, 10), (1, 30), (None, 5), (4.99, 20), (5, 10)):
        for _ in range(seconds):
            t += 1000
            accounting.advance(job, t, _sample(util), idle_below_bp=500)
    g = accounting.usage(job).gpus[0]
    assert (g.held_ms, g.idle_ms, g.idle_max_ms, g.gaps_ms) == (75_000, 50_000, 30_000, 5_000)
    assert accounting.idle_for_ms(job) == 0  # the last stretch ended with the 5 % samples


def test_the_agent_over_fake_nvml_counts_the_idle_phases_of_the_trace(tmp_path):
    """The reference trace: idle 10 s, 50 % 10 s, 100 % 10 s, idle 10 s, on two H100s (one
    through GPM, one through utilization rates), sampled by the real bindings."""
    clock = FakeClock()
    with install(FakeNvmlLib(two_h100(), clock)):
        agent = Agent(Spool(tmp_path / "spool"), [("GPU-h100-0000",), ("GPU-h100-0001",)],
                      clock=clock, idle=parse({"threshold_pct": 5}))
        agent.start()
        agent.tick()
        agent.register(7, 0, [0, 1])
        run_until(agent, clock, 40_000)
        u = agent.summary(7, 0)
        agent.stop()
    for g in u.gpus:
        assert (g.held_ms, g.busy_ms, g.idle_ms) == (40_000, 15_000, 20_000)
        assert g.idle_max_ms == 10_000


def test_the_agent_cancels_a_wholly_idle_job_once_after_the_grace(tmp_path):
    cancelled = []
    clock = FakeClock()
    policy = parse({"threshold_pct": 5, "flag_after_s": 4, "cancel_after_s": 3})
    with install(FakeNvmlLib(two_h100(), clock)):
        agent = Agent(Spool(tmp_path / "spool"), [("GPU-h100-0000",), ("GPU-h100-0001",)],
                      clock=clock, idle=policy,
                      canceller=lambda job, why: cancelled.append((job, why)))
        agent.start()
        agent.tick()
        agent.register(9, 0, [0, 1])
        run_until(agent, clock, 6_000)  # idle 6 s: flagged (4 s), grace (3 s) not over
        assert cancelled == []
        run_until(agent, clock, 9_000)
        assert cancelled == [(9, "every GPU below 5 % for 7 s (idle cancel after 7 s)")]
        run_until(agent, clock, 10_000)
        assert len(cancelled) == 1
        agent.stop()


def test_a_job_with_one_busy_gpu_is_not_cancelled_and_off_means_off(tmp_path):
    job = accounting.JobState(1, 0, 0, 0, [accounting.GpuState(0, "a", True),
                                          accounting.GpuState(1, "b", True)])
    for t in range(1, 601):
        accounting.advance(job, t * 1000, {"a": Sample("a", 0, "f", None, None, None),
                                          "b": Sample("b", 90, "f", None, None, None)},
                           idle_below_bp=500)
    assert accounting.idle_for_ms(job) == 0
    assert [g.idle_max_ms for g in job.gpus] == [600_000, 0]
    assert IdlePolicy().cancel_at_ms is None


def test_a_failed_scancel_is_retried_later_not_every_round(tmp_path):
    calls = []

    def refuse(job, why):
        calls.append(job)
        raise OSError("scancel 9: Invalid job id specified")

    clock = FakeClock()
    with install(FakeNvmlLib(two_h100(), clock)):
        agent = Agent(Spool(tmp_path / "spool"), [("GPU-h100-0000",), ("GPU-h100-0001",)],
                      clock=clock, retry_ms=5_000, canceller=refuse,
                      idle=parse({"flag_after_s": 1, "cancel_after_s": 1}))
        agent.start()
        agent.tick()
        agent.register(9, 0, [0])
        run_until(agent, clock, 9_000)  # due at 2 s, retried at 7 s
        agent.stop()
    assert calls == [9, 9]


# -- the charge record ----------------------------------------------------------------------


def _usage(index, held_min, idle_min, stretch_min, busy_min=None, measured=True):
    busy = held_min - idle_min if busy_min is None else busy_min
    return {"index": index, "uuid": f"GPU-{index}", "held_ms": held_min * MIN,
            "busy_ms": busy * MIN, "energy_mj": 0, "peak_mem_bytes": 0,
            "measured": measured, "idle_ms": idle_min * MIN, "idle_max_ms": stretch_min * MIN}


def test_the_record_keeps_idle_figures_of_measured_whole_gpus_only():
    rec = charge_gpus([_usage(0, 120, 90, 80), _usage(1, 120, 0, 0), _usage(2, 120, 120, 120,
                                                                           measured=False),
                       _usage(3, 120, 60, 60)],
                      {0: "h100", 1: "h100", 2: "h100", 3: "a100"}, RATES, 1_000_000,
                      "allocated", shares={3: (2, 8)})
    assert [(g.idle_ms, g.idle_max_ms) for g in rec.gpus] == [
        (90 * MIN, 80 * MIN), (0, 0), (None, None), (None, None)]  # 3: a share of the GPU
    again = ChargeRecord.from_dict(rec.to_dict())
    assert again == rec and again.version == 3
    # idle cost: 90 of 120 minutes of GPU 0's 7200 GPU-s; nothing on the others
    assert [idle_cost(g) for g in rec.gpus] == [5400, 0, 0, 0]
    assert record_idle(rec) == (90 * MIN, 5400)
    old = {k: v for k, v in rec.to_dict().items()}
    old["gpus"] = [{k: v for k, v in g.items() if not k.startswith("idle")} for g in old["gpus"]]
    old["version"] = 2
    # a record from before idle counting: held − busy of its measured GPUs, costed the same
    assert record_idle(ChargeRecord.from_dict(old)) == (90 * MIN, 5400)


def test_flag_and_refund_round_down_and_need_one_long_stretch():
    rec = charge_gpus([_usage(0, 61, 59, 59), _usage(1, 61, 61, 61)], {0: "a100", 1: "a100"},
                      RATES, 600_000, "allocated")
    # a100 at 0.6: each GPU 61 min = 2196 GPU-s; idle cost 59/61 → 2124, 61/61 → 2196
    assert [idle_cost(g) for g in rec.gpus] == [2124, 2196]
    assert parse({"flag_after_s": 3660}).flagged(rec)
    assert not parse({"flag_after_s": 3661}).flagged(rec)
    p = parse({"flag_after_s": 3600, "refund_share": "1/3"})
    assert p.refund(rec) == 708 + 732
    assert parse({"flag_after_s": 3600}).refund(rec) == 0


# -- flag, refund, digest ------------------------------------------------------------------


@pytest.fixture
def clock():
    return Clock(at(11, 20))


@pytest.fixture
def smtp(tmp_path):
    with SmtpServer(tmp_path) as server:
        yield server


def _job(lg, token, user, job_id, usages, clock, account="physics"):
    clock.advance(hours=2)
    held = max(u["held_ms"] for u in usages) // 1000
    hold = lg.reserve(token, HoldRequest(gpus=len(usages), seconds=held, gpu_type="h100",
                                         user=user, account=account))
    lg.bind(hold.id, job_id, user=user, account=account)
    rec = charge_gpus(usages, {u["index"]: "h100" for u in usages}, RATES, hold.rate_ppm,
                      "allocated", source="agent", node="gpu01", restart=0)
    lg.post(hold.id, rec.amount, usage=rec, key=f"{hold.id}:{job_id}:0:gpu01", final=False,
            job_id=job_id, node="gpu01", restart=0)
    lg.post(hold.id, 0, key=f"close:{hold.id}")
    return lg.hold(hold.id)


@pytest.mark.smtp
def test_one_digest_per_user_refunds_once_and_a_rerun_repeats_nothing(ledger, clock, smtp,
                                                                     tmp_path):
    lg = ledger
    tok, view = lg.mint("physics", 100 * H, expires=at(12, 31, year=2027))
    btok, _ = lg.mint("physics", 50 * H, expires=at(12, 31, year=2027))
    policy = parse({"threshold_pct": 5, "flag_after_s": 3600, "refund_share": 0.5,
                    "user_mail": "{user}@hpc.example"})
    a1 = _job(lg, tok, "alice", "101", [_usage(0, 120, 90, 80), _usage(1, 120, 10, 10)], clock)
    a2 = _job(lg, tok, "alice", "102", [_usage(0, 240, 120, 61)], clock)
    busy = _job(lg, tok, "alice", "103", [_usage(0, 240, 59, 59)], clock)  # never an hour
    b1 = _job(lg, btok, "bob", "201", [_usage(0, 90, 90, 90)], clock)
    settings = SmtpSettings.from_section(smtp.settings(tmp_path))
    usage = lg.wallet_balance("system:usage")

    first = send_idle(lg, policy, settings=settings)
    assert (first.flagged, first.failures) == (3, 0)
    assert sorted(o.scope for o in first.outcomes) == ["user:alice", "user:bob"]
    (alice,) = smtp.handler.to("alice@hpc.example")
    (bob,) = smtp.handler.to("bob@hpc.example")
    text = alice.get_body(("plain",)).get_content()
    assert alice["Subject"] == "Idle GPUs: 2 jobs of user alice, 3.667 raw GPU hours idle"
    text = " ".join(text.split())  # the text part wraps at 78 columns
    assert all(len(ln) <= 78 for ln in alice.get_body(("plain",)).get_content().splitlines())
    assert ("Job 101 (physics, alice, gpu01): GPUs idle 1.667 of 4.000 raw hours held (longest"
            " stretch 1 h 20 min), costing 1.667 GPU-h; 0.833 GPU-h refunded.") in text
    assert ("Job 102 (physics, alice, gpu01): GPUs idle 2.000 of 4.000 raw hours held (longest"
            " stretch 1 h 01 min), costing 2.000 GPU-h; 1.000 GPU-h refunded.") in text
    assert "Raw hours are time on the GPUs, whatever their type; GPU-h are GPU-hours at " \
        "the reference rate" in text
    assert "Job 103" not in text and "bob" not in text
    assert "Job 201 (physics, bob, gpu01): GPUs idle 1.500 of 1.500 raw hours held" in \
        " ".join(bob.get_body(("plain",)).get_content().split())
    # refunds: half the idle cost of each flagged settlement, journaled on its hold
    assert [lg.hold(h.id).refunded for h in (a1, a2, busy, b1)] == [3000, 3600, 0, 2700]
    assert lg.wallet_balance("system:usage") == usage - 6600 - 2700
    assert lg.verify_journal().ok

    again = send_idle(lg, policy, settings=settings)
    assert (again.flagged, again.outcomes, again.refunded) == (0, [], 0)
    assert len(smtp.handler.received) == 2
    assert [lg.hold(h.id).refunded for h in (a1, a2, busy, b1)] == [3000, 3600, 0, 2700]
    with db.read(lg.engine) as conn:
        rows = conn.execute(select(IN.c.job_id, IN.c.owner, IN.c.refund, IN.c.mailed_to)
                            .order_by(IN.c.charge_id)).all()
    assert [tuple(r) for r in rows] == [
        ("101", "user:alice", 3000, ["alice@hpc.example"]),
        ("102", "user:alice", 3600, ["alice@hpc.example"]),
        ("201", "user:bob", 2700, ["bob@hpc.example"])]


@pytest.mark.smtp
def test_without_user_mail_the_accounts_recipients_get_one_digest(ledger, clock, smtp,
                                                                  tmp_path):
    lg = ledger
    lg.set_report_to("physics", ["lead@physics.example"])
    tok, _ = lg.mint("physics", 100 * H, expires=at(12, 31, year=2027))
    _job(lg, tok, "alice", "101", [_usage(0, 120, 90, 80)], clock)
    _job(lg, tok, "bob", "201", [_usage(0, 120, 90, 80)], clock)
    summary = send_idle(lg, parse({"flag_after_s": 3600}),
                        settings=SmtpSettings.from_section(smtp.settings(tmp_path)))
    assert [o.scope for o in summary.outcomes] == ["account:physics"]
    (msg,) = smtp.handler.to("lead@physics.example")
    assert msg["Subject"] == "Idle GPUs: 2 jobs of account physics, 3.000 raw GPU hours idle"
    assert summary.refunded == 0


def test_the_refund_is_capped_at_what_the_hold_has_refundable(ledger, clock, tmp_path):
    lg = ledger
    tok, _ = lg.mint("physics", 100 * H, expires=at(12, 31, year=2027))
    h = _job(lg, tok, "alice", "101", [_usage(0, 120, 120, 120)], clock)
    nobody = send_idle(lg, parse({"flag_after_s": 60}), settings=None, dry_run=True,
                       out=tmp_path / "eml")
    assert nobody.no_recipients == ["account:physics"] and nobody.outcomes == []
    lg.set_report_to("physics", ["lead@physics.example"])
    lg.refund(h.id, 7000, "a late job: refunded by hand")  # 200 GPU-s left refundable
    summary = send_idle(lg, parse({"flag_after_s": 60, "refund_share": 1}), settings=None,
                        dry_run=True, out=tmp_path / "eml")
    # a dry run moves nothing, and says what a real run would refund: the 200 GPU-s left
    assert summary.refunded == 200 and lg.hold(h.id).refunded == 7000
    assert summary.to_dict()["would_refund"] == 200 and summary.to_dict()["refunded"] == 0
    (eml,) = (tmp_path / "eml").glob("idle-account-physics-*.eml")
    body = message_from_bytes(eml.read_bytes(), policy=email_policy.default)
    plain = " ".join(body.get_body(("plain",)).get_content().split())
    assert "; 0.056 GPU-h would be refunded." in plain and "GPU-h refunded" not in plain
    with pytest.raises(Exception, match="no \\[smtp\\] settings"):
        send_idle(lg, parse({"flag_after_s": 60, "refund_share": 1}), settings=None)
    from reports.idle import record, scan

    policy = parse({"flag_after_s": 60, "refund_share": 1})
    with db.read(lg.engine) as conn:
        flagged = scan(conn, policy, at(1, 1))
    assert record(lg, policy, flagged) == 1
    assert lg.hold(h.id).refunded == 7200 and lg.verify_journal().ok
    with db.read(lg.engine) as conn:
        assert conn.execute(select(IN.c.refund)).scalar() == 200
        assert scan(conn, policy, at(1, 1)) == []
    assert record(lg, policy, flagged) == 0  # a second run with the same list: nothing


def test_flagging_off_is_said():
    with pytest.raises(Exception, match=r"idle flagging is off \(\[idle\] flag_after_s = 0\)"):
        send_idle(None, parse({"flag_after_s": 0}), settings=None)


def test_the_report_shows_idle_gpu_hours_and_their_cost_per_user(ledger, clock):
    from reports.figures import build
    from reports.period import Month
    from reports.render import render_account

    lg = ledger
    tok, _ = lg.mint("physics", 100 * H, expires=at(12, 31, year=2027))
    _job(lg, tok, "alice", "101", [_usage(0, 120, 90, 80), _usage(1, 120, 10, 10)], clock)
    _job(lg, tok, "bob", "201", [_usage(0, 60, 15, 15)], clock)
    with db.read(lg.engine) as conn:
        p = build(conn, Month(2026, 11), clock()).account("physics")
    figures = {u.key: (u.measure.idle_ms, u.measure.idle_cost) for u in p.by_user}
    assert figures == {"alice": (100 * MIN, 6000), "bob": (15 * MIN, 900)}
    r = render_account(p)
    assert {u["key"]: u["idle_cost"] for u in r.json["by_user"]} == {"alice": 6000, "bob": 900}
    idle = r.text[r.text.index("IDLE GPUs BY USER"):]
    line = next(ln for ln in idle.splitlines() if ln.strip().startswith("alice"))
    assert line.split()[-2:] == ["1.667", "1.667"]  # idle raw hours, idle cost GPU-h
    assert "cost 0.250 GPU-h" in r.html  # bob's 900 GPU-s


def test_the_pricing_doc_idle_example_is_what_the_rules_compute():
    import re
    import tomllib
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "pricing.md").read_text()
    section = text[text.index("## Idle GPUs"):]
    policy = parse(tomllib.loads(re.search(r"```idle\n(.*?)```", section, re.DOTALL).group(1)))
    table = re.search(r"\| GPU \|.*?\n\|[-|]+\|\n((?:\|.*\|\n)+)", section).group(1)
    rows = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in table.splitlines()]
    assert len(rows) == 3
    by_job: dict[str, list] = {}
    for i, (gpu_type, held, idle, longest, *_rest) in enumerate(rows):
        by_job.setdefault(gpu_type, []).append(
            (i, _usage(len(by_job.get(gpu_type, [])), int(held), int(idle), int(longest))))
    for gpu_type, items in by_job.items():
        rec = charge_gpus([u for _, u in items], {u["index"]: gpu_type for _, u in items},
                          RATES, RATES[gpu_type], "allocated")
        share = policy.refund_share if policy.flagged(rec) else 0
        for (i, _), g in zip(items, rec.gpus):
            charged, cost, refund = (int(x) for x in rows[i][4:])
            assert (g.charge, idle_cost(g), int(idle_cost(g) * share)) == (charged, cost, refund)
        assert policy.refund(rec) == sum(int(rows[i][6]) for i, _ in items)


def test_the_cli_dry_run_says_would_refund_and_moves_nothing(sqlite_ledger, clock, tmp_path):
    from click.testing import CliRunner

    from slurm_plugin.climain import cli

    lg = sqlite_ledger
    lg.set_report_to("physics", ["lead@physics.example"])
    tok, _ = lg.mint("physics", 100 * H, expires=at(12, 31, year=2027))
    h = _job(lg, tok, "alice", "101", [_usage(0, 120, 90, 80)], clock)
    conf = tmp_path / "gpuledger.toml"
    url = lg.engine.url.render_as_string(hide_password=False)
    conf.write_text(f'[database]\nurl = "{url}"\n[keys]\ndir = "{tmp_path / "keys"}"\n'
                    "[idle]\nflag_after_s = 3600\nrefund_share = 0.5\n")
    args = ["--config", str(conf), "idle", "send", "--dry-run", "--days", "366",
            "--out", str(tmp_path / "eml")]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    # 90 idle minutes of a 2 h h100 job: 1.5 GPU-h idle cost, half of it refunded
    assert r.output.splitlines()[0] == ("1 newly flagged, would refund 0.750 GPU-h (dry run: "
                                        "nothing refunded or recorded)")
    assert lg.hold(h.id).refunded == 0
    r = CliRunner().invoke(cli, [*args, "--json"])
    assert '"would_refund": 2700' in r.output and '"refunded": 0' in r.output
