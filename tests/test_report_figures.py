"""Report figures against the ledger, for a seeded month, on SQLite, PostgreSQL and MariaDB."""

from __future__ import annotations

import json
import zlib
from collections import defaultdict

import pytest
from conftest import Clock
from report_fixtures import CHEMISTRY, PHYSICS, H, at, gpus, seed_month

from ledger import db
from ledger.charge_record import ChargeRecord
from ledger.errors import InvalidInput, NotFound
from ledger.tokens import Scopes
from ledger.views import HoldRequest
from reports.figures import build
from reports.period import Month
from reports.png import read_png_size
from reports.render import render_account, render_site

NOV = Month(2026, 11)
HMS = 3_600_000  # ms in an hour


@pytest.fixture
def clock():
    return Clock(at(10, 1))


@pytest.fixture
def month_site(ledger, clock):
    s = seed_month(ledger, clock)
    with db.read(ledger.engine) as conn:
        site = build(conn, NOV, clock())
    return s, site


def journal_balances(ledger, until_us: int) -> dict[str, int]:
    """Balance per account at a time, independently: the ledger's own journal listing."""
    owners = {}
    for t in ledger.list_tokens():
        owners[f"token:{t.id}"] = t.account
    for name in ("physics", "chemistry"):
        owners[f"account:{name}"] = name
    out = defaultdict(int)
    from datetime import datetime

    for row in ledger.journal():
        ts = datetime.fromisoformat(row["time"].replace("Z", "+00:00"))
        if ts.timestamp() * 1e6 >= until_us or not row["amount"]:
            continue
        if row["from"] in owners:
            out[owners[row["from"]]] -= row["amount"]
        if row["to"] in owners:
            out[owners[row["to"]]] += row["amount"]
    return out


def test_statement_matches_the_ledger(ledger, month_site):
    _, site = month_site
    for name, expected in (("physics", PHYSICS), ("chemistry", CHEMISTRY)):
        st = site.account(name).statement
        got = {k: getattr(st, k) for k in expected}
        assert got == expected, name
        assert st.reconciles()
    opening = journal_balances(ledger, NOV.start_us)
    closing = journal_balances(ledger, NOV.end_us)
    assert site.account("physics").statement.opening == opening["physics"]
    assert site.account("physics").statement.closing == closing["physics"]
    assert site.account("chemistry").statement.closing == closing["chemistry"]
    assert site.account("physics").statement.held_at_end == 12 * H
    assert site.totals.charged == PHYSICS["charged"] + CHEMISTRY["charged"]


def test_token_activity_and_remaining(ledger, month_site):
    s, site = month_site
    p, c = site.account("physics"), site.account("chemistry")
    a = p.activity
    assert (a.minted.count, a.split_internal.count, a.split_out.count) == (0, 1, 1)
    assert (a.split_internal.amount, a.split_out.amount) == (100 * H, 50 * H)
    assert (a.transfer_out.count, a.transfer_out.amount) == (1, 10 * H)
    assert (a.revoked.count, a.revoked.amount) == (1, 90 * H)
    assert (c.activity.split_in.amount, c.activity.transfer_in.amount) == (50 * H, 10 * H)
    assert (c.activity.expired.count, c.activity.expired.amount) == (1, 197 * H)
    tokens = {t.id: t for t in p.tokens}
    t1 = tokens[s.ids["T1"]]
    # 1000 - 6 (Oct) - 150 split - charges 25 + refund 1 - 12 held by the pending job
    assert (t1.remaining, t1.held, t1.status) == (1000 * H - 6 * H - 150 * H - 25 * H + 1 * H
                                                  - 12 * H, 12 * H, "active")
    assert t1.remaining == ledger.inspect(s.ids["T1"]).remaining - 5 * H  # Dec: 5 h returned
    assert tokens[s.ids["T2"]].status == "revoked" and tokens[s.ids["T2"]].remaining == 0
    assert tokens[s.ids["T0"]].expires_soon and tokens[s.ids["T0"]].remaining == 50 * H
    assert {t.id: t.status for t in c.tokens} == {s.ids["C1"]: "expired", s.ids["C2"]: "active"}
    assert [e.id for e in site.expiring] == [s.ids["T0"]]


