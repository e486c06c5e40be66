"""Threshold alerts: once per threshold per token (and account), as a digest, per recipient."""

from __future__ import annotations

from email import message_from_bytes, policy

import pytest
from conftest import Clock
from report_fixtures import H, SmtpServer, at
from sqlalchemy import select

from ledger import db
from ledger.views import HoldRequest
from reports.alerts import AL, evaluate, send_alerts
from reports.mail import SmtpSettings

pytestmark = pytest.mark.smtp
TO = ["lead@physics.example", "pi@physics.example"]


@pytest.fixture
def clock():
    return Clock(at(11, 1))


@pytest.fixture
def smtp(tmp_path):
    with SmtpServer(tmp_path) as server:
        yield server


def use(lg, token, hours, clock):
    clock.advance(hours=1)
    hold = lg.reserve(token, HoldRequest(gpus=1, seconds=hours * H, gpu_type="h100",
                                         user="alice"))
    lg.post(hold.id, hours * H)


def bodies(server, rcpt):
    return [m.get_body(("plain",)).get_content() for m in server.handler.to(rcpt)]


def test_thresholds_go_once_each_as_one_digest(ledger, clock, smtp, tmp_path):
    lg = ledger
    lg.set_report_to("physics", TO)
    tok, view = lg.mint("physics", 100 * H, expires=at(6, 30, year=2027))
    _, short = lg.mint("physics", 10 * H, expires=at(11, 20))
    s = SmtpSettings.from_section(smtp.settings(tmp_path))

    use(lg, tok, 85, clock)
    first = send_alerts(lg, settings=s)
    assert first.raised == 2 and first.failures == 0  # token 80 %, short token expiry
    assert [len(smtp.handler.to(r)) for r in TO] == [1, 1]
    (text,) = bodies(smtp, TO[0])
    assert f"Token {view.id} has used 85.0 % of 100.000 GPU-h (crossed 80 %); 15.000" in text
    assert f"Token {short.id} expires on 2026-11-20 with 10.000 GPU-h left." in text
    msg = smtp.handler.to(TO[0])[0]
    assert msg["Subject"] == "GPU budget alert for physics: 80 % used and 1 more"
    assert msg.get_content_type() == "multipart/alternative"

    again = send_alerts(lg, settings=s)
    assert again.raised == 0 and again.outcomes == []
    assert len(smtp.handler.received) == 1

    use(lg, tok, 7, clock)  # 92 %; the account is at 92 / 110 = 83.6 %
    third = send_alerts(lg, settings=s)
    assert third.raised == 2
    text = bodies(smtp, TO[0])[-1]
    assert "has used 92.0 % of 100.000 GPU-h (crossed 90 %)" in text
    assert "Account physics (all active tokens) has used 83.6 % of 110.000 GPU-h" in text
    assert "expires on" not in text and "crossed 80 %); 8.000" not in text

    use(lg, tok, 8, clock)  # 100 % in one step from 92 %
    send_alerts(lg, settings=s)
    text = bodies(smtp, TO[0])[-1]
    assert "has used 100.0 % of 100.000 GPU-h (crossed 100 %); 0.000 GPU-h left." in text
    assert "Account physics (all active tokens) has used 90.9 %" in text
    assert len(smtp.handler.to(TO[0])) == len(smtp.handler.to(TO[1])) == 3
    with db.read(lg.engine) as conn:
        raised = conn.execute(select(AL.c.subject, AL.c.kind, AL.c.threshold)
                              .order_by(AL.c.id)).all()
    assert sorted(tuple(r) for r in raised) == sorted([
        (view.id, "used", 80), (short.id, "expiry", 30), (view.id, "used", 90),
        ("account", "used", 80), (view.id, "used", 100), ("account", "used", 90)])


def test_failed_recipient_gets_it_on_the_next_run_only(sqlite_ledger, clock, smtp, tmp_path):
    lg = sqlite_ledger
    lg.set_report_to("physics", TO)
    tok, _ = lg.mint("physics", 10 * H, expires=at(6, 30, year=2027))
    use(lg, tok, 9, clock)
    s = SmtpSettings.from_section(smtp.settings(tmp_path))
    smtp.handler.refuse = {TO[1]}
    first = send_alerts(lg, settings=s)
    assert first.outcomes[0].sent == [TO[0]] and list(first.outcomes[0].failed) == [TO[1]]
    smtp.handler.refuse = set()
    second = send_alerts(lg, settings=s)
    assert second.raised == 0 and second.outcomes[0].sent == [TO[1]]
    assert [len(smtp.handler.to(r)) for r in TO] == [1, 1]
    assert send_alerts(lg, settings=s).outcomes == []


def test_dry_run_records_nothing(sqlite_ledger, clock, tmp_path):
    lg = sqlite_ledger
    lg.set_report_to("chemistry", ["head@chem.example"])
    tok, _ = lg.mint("chemistry", 10 * H, expires=at(6, 30, year=2027))
    use(lg, tok, 10, clock)
    out = tmp_path / "eml"
    summary = send_alerts(lg, settings=None, dry_run=True, out=out)
    assert summary.raised == 0 and len(summary.outcomes) == 1
    (eml,) = out.iterdir()
    msg = message_from_bytes(eml.read_bytes(), policy=policy.default)
    assert "crossed 100 %" in msg.get_body(("plain",)).get_content()
    with db.read(lg.engine) as conn:
        assert conn.execute(select(AL.c.id)).all() == []


def test_splits_out_are_not_use_and_closed_tokens_are_ignored(sqlite_ledger, clock):
    lg = sqlite_ledger
    tok, view = lg.mint("physics", 100 * H, expires=at(6, 30, year=2027))
    lg.split(tok, 90 * H, account="chemistry")  # 10 h left, nothing used
    with db.read(lg.engine) as conn:
        assert evaluate(conn, clock()) == []
    use(lg, tok, 8, clock)  # 8 of the 10 h it kept: 80 %
    with db.read(lg.engine) as conn:
        got = {(c.subject, c.threshold) for c in evaluate(conn, clock())}
    assert got == {(view.id, 80)} | {("account", 80)}
    lg.revoke(tok, reason="done")
    with db.read(lg.engine) as conn:
        assert evaluate(conn, clock()) == []
