"""Reports sent to a real SMTP server on loopback (aiosmtpd with STARTTLS and AUTH)."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import Clock
from report_fixtures import CHEMISTRY, PHYSICS, H, SmtpServer, at, seed_month

from ledger.errors import ConfigError
from reports import sendlog
from reports.deliver import send_reports
from reports.mail import MailError, SmtpSettings
from reports.period import Month
from reports.png import read_png_size
from slurm_plugin.climain import cli

pytestmark = pytest.mark.smtp
NOV = Month(2026, 11)
ADMIN = "ops@hpc.example"
PHYS = ["lead@physics.example", "pi@physics.example"]
CHEM = ["head@chem.example"]


@pytest.fixture
def clock():
    return Clock(at(10, 1))


@pytest.fixture
def smtp(tmp_path):
    with SmtpServer(tmp_path) as server:
        yield server


def settings(server, tmp_path, **over) -> SmtpSettings:
    return SmtpSettings.from_section(server.settings(tmp_path, **over))


def send(lg, server, tmp_path, **kw):
    return send_reports(lg, NOV, settings=settings(server, tmp_path), admins=[ADMIN], **kw)


def parts(msg):
    """(text, html, png, png content id) of a report message, checking its structure."""
    assert msg.get_content_type() == "multipart/alternative"
    plain, related = msg.get_payload()
    assert plain.get_content_type() == "text/plain"
    assert related.get_content_type() == "multipart/related"
    html, image = related.get_payload()
    assert html.get_content_type() == "text/html"
    assert image.get_content_type() == "image/png"
    assert image.get_content_disposition() == "inline"
    return plain.get_content(), html.get_content(), image.get_content(), image["Content-ID"]


def test_reports_arrive_with_headers_parts_and_figures(ledger, clock, smtp, tmp_path):
    seed_month(ledger, clock)
    summary = send(ledger, smtp, tmp_path)
    assert summary.failures == 0 and summary.no_recipients == []
    got = smtp.handler
    assert sorted(r for m in got.received for r in m.rcpt_tos) == sorted(PHYS + CHEM + [ADMIN])
    assert all(m.mail_from == "gpuledger@hpc.example" for m in got.received)
    (msg,) = got.to(PHYS[0])
    assert got.to(PHYS[1]) == [msg]  # one message, both recipients
    assert msg["Subject"] == "GPU budget 2026-11: physics — 948.000 GPU-h left"
    assert msg["From"] == "gpuledger@hpc.example"
    assert msg["To"] == ", ".join(PHYS)
    assert msg["Auto-Submitted"] == "auto-generated"
    assert re.fullmatch(r"<gpuledger\.report\.2026-11\.[0-9a-f]{16}@hpc\.example>",
                        msg["Message-ID"])
    assert msg["Date"]
    text, html, png, cid = parts(msg)
    assert read_png_size(png) == (1280, 600)
    assert f'src="cid:{cid.strip("<>")}"' in html
    for body in (text, html):
        assert f"{PHYSICS['opening'] // H}.000" in body  # 1034.000
        assert f"{PHYSICS['closing'] // H}.000" in body  # 948.000
        assert "25.000" in body and "60.000" in body and "45.7 %" in body
        assert "2026-12-20" in body and "1001" in body  # expiring token, least efficient job
    (chem,) = got.to(CHEM[0])
    text, html, _, _ = parts(chem)
    assert f"{CHEMISTRY['expired'] // H}.000" in text and "82.0 %" in text
    (site,) = got.to(ADMIN)
    assert site.get_content_type() == "multipart/alternative"
    plain, html_part = site.get_payload()
    assert "35.000" in plain.get_content() and "57.4 %" in plain.get_content()
    assert html_part.get_content_type() == "text/html"
    log = sendlog.entries(ledger.engine, "2026-11")
    assert {(r.scope, r.recipient, r.status) for r in log} == {
        ("physics", PHYS[0], "sent"), ("physics", PHYS[1], "sent"),
        ("chemistry", CHEM[0], "sent"), ("*site*", ADMIN, "sent")}
    # the same command again sends nothing
    again = send(ledger, smtp, tmp_path)
    assert len(got.received) == 3
    assert sum(len(o.already) for o in again.outcomes) == 4 and not any(
        o.sent for o in again.outcomes)


def test_resend_after_failure_halfway_sends_no_duplicate(ledger, clock, smtp, tmp_path):
    seed_month(ledger, clock)
    smtp.handler.fail_after = 1  # the first message is accepted, then the server fails
    first = send(ledger, smtp, tmp_path)
    assert len(smtp.handler.received) == 1
    assert first.failures == 3 and all("451" in e for o in first.outcomes
                                       for e in o.failed.values())
    smtp.handler.fail_after = None
    second = send(ledger, smtp, tmp_path)
    assert second.failures == 0
    everyone = PHYS + CHEM + [ADMIN]
    counts = {r: len(smtp.handler.to(r)) for r in everyone}
    assert counts == dict.fromkeys(everyone, 1)
    assert {r.status for r in sendlog.entries(ledger.engine, "2026-11")} == {"sent"}
    attempts = {r.recipient: r.attempts for r in sendlog.entries(ledger.engine, "2026-11")}
    assert sorted(attempts.values()) == [1, 2, 2, 2]


def test_refused_recipient_is_reported_and_retried_alone(sqlite_ledger, clock, smtp, tmp_path):
    seed_month(sqlite_ledger, clock)
    smtp.handler.refuse = {PHYS[1]}
    first = send(sqlite_ledger, smtp, tmp_path, account="physics")
    (outcome,) = first.outcomes
    assert outcome.sent == [PHYS[0]] and list(outcome.failed) == [PHYS[1]]
    assert outcome.failed[PHYS[1]].startswith("550")
    smtp.handler.refuse = set()
    second = send(sqlite_ledger, smtp, tmp_path, account="physics")
    assert second.outcomes[0].sent == [PHYS[1]] and second.outcomes[0].already == [PHYS[0]]
    assert [len(smtp.handler.to(r)) for r in PHYS] == [1, 1]
    assert not smtp.handler.to(ADMIN)  # one account: no site summary


def _nothing_marked(lg):
    assert sendlog.entries(lg.engine, "2026-11") == []


def test_bad_credentials(sqlite_ledger, clock, smtp, tmp_path):
    seed_month(sqlite_ledger, clock)
    (tmp_path / "wrong").write_text("nope\n")
    s = SmtpSettings.from_section(smtp.settings(tmp_path, password_file=str(tmp_path / "wrong")))
    with pytest.raises(MailError, match="rejected the credentials of user 'mailer': 535"):
        send_reports(sqlite_ledger, NOV, settings=s)
    _nothing_marked(sqlite_ledger)
    assert smtp.handler.received == []


def test_untrusted_certificate_is_a_tls_failure(sqlite_ledger, clock, smtp, tmp_path):
    seed_month(sqlite_ledger, clock)
    s = SmtpSettings.from_section({k: v for k, v in smtp.settings(tmp_path).items()
                                   if k != "ca_file"})
    with pytest.raises(MailError, match="TLS with SMTP server .* certificate not trusted"):
        send_reports(sqlite_ledger, NOV, settings=s)
    _nothing_marked(sqlite_ledger)


def test_plain_session_is_refused(sqlite_ledger, clock, smtp, tmp_path):
    seed_month(sqlite_ledger, clock)
    raw = smtp.settings(tmp_path, security="none")
    raw.pop("user")
    with pytest.raises(MailError, match="refused|530"):
        send_reports(sqlite_ledger, NOV, settings=SmtpSettings.from_section(raw))
    _nothing_marked(sqlite_ledger)


def test_connection_refused(sqlite_ledger, clock, tmp_path):
    seed_month(sqlite_ledger, clock)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = {"host": "127.0.0.1", "port": port, "security": "none", "from": "g@x.example",
           "timeout": 5}
    with pytest.raises(MailError, match=f"cannot talk to SMTP server 127.0.0.1:{port}"):
        send_reports(sqlite_ledger, NOV, settings=SmtpSettings.from_section(cfg))
    _nothing_marked(sqlite_ledger)


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
def test_implicit_tls(sqlite_ledger, clock, tmp_path):
    seed_month(sqlite_ledger, clock)
    with SmtpServer(tmp_path, implicit_tls=True) as server:
        s = SmtpSettings.from_section(server.settings(tmp_path, security="ssl"))
        summary = send_reports(sqlite_ledger, NOV, settings=s, account="chemistry")
        assert summary.failures == 0 and len(server.handler.to(CHEM[0])) == 1


def test_settings_validation(tmp_path):
    base = {"host": "h", "from": "a@b.example"}
    assert SmtpSettings.from_section(base).port == 587
    assert SmtpSettings.from_section({**base, "security": "ssl"}).port == 465
    for bad, why in (({"from": "a@b"}, "host is required"),
                     ({**base, "security": "tls"}, "security must be"),
                     ({**base, "from": "nobody"}, "from must be"),
                     ({**base, "user": "u"}, "password_file is not"),
                     ({**base, "password_file": str(tmp_path / "missing")}, "cannot read"),
                     ({**base, "port": "25"}, "wrong type")):
        with pytest.raises(ConfigError, match=why):
            SmtpSettings.from_section(bad)


def write_config(tmp_path: Path, db_url: str, smtp_section: dict | None) -> Path:
    lines = ["[database]", f'url = "{db_url}"', "[keys]", f'dir = "{tmp_path / "keys"}"',
             "[reports]", f'admins = ["{ADMIN}"]']
    if smtp_section:
        lines.append("[smtp]")
        for k, v in smtp_section.items():
            lines.append(f"{k} = {v}" if isinstance(v, int) else f'{k} = "{v}"')
    path = tmp_path / "gpuledger.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_cli_send_dry_run_and_errors(sqlite_ledger, clock, smtp, tmp_path):
    seed_month(sqlite_ledger, clock)
    url = sqlite_ledger.engine.url.render_as_string(hide_password=False)
    conf = write_config(tmp_path, url, smtp.settings(tmp_path))
    run = CliRunner().invoke
    out = tmp_path / "eml"
    res = run(cli, ["--config", str(conf), "report", "send", "--month", "2026-11",
                    "--dry-run", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == [
        "chemistry-2026-11.eml", "physics-2026-11.eml", "site-2026-11.eml"]
    assert smtp.handler.received == [] and sendlog.entries(sqlite_ledger.engine, "2026-11") == []
    from email import message_from_bytes, policy

    eml = message_from_bytes((out / "physics-2026-11.eml").read_bytes(), policy=policy.default)
    assert parts(eml)[0].count("948.000") >= 1
    res = run(cli, ["--config", str(conf), "report", "send", "--month", "2026-11", "--json"])
    assert res.exit_code == 0, res.output
    assert '"sent": 4' in res.output
    bad = write_config(tmp_path, url, {**smtp.settings(tmp_path), "password_file":
                                       str(tmp_path / "smtp.crt")})
    res = run(cli, ["--config", str(bad), "report", "send", "--month", "2026-10"])
    assert res.exit_code == 1
    assert "Error: SMTP server 127.0.0.1" in res.output and "rejected the credentials" in res.output
    res = run(cli, ["--config", str(conf), "report", "send", "--month", "2026-1"])
    assert res.exit_code == 1 and "Error: not a month: '2026-1'" in res.output
    res = run(cli, ["--config", str(conf), "report", "render", "--month", "2026-11",
                    "--account", "nope"])
    assert res.exit_code == 1 and "Error: unknown account 'nope'" in res.output
    res = run(cli, ["--config", str(conf), "report", "log", "--month", "2026-11"])
    assert res.exit_code == 0 and res.output.count(" sent ") == 4


def test_a_recipient_of_several_reports_gets_them_in_one_mail(ledger, clock, smtp, tmp_path):
    """A PI of both accounts who is also an admin: one message with both reports (each chart
    inline under its own content id) and the site summary; the send log has a row per report,
    so a re-run sends nothing and the others still get theirs alone."""
    seed_month(ledger, clock)
    both = "pi@hpc.example"
    ledger.set_report_to("physics", [*PHYS, both])
    ledger.set_report_to("chemistry", [*CHEM, both])
    summary = send_reports(ledger, NOV, settings=settings(smtp, tmp_path), admins=[both, ADMIN])
    assert summary.failures == 0
    (msg,) = smtp.handler.to(both)
    assert msg["Subject"].strip() == ("GPU budget 2026-11: 2 accounts — chemistry 50.000, "
                                      "physics 948.000 GPU-h left — and the site summary")
    assert msg["To"] == both
    plain, related = msg.get_payload()
    html, *images = related.get_payload()
    assert len(images) == 2 and all(i.get_content_type() == "image/png" for i in images)
    body = html.get_content()
    for image in images:
        assert read_png_size(image.get_content()) == (1280, 600)
        assert f'src="cid:{image["Content-ID"].strip("<>")}"' in body
    text = plain.get_content()
    assert all(len(line) <= 78 for line in text.splitlines())
    for needle in ("account chemistry", "account physics", "GPU site summary", "948.000",
                   f"{CHEMISTRY['expired'] // H}.000"):
        assert needle in text and needle.split()[-1] in body
    assert [m["Subject"] for m in smtp.handler.to(PHYS[0])] == [
        "GPU budget 2026-11: physics — 948.000 GPU-h left"]
    assert len(smtp.handler.to(CHEM[0])) == len(smtp.handler.to(ADMIN)) == 1
    log = {(r.scope, r.recipient) for r in sendlog.entries(ledger.engine, "2026-11")
           if r.status == "sent"}
    assert {("physics", both), ("chemistry", both), ("*site*", both)} <= log
    again = send_reports(ledger, NOV, settings=settings(smtp, tmp_path), admins=[both, ADMIN])
    assert not any(o.sent for o in again.outcomes) and len(smtp.handler.to(both)) == 1