def test_usage_by_user_and_gpu_type(month_site):
    _, site = month_site
    p = site.account("physics")
    users = {u.key: u for u in p.by_user}
    assert {k: (u.jobs, u.charged, u.returned, u.refunded) for k, u in users.items()} == {
        "alice": (2, 11 * H, 10 * H, 1 * H),  # a1 (+m1 on two nodes); void 3 h, a1 2 h, m1 5 h
        "bob": (3, 10 * H, 8 * H, 0),  # boundary 5/10, b1 3/6, n1 2/2
        "carol": (1, 4 * H, 4 * H, 0),  # untyped: held at the highest rate
    }
    types = {u.key: (u.jobs, u.charged) for u in p.by_gpu_type}
    assert types == {"h100": (4, 18 * H), "a100": (1, 3 * H), "-": (1, 4 * H)}
    assert sum(u.charged for u in p.by_user) == p.statement.charged
    assert p.jobs == 6 and p.settlements == 7


def test_efficiency_and_least_efficient_jobs(month_site):
    _, site = month_site
    p = site.account("physics")
    # measured GPUs: boundary 5h/4h, a1 2x3h/0.3h, b1 5h/4.5h, m1 2x1.5h/0.15h + 2x1h/0.1h
    assert p.measure.held_ms == 21 * HMS
    assert p.measure.busy_ms == int(9.6 * HMS)
    assert p.measure.held_all_ms == 29 * HMS  # + carol's 4 unmeasured GPUs x 2 h
    assert p.measure.unmeasured_charges == 1  # bob's n1 carried no usage
    assert p.measure.efficiency == pytest.approx(9.6 / 21)
    jobs = [(j.job_id, j.held_ms, j.busy_ms, j.gpus) for j in p.worst_jobs]
    assert jobs == [("1001", 6 * HMS, int(0.6 * HMS), 2), ("1006", 5 * HMS, int(0.5 * HMS), 2),
                    ("901", 5 * HMS, 4 * HMS, 1), ("1002", 5 * HMS, int(4.5 * HMS), 1)]
    assert site.account("chemistry").measure.efficiency == pytest.approx(8.2 / 10)


def test_idle_gpu_hours_per_user(month_site):
    """Idle = held − busy of the measured GPUs: alice's a1 (6 h held, 0.6 busy) and m1
    (5 h, 0.5), bob's boundary (5 h, 4) and b1 (5 h, 4.5); carol's GPUs were not measured."""
    _, site = month_site
    p = site.account("physics")
    idle = {u.key: u.measure.idle_ms for u in p.by_user}
    assert idle == {"alice": int(9.9 * HMS), "bob": int(1.5 * HMS), "carol": 0}
    assert sum(idle.values()) == p.measure.held_ms - p.measure.busy_ms
    rendered = render_account(p)
    assert "idle raw hours" in rendered.text and "Idle, raw hours" in rendered.html
    assert {u["key"]: u["idle_ms"] for u in rendered.json["by_user"]} == idle


def test_burn_down_projection_and_month_over_month(month_site):
    s, site = month_site
    p = site.account("physics")
    assert p.series[0] == (NOV.start, PHYSICS["opening"])
    assert p.series[-1] == (NOV.end, PHYSICS["closing"])
    assert len(p.series) == 31
    assert p.series[1][1] == PHYSICS["opening"] + 5 * H  # Nov 1: boundary job returns 5 h
    net = PHYSICS["charged"] - PHYSICS["refunded"]
    proj = p.projection
    assert proj.rate_per_day == net // 30 == 2880  # 0.8 GPU-h a day
    # T0 (50 h) expires on Dec 20 at noon: 19.5 days at 0.8 = 15.6 h used, 34.4 h lost;
    # then T1 (808 h) to 2027-06-30 noon: 192 days = 153.6 h used, 654.4 h lost
    assert proj.main.id == s.ids["T1"] and proj.main.remaining == 808 * H
    assert [(x.token.id, x.amount) for x in proj.losses] == [
        (s.ids["T0"], int(34.4 * H)), (s.ids["T1"], int(654.4 * H))]
    assert proj.run_out is None and not proj.exhausted and not proj.runs_short
    assert proj.spare == int(34.4 * H) + int(654.4 * H)
    assert proj.spendable == (50 + 808) * H and proj.unspendable == 90 * H  # revoked T2
    assert p.previous_charged == 6 * H and p.change == pytest.approx((net - 6 * H) / (6 * H))
    assert site.account("chemistry").previous_charged == 0


