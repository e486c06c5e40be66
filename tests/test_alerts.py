"""Threshold alerts: once per threshold per token (and account), as a digest, per recipient."""

from __future__ import annotations

from email import message_from_bytes, policy

import pytest
from conftest import Clock
from report_fixtures import H, SmtpServer, at
from sqlalchemy import select

from ledger import db
from ledger.config import ReportsSection
from ledger.tokens import Scopes
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


def use(lg, token, hours, clock, user="alice"):
    clock.advance(hours=1)
    hold = lg.reserve(token, HoldRequest(gpus=1, seconds=hours * H, gpu_type="h100",
                                         user=user))
    lg.post(hold.id, hours * H)


def bodies(server, rcpt):
    """The text parts (wrapped at 78 columns, so joined here into one line of words)."""
    out = []
    for m in server.handler.to(rcpt):
        text = m.get_body(("plain",)).get_content()
        assert all(len(line) <= 78 for line in text.splitlines()), text
        out.append(" ".join(text.split()))
    return out


EVERY_RUN = ReportsSection(alert_digest_s=0)


def test_thresholds_go_once_each_as_one_digest(ledger, clock, smtp, tmp_path):
    lg = ledger
    lg.set_report_to("physics", TO)
    tok, view = lg.mint("physics", 100 * H, expires=at(6, 30, year=2027))
    _, short = lg.mint("physics", 10 * H, expires=at(11, 20))
    s = SmtpSettings.from_section(smtp.settings(tmp_path))

    use(lg, tok, 85, clock)
    first = send_alerts(lg, settings=s, rules=EVERY_RUN)
    assert first.raised == 2 and first.failures == 0  # token 80 %, short token expiry
    assert [len(smtp.handler.to(r)) for r in TO] == [1, 1]
    (text,) = bodies(smtp, TO[0])
    assert (f"Token {view.id} (any user) has used 85.0 % of 100.000 GPU-h (crossed 80 %); "
            "15.000") in text
    assert (f"Token {short.id} (any user) expires in 19 days, on 2026-11-20, with 10.000 GPU-h "
            "left: use them, or ask your GPU administrator to transfer them") in text
    # the advice names who runs splits and transfers: not the PI
    assert "Splits and transfers between tokens and accounts are run by your GPU " \
        "administrator, not by you" in text
    msg = smtp.handler.to(TO[0])[0]
    assert msg["Subject"] == "GPU budget alert for physics: 80 % used and 1 more"
    assert msg.get_content_type() == "multipart/alternative"

    again = send_alerts(lg, settings=s, rules=EVERY_RUN)
    assert again.raised == 0 and again.outcomes == []
    assert len(smtp.handler.received) == 1

    use(lg, tok, 7, clock)  # 92 %; the account is at 92 / 110 = 83.6 %
    third = send_alerts(lg, settings=s, rules=EVERY_RUN)
    assert third.raised == 2
    text = bodies(smtp, TO[0])[-1]
    assert "has used 92.0 % of 100.000 GPU-h (crossed 90 %)" in text
    assert "Account physics (all active tokens) has used 83.6 % of 110.000 GPU-h" in text
    assert "expires in" not in text and "crossed 80 %); 8.000" not in text

    use(lg, tok, 8, clock)  # 100 % in one step from 92 %
    send_alerts(lg, settings=s, rules=EVERY_RUN)
    text = bodies(smtp, TO[0])[-1]
    assert ("has used 100.0 % of 100.000 GPU-h (crossed 100 %); 0.000 GPU-h left. Jobs that "
            "need it are refused: ask your GPU administrator for GPU-hours") in text
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
    second = send_alerts(lg, settings=s)  # TO[1] never had one: the day's limit spares it
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


def test_a_tokens_users_are_named_and_mailed_with_the_pi(sqlite_ledger, clock, smtp, tmp_path):
    """A token scoped to users: its alerts name them and go to them (``[idle] user_mail``)
    as well as to the account's recipients; the account-wide alert goes to the PI only."""
    lg = sqlite_ledger
    lg.set_report_to("physics", [TO[0]])
    tok, view = lg.mint("physics", 10 * H, expires=at(6, 30, year=2027),
                        scopes=Scopes.parse(users="alice,bob"))
    use(lg, tok, 9, clock)
    s = SmtpSettings.from_section(smtp.settings(tmp_path))
    summary = send_alerts(lg, settings=s, user_mail="{user}@hpc.example")
    assert summary.failures == 0
    (pi,) = bodies(smtp, TO[0])
    (alice,) = bodies(smtp, "alice@hpc.example")
    (bob,) = bodies(smtp, "bob@hpc.example")
    line = f"Token {view.id} (alice, bob) has used 90.0 % of 10.000 GPU-h (crossed 90 %)"
    assert line in pi and line in alice and alice == bob
    assert "Account physics (all active tokens)" in pi and "all active tokens" not in alice
    assert len(smtp.handler.received) == 2  # the PI's digest, and the users' one
    # without a user_mail pattern only the PI is told
    tok2, _ = lg.mint("physics", 10 * H, expires=at(6, 30, year=2027),
                      scopes=Scopes.parse(users="carol"))
    use(lg, tok2, 10, clock, user="carol")
    clock.advance(days=1)
    send_alerts(lg, settings=s)
    assert not smtp.handler.to("carol@hpc.example") and len(smtp.handler.to(TO[0])) == 2