def test_a_token_that_expires_soon_is_not_counted_past_its_expiry(sqlite_ledger, clock):
    """300 h expiring in two weeks and a main token of 1000 h: at 10 h a day the first
    loses 160 h when it expires, so the money runs out on 2027-03-25 — not on 2027-04-10,
    as the closing balance over the rate would say — 97 days (13 weeks) before the main
    token expires; 970 h short. The decision line says so in every form."""
    lg = sqlite_ledger
    clock.now = at(11, 1, 0)
    main, main_view = lg.mint("physics", 1300 * H, expires=at(6, 30, 0, year=2027),
                              scopes=Scopes.parse(users="alice,bob"))
    _, soon_view = lg.mint("physics", 300 * H, expires=at(12, 15, 0))
    lg.set_report_to("physics", ["pi@physics.example"])
    hold = lg.reserve(main, HoldRequest(gpus=3, seconds=100 * H, gpu_type="h100",
                                        user="alice"))
    clock.now = at(11, 29)
    lg.post(hold.id, 300 * H)  # 300 GPU-h in November: 10 a day
    clock.now = at(12, 1, 0)
    with db.read(lg.engine) as conn:
        r = build(conn, NOV, clock()).account("physics")
    p = r.projection
    assert (p.rate_per_day, p.main.id, p.main.remaining) == (10 * H, main_view.id, 1000 * H)
    assert p.run_out == at(3, 25, 0, year=2027) and p.runs_short
    assert [(x.token.id, x.amount) for x in p.losses] == [(soon_view.id, 160 * H)]
    assert (p.gap_days, p.short) == (97, 970 * H)
    line = ("Runs out on 2027-03-25, 13 weeks before your main token expires (2027-06-30); "
            "about 970.000 GPU-h short at 10.000 GPU-h/day.")
    rendered = render_account(r)
    assert rendered.json["projection"]["decision"] == line
    assert rendered.json["projection"]["short"] == 970 * H
    assert " ".join(rendered.text.split()).count(line) == 1
    assert line in rendered.html and 'data-figure="decision"' in rendered.html
    assert f"Token {soon_view.id} (any user) expires on 2026-12-15 with about 160.000" \
        in " ".join(rendered.text.split())
    # tokens show their owners, not only their ids
    assert f"Main token {main_view.id} (alice, bob): 1000.000 GPU-h left" in rendered.text
    assert f"{main_view.id} (alice, bob): active, expires 2027-06-30" in rendered.text
    assert "alice, bob · active" in rendered.html
    assert {t["id"]: t["users"] for t in rendered.json["tokens"]} == {
        main_view.id: ["alice", "bob"], soon_view.id: []}
    assert rendered.json["projection"]["main_token"]["users"] == ["alice", "bob"]


def test_single_account_gives_the_same_figures(ledger, month_site):
    _, site = month_site
    with db.read(ledger.engine) as conn:
        one = build(conn, NOV, ledger.clock(), "chemistry")
    assert [r.account for r in one.accounts] == ["chemistry"]
    a, b = one.accounts[0], site.account("chemistry")
    assert a.statement == b.statement
    assert [t.id for t in a.tokens] == [t.id for t in b.tokens]
    assert a.measure == b.measure


def test_month_without_activity_is_a_report(ledger, month_site):
    with db.read(ledger.engine) as conn:
        sep = build(conn, Month(2026, 9), ledger.clock())
        dec = build(conn, Month(2026, 12), ledger.clock())
    r = sep.account("physics")
    assert not r.had_activity and r.statement.opening == r.statement.closing == 0
    rendered = render_account(r)
    assert "No activity in September 2026" in rendered.text
    assert 'data-figure="no-activity"' in rendered.html
    assert dec.account("physics").had_activity  # the pending job settled in December


def test_bad_month_and_unknown_account(ledger, month_site):
    now = ledger.clock()
    for text in ("2026-13", "26-11", "november", "2026-00", ""):
        with pytest.raises(InvalidInput, match="not a month"):
            Month.parse(text, now)
    with pytest.raises(InvalidInput, match="has not started"):
        Month.parse("2027-01", now)
    assert Month.parse("previous", now) == NOV
    with db.read(ledger.engine) as conn, pytest.raises(NotFound, match="unknown account"):
        build(conn, NOV, now, "biology")


def test_rendered_forms_carry_the_figures(month_site):
    _, site = month_site
    p = site.account("physics")
    r = render_account(p, chart_src="cid:x@y")
    for text in (r.text, r.html):
        assert "1034.000" in text and "948.000" in text  # opening, closing (GPU-h)
        assert "25.000" in text and "45.7 %" in text  # charged, efficiency
        assert "2026-12-20" in text  # T0's expiry, ISO
    assert 'src="cid:x@y"' in r.html and 'alt="Balance from 1034.000 GPU-h' in r.html
    data = json.loads(json.dumps(r.json))
    assert data["statement"]["closing"] == PHYSICS["closing"]
    assert data["efficiency"]["ratio"] == round(9.6 / 21, 4)
    width, height = read_png_size(r.chart)
    assert (width, height) == (1280, 600)  # twice the 640 x 300 it is shown at
    assert 'width="640" height="300"' in r.html
    site_r = render_site(site)
    assert "physics" in site_r.text and "chemistry" in site_r.text
    assert site_r.json["totals"]["charged"] == PHYSICS["charged"] + CHEMISTRY["charged"]


def test_names_are_escaped_in_html(sqlite_ledger, clock):
    from sqlalchemy import update

    from ledger.models import Hold

    lg = sqlite_ledger
    clock.now = at(11, 2)
    tok, _ = lg.mint("physics", 10 * H, expires=at(12, 31))
    hold = lg.reserve(tok, HoldRequest(gpus=1, seconds=H, gpu_type="h100", user="eve"))
    # the ledger refuses such a name now (ledger.names); a row written before it may hold one
    with db.write(lg.engine) as conn:
        conn.execute(update(Hold.__table__).where(Hold.__table__.c.id == hold.id)
                     .values(user="<b>eve</b>&co"))
    lg.post(hold.id, H)
    clock.now = at(12, 1)
    with db.read(lg.engine) as conn:
        r = render_account(build(conn, NOV, clock()).account("physics"))
    assert "<b>eve</b>" not in r.html and "&lt;b&gt;eve&lt;/b&gt;&amp;co" in r.html
    assert "<b>eve</b>&co" in r.text


def _figures(usage):
    rec = ChargeRecord.from_dict(usage)
    return None if rec is None else [(g.held_ms, g.busy_ms, g.measured) for g in rec.gpus]


def test_usage_shapes():
    """Rows written before the record had a version still read (ledger.charge_record)."""
    agent = {"job_id": 1, "restart": 0, "gpus": [
        {"index": 0, "held_ms": 1000, "busy_ms": 400, "measured": True},
        {"index": 1, "held_ms": 1000, "busy_ms": 0, "measured": False}]}
    assert _figures(agent) == [(1000, 400, True), (1000, 0, False)]
    policy = {"policy": "measured", "lines": [{"held_ms": 10, "busy_ms": 99, "measured": True}]}
    assert _figures(policy) == [(10, 10, True)]  # busy capped at held
    assert _figures({"usage": agent, "charge": policy}) == _figures(agent)
    assert _figures({"held_ms": 5, "busy_ms": 1, "measured": True}) == [(5, 1, True)]
    assert _figures({"unmeasured": True, "gpus": agent["gpus"]}) == [
        (1000, 0, False), (1000, 0, False)]
    for nothing in (None, {}, {"uncapped_amount": 5}, {"gpus": []}, [], "x",
                    {"gpus": [{"held_ms": -1}]}):
        assert _figures(nothing) is None


def test_png_pixels_decode():
    from reports.chart import LINE, burndown_png

    data = burndown_png([(NOV.start, 100 * H), (NOV.day_start(15), 60 * H)], NOV.start,
                        NOV.end, None)
    assert read_png_size(data) == (1280, 600)
    pos, idat = 8, b""
    while pos < len(data):
        n = int.from_bytes(data[pos:pos + 4], "big")
        if data[pos + 4:pos + 8] == b"IDAT":
            idat += data[pos + 8:pos + 8 + n]
        pos += 12 + n
    raw = zlib.decompress(idat)
    assert len(raw) == 600 * (1280 + 1)
    assert raw.count(bytes([LINE])) > 100  # the balance line is drawn


def test_the_report_shows_what_each_tier_cost(ledger, clock):
    """A charge settled across an off-peak boundary in a cheap partition: the account report
    lists each tier's GPU-hours, summing to what was charged."""
    from ledger.charging import charge_gpus
    from ledger.tiers import Tiers

    clock.now = at(11, 3)
    token, _ = ledger.mint("physics", 10 * H)
    hold = ledger.reserve(token, HoldRequest(gpus=1, seconds=2 * H, gpu_type="h100",
                                             user="alice", partition="scavenger"))
    tiers = Tiers(partition={"scavenger": 250_000}, offpeak=(("22:00-06:00", 500_000),),
                  zone="UTC")
    start = clock.now.replace(hour=21, minute=0).timestamp()
    run_ppm, split = tiers.terms("scavenger", None, start, start + 2 * 3600)
    record = charge_gpus([{"index": 0, "held_ms": 2 * HMS, "measured": False}], {0: "h100"},
                         ledger.rates(), hold.rate_ppm, "allocated", run_ppm=run_ppm,
                         split=split)
    assert record.amount == 900 + 450
    ledger.post(hold.id, record.amount, usage=record)
    with db.read(ledger.engine) as conn:
        report = build(conn, NOV, at(11, 20), account="physics").account("physics")
    assert report.tiered
    assert {u.key: u.charged for u in report.by_tier} == {"standard x0.25": 900,
                                                          "22:00-06:00 x0.125": 450}
    rendered = render_account(report)
    assert "USAGE BY TIER" in rendered.text and "22:00-06:00 x0.125" in rendered.text
    assert 'data-figure="tiers"' in rendered.html
    assert {t["key"] for t in rendered.json["by_tier"]} == {"standard x0.25",
                                                           "22:00-06:00 x0.125"}