def test_expiry_reminders_and_thresholds_come_from_the_config(sqlite_ledger, clock, smtp,
                                                               tmp_path):
    """Reminders 30 / 14 / 7 / 0 days before a token with GPU-h left expires, each once;
    and other thresholds and days where [reports] sets them."""
    lg = sqlite_ledger
    lg.set_report_to("physics", TO)
    _, view = lg.mint("physics", 10 * H, expires=at(12, 31, 18))
    s = SmtpSettings.from_section(smtp.settings(tmp_path))
    sent = []
    for day in (1, 2, 17, 20, 24, 25, 30, 31):  # Dec 1 is 30 days before, Dec 31 the day
        clock.now = at(12, day, 8)
        before = len(smtp.handler.to(TO[0]))
        send_alerts(lg, settings=s)
        if len(smtp.handler.to(TO[0])) > before:
            sent.append((day, bodies(smtp, TO[0])[-1]))
    assert [d for d, _ in sent] == [1, 17, 24, 31]
    assert "expires in 30 days, on 2026-12-31" in sent[0][1]
    assert "expires in 14 days" in sent[1][1] and "expires in 7 days" in sent[2][1]
    assert f"Token {view.id} (any user) expires today, on 2026-12-31" in sent[3][1]

    rules = ReportsSection(alert_thresholds=(50,), expiry_reminders=(3,), alert_digest_s=0)
    tok, other = lg.mint("chemistry", 10 * H, expires=at(1, 10, 8, year=2027))
    with db.read(lg.engine) as conn:
        assert evaluate(conn, clock(), "chemistry", rules) == []
    use(lg, tok, 5, clock)
    with db.read(lg.engine) as conn:
        got = {(c.subject, c.kind, c.threshold) for c in evaluate(conn, clock(), "chemistry",
                                                                  rules)}
    assert got == {(other.id, "used", 50), ("account", "used", 50)}
    clock.now = at(1, 7, 9, year=2027)
    with db.read(lg.engine) as conn:
        got = {(c.subject, c.kind, c.threshold) for c in evaluate(conn, clock(), "chemistry",
                                                                  rules)}
    assert (other.id, "expiry", 3) in got


def test_one_digest_per_recipient_across_accounts_and_per_day(sqlite_ledger, clock, smtp,
                                                              tmp_path):
    """A PI of two accounts gets one mail with both; a threshold crossed later the same day
    waits for the first run a day after their last digest, then comes alone."""
    lg = sqlite_ledger
    lg.set_report_to("physics", ["pi@hpc.example", TO[0]])
    lg.set_report_to("chemistry", ["pi@hpc.example"])
    ptok, _ = lg.mint("physics", 10 * H, expires=at(6, 30, year=2027))
    ctok, _ = lg.mint("chemistry", 10 * H, expires=at(6, 30, year=2027))
    use(lg, ptok, 8, clock)
    use(lg, ctok, 8, clock)
    s = SmtpSettings.from_section(smtp.settings(tmp_path))
    first = send_alerts(lg, settings=s)
    (msg,) = smtp.handler.to("pi@hpc.example")
    assert msg["Subject"].strip() == ("GPU budget alerts for 2 accounts (chemistry, physics): "
                                      "80 % used and 3 more")
    (text,) = bodies(smtp, "pi@hpc.example")
    assert "ACCOUNT chemistry" in text and "ACCOUNT physics" in text
    (lead,) = bodies(smtp, TO[0])
    assert "physics" in lead and "chemistry" not in lead
    assert len(smtp.handler.received) == 2 and first.failures == 0

    use(lg, ptok, 1, clock)  # 90 % an hour later: both had a digest today, it waits
    second = send_alerts(lg, settings=s)
    assert second.raised == 2 and second.outcomes == []
    assert second.waiting == sorted(["pi@hpc.example", TO[0]])
    clock.advance(hours=22)  # 23 h after the first digest
    assert send_alerts(lg, settings=s).waiting == sorted(["pi@hpc.example", TO[0]])
    clock.advance(hours=2)
    third = send_alerts(lg, settings=s)
    assert third.waiting == [] and len(smtp.handler.to("pi@hpc.example")) == 2
    text = bodies(smtp, "pi@hpc.example")[-1]
    assert "crossed 90 %" in text and "chemistry" not in text


def test_the_cli_reads_thresholds_and_user_mail_from_the_config(sqlite_ledger, clock, tmp_path):
    from click.testing import CliRunner

    from slurm_plugin.climain import cli

    lg = sqlite_ledger
    lg.set_report_to("physics", [TO[0]])
    tok, view = lg.mint("physics", 10 * H, expires=at(6, 30, year=2027),
                        scopes=Scopes.parse(users="alice"))
    use(lg, tok, 6, clock)  # 60 %: under the default 80, over a configured 50
    conf = tmp_path / "gpuledger.toml"
    url = lg.engine.url.render_as_string(hide_password=False)
    conf.write_text(f'[database]\nurl = "{url}"\n[keys]\ndir = "{tmp_path / "keys"}"\n'
                    '[idle]\nuser_mail = "{user}@hpc.example"\n'
                    "[reports]\nalert_thresholds = [50]\n")
    out = tmp_path / "eml"
    r = CliRunner().invoke(cli, ["--config", str(conf), "alerts", "send", "--dry-run",
                                 "--out", str(out)])
    assert r.exit_code == 0, r.output
    emls = sorted(out.iterdir())
    got = {}
    for eml in emls:
        msg = message_from_bytes(eml.read_bytes(), policy=policy.default)
        got[msg["To"]] = " ".join(msg.get_body(("plain",)).get_content().split())
    assert set(got) == {TO[0], "alice@hpc.example"}
    assert f"Token {view.id} (alice) has used 60.0 % of 10.000 GPU-h (crossed 50 %)" \
        in got["alice@hpc.example"]
    r = CliRunner().invoke(cli, ["--config", str(conf), "alerts", "list", "--json"])
    assert r.exit_code == 0 and '"threshold": 50' in r.output and '"threshold": 80' not in r.output