def test_text_lines_fit_78_columns_even_with_the_longest_names(sqlite_ledger, clock):
    """The plain-text part of every report keeps to 78 columns: tables wrap a name that
    does not fit its column, sentences wrap at words."""
    from reports.render import TEXT_WIDTH

    lg = sqlite_ledger
    seed_month(lg, clock)
    long_account, long_user = "a" * 60, "u" * 31 + "@" + "d" * 32  # longest names allowed
    clock.now = at(11, 10)
    lg.create_account(long_account)
    tok, _ = lg.mint(long_account, 100 * H, expires=at(12, 10),
                     scopes=Scopes.parse(users=f"{long_user},alice,bob,carol,dave,erin"))
    hold = lg.reserve(tok, HoldRequest(gpus=2, seconds=2 * H, gpu_type="h100", user=long_user),
                      job_id="4294967294_4000")
    lg.post(hold.id, 3 * H, usage=gpus((2, 0.5), (2, 0.1)))
    clock.now = at(12, 5)
    with db.read(lg.engine) as conn:
        site = build(conn, NOV, clock())
    texts = {r.account: render_account(r).text for r in site.accounts}
    texts["site"] = render_site(site).text
    for name, text in texts.items():
        long = [ln for ln in text.splitlines() if len(ln) > TEXT_WIDTH]
        assert long == [], (name, long)
    mine = texts[long_account]
    assert long_user in mine and "4294967294_4000" in mine
    assert f"(alice, bob, carol, dave, erin, {long_user})" in " ".join(mine.split())


def _pixels(data: bytes) -> tuple[int, int, bytes]:
    width, height = read_png_size(data)
    pos, idat = 8, b""
    while pos < len(data):
        n = int.from_bytes(data[pos:pos + 4], "big")
        if data[pos + 4:pos + 8] == b"IDAT":
            idat += data[pos + 8:pos + 8 + n]
        pos += 12 + n
    raw = zlib.decompress(idat)
    rows = b"".join(raw[y * (width + 1) + 1:(y + 1) * (width + 1)] for y in range(height))
    return width, height, rows


def test_chart_marks_the_run_out_and_the_main_tokens_expiry_with_a_legend():
    """Drawn at twice its size: the legend (one entry per mark), the projection dropping
    where a token expires with GPU-h left, the run-out dot and the main token's expiry."""
    from datetime import timedelta

    from reports.chart import EXPIRY, LEFT, PROJ, RED, SCALE, TOP, burndown_png, legend_items
    from reports.projection import Spendable, project

    soon = Spendable("tok_soon", (), 40 * H, NOV.end + timedelta(days=5))
    main = Spendable("tok_main", ("alice",), 100 * H, NOV.end + timedelta(days=60))
    p = project([soon, main], 4 * H, NOV.end)
    assert p.losses[0].amount == 20 * H and p.run_out == NOV.end + timedelta(days=30)
    assert p.horizon == main.expires and p.short == 120 * H
    labels = [label for _, _, label in legend_items(p)]
    assert labels == ["Balance", "Projection at 4.000 GPU-h/day", "Runs out 2026-12-31",
                      "Main token expires 2027-01-30"]
    series = [(NOV.day_start(d), (200 - 2 * d) * H) for d in range(1, 31)] + [(NOV.end, 140 * H)]
    width, height, px = _pixels(burndown_png(series, NOV.start, NOV.end, p))
    assert (width, height) == (1280, 600)
    legend = px[:TOP * SCALE * width]
    plot = px[TOP * SCALE * width:]
    for colour in (PROJ, RED, EXPIRY):
        assert colour in legend and colour in plot, colour
    # the expiry line is one column pair of the plot: every few rows carry it
    cols = {i % width for i in range(len(plot)) if plot[i] == EXPIRY}
    assert max(cols) - min(cols) <= 4 and min(cols) > LEFT * SCALE
