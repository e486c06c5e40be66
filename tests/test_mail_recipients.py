"""Hostile names and recipients in mail, on a real SMTP server (aiosmtpd on loopback).

The ledger refuses such names where they enter (tests/test_scope_names.py); rows written
before that rule may still hold them, so these tests write them into the database directly.
Addresses are parsed and built with the header registry: a name or recipient that does not
make one plain address is skipped and reported, and every other recipient gets its mail —
idle digests, monthly reports and budget alerts alike."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import Clock
from report_fixtures import H, SmtpServer, at, seed_month
from sqlalchemy import select, update

from ledger import db
from ledger.charging import charge_gpus
from ledger.idle import parse
from ledger.models import Account, Hold
from ledger.views import HoldRequest
from reports import sendlog
from reports.alerts import send_alerts
from reports.deliver import send_reports
from reports.idle import IN, send_idle
from reports.mail import BadAddress, SmtpSettings, mail_address, user_address
from reports.period import Month
from slurm_plugin.climain import cli

pytestmark = pytest.mark.smtp
A, HO = Account.__table__, Hold.__table__
MIN = 60_000
CRLF_NAME = "dave\r\nBcc: y@hpc.example"
CRLF_RCPT = "evil@physics.example\r\nBcc: z@physics.example"


@pytest.fixture
def clock(request):
    """A fresh clock at the test's start (``indirect`` parametrization)."""
    return Clock(getattr(request, "param", None))


@pytest.fixture
def smtp(tmp_path):
    with SmtpServer(tmp_path) as server:
        yield server


def _everyone(server) -> list[str]:
    """Every envelope recipient and every To address the server saw."""
    out = []
    for r in server.handler.received:
        out += r.rcpt_tos
        out += [a.addr_spec for a in r.message["To"].addresses]
    return out


# -- building addresses ----------------------------------------------------------------------


@pytest.mark.parametrize("text", ["lead@physics.example", "a.b-c+d@x.example", "a@x"])
def test_plain_addresses_are_taken(text):
    assert mail_address(text).addr_spec == text


@pytest.mark.parametrize("text", [
    "", "x:y@z.example", "carol+x:y@hpc.example", "<a@x.example>", "Bob <b@x.example>",
    '"a b"@x.example', "a@x.example\r\nBcc: y@x.example", "a @x.example", "a@", "@x",
    "a..b@x.example", "a@b@c", "g: a@b.example;", "é@x.example", "a@x.example (c)",
])
def test_anything_else_is_not_an_address(text):
    with pytest.raises(BadAddress):
        mail_address(text)


@pytest.mark.parametrize("user", ["carol+x:y", "x:y", CRLF_NAME, "<eve>", "a b", "bob@ad",
                                  "a..b", ""])
def test_a_user_name_that_makes_no_plain_address_makes_none(user):
    with pytest.raises(BadAddress):
        user_address("{user}@hpc.example", user)


def test_a_user_address_is_the_name_at_the_patterns_domain():
    assert user_address("{user}@hpc.example", "alice").addr_spec == "alice@hpc.example"
    assert user_address("gpu-{user}@hpc.example", "a.b").addr_spec == "gpu-a.b@hpc.example"


# -- idle digests ----------------------------------------------------------------------------


def _usage(index, held_min, idle_min, stretch_min):
    return {"index": index, "uuid": f"GPU-{index}", "held_ms": held_min * MIN,
            "busy_ms": (held_min - idle_min) * MIN, "energy_mj": 0, "peak_mem_bytes": 0,
            "measured": True, "idle_ms": idle_min * MIN, "idle_max_ms": stretch_min * MIN}


def _idle_job(lg, token, user, job_id, clock, stored_user=None):
    """A settled, wholly idle job of ``user``; ``stored_user``: the name its hold row holds
    (one written before the ledger checked names)."""
    clock.advance(hours=2)
    usages = [_usage(0, 120, 120, 120)]
    hold = lg.reserve(token, HoldRequest(gpus=1, seconds=7200, gpu_type="h100", user=user,
                                         account="physics"))
    if stored_user is not None:
        with db.write(lg.engine) as conn:
            conn.execute(update(HO).where(HO.c.id == hold.id).values(user=stored_user))
    rec = charge_gpus(usages, {0: "h100"}, {"h100": 1_000_000}, hold.rate_ppm, "allocated",
                      source="agent", node="gpu01", restart=0)
    lg.post(hold.id, rec.amount, usage=rec, key=f"{hold.id}:{job_id}:0:gpu01", final=False,
            job_id=job_id, node="gpu01", restart=0)
    lg.post(hold.id, 0, key=f"close:{hold.id}")


@pytest.mark.parametrize("clock", [at(11, 20)], indirect=True)
def test_idle_digests_reach_every_good_user_past_hostile_names(ledger, clock, smtp,
                                                                tmp_path):
    lg = ledger
    tok, _ = lg.mint("physics", 100 * H, expires=at(12, 31, year=2027))
    _idle_job(lg, tok, "alice", "101", clock)
    _idle_job(lg, tok, "bob", "102", clock)
    _idle_job(lg, tok, "carol", "103", clock, stored_user="carol+x:y")
    _idle_job(lg, tok, "dave", "104", clock, stored_user=CRLF_NAME)
    _idle_job(lg, tok, "eve", "105", clock, stored_user="<eve>")
    _idle_job(lg, tok, "zed", "106", clock)  # sorts after every hostile name
    policy = parse({"flag_after_s": 3600, "user_mail": "{user}@hpc.example"})
    settings = SmtpSettings.from_section(smtp.settings(tmp_path))

    first = send_idle(lg, policy, settings=settings)
    good = ["alice@hpc.example", "bob@hpc.example", "zed@hpc.example"]
    assert first.flagged == 6
    assert [len(smtp.handler.to(r)) for r in good] == [1, 1, 1]
    assert sorted(_everyone(smtp)) == sorted(good + good)  # nobody else, in no header
    failed = {k: v for o in first.outcomes for k, v in o.failed.items()}
    assert sorted(failed) == sorted(["carol+x:y", CRLF_NAME, "<eve>"])
    assert all(v.startswith("skipped: not a valid user name") for v in failed.values())
    assert first.failures == 3
    # a name that can never be mailed is reported once; its notices are closed
    with db.read(lg.engine) as conn:
        open_ = conn.execute(select(IN.c.job_id).where(IN.c.mailed_at.is_(None))).all()
    assert open_ == []
    again = send_idle(lg, policy, settings=settings)
    assert (again.outcomes, again.failures) == ([], 0)
    assert len(smtp.handler.received) == 3


@pytest.mark.parametrize("clock", [at(11, 20)], indirect=True)
def test_idle_digest_to_an_accounts_recipients_skips_a_bad_one(sqlite_ledger, clock, smtp,
                                                                tmp_path):
    lg = sqlite_ledger
    lg.set_report_to("physics", ["lead@physics.example", "pi@physics.example"])
    with db.write(lg.engine) as conn:
        conn.execute(update(A).where(A.c.name == "physics").values(
            report_to=["lead@physics.example", CRLF_RCPT, "pi@physics.example"]))
    tok, _ = lg.mint("physics", 100 * H, expires=at(12, 31, year=2027))
    _idle_job(lg, tok, "alice", "101", clock)
    settings = SmtpSettings.from_section(smtp.settings(tmp_path))
    summary = send_idle(lg, parse({"flag_after_s": 3600}), settings=settings)
    assert [len(smtp.handler.to(r)) for r in ("lead@physics.example",
                                              "pi@physics.example")] == [1, 1]
    assert sorted(set(_everyone(smtp))) == ["lead@physics.example", "pi@physics.example"]
    (outcome,) = summary.outcomes
    assert list(outcome.failed) == [CRLF_RCPT] and summary.failures == 1
    # the good ones are not mailed twice; the bad one is reported until it is fixed
    again = send_idle(lg, parse({"flag_after_s": 3600}), settings=settings)
    assert len(smtp.handler.received) == 1 and again.failures == 1


# -- monthly reports -------------------------------------------------------------------------


NOV = Month(2026, 11)
ADMIN = "ops@hpc.example"
PHYS = ["lead@physics.example", "pi@physics.example"]


def _hostile_report_to(lg) -> None:
    lg.set_report_to("physics", [PHYS[0], "x:y@physics.example", PHYS[1]])  # the old rule
    with db.write(lg.engine) as conn:  # takes the first; a row from before it, the second
        conn.execute(update(A).where(A.c.name == "physics").values(
            report_to=[PHYS[0], "x:y@physics.example", CRLF_RCPT, PHYS[1]]))


@pytest.mark.parametrize("clock", [at(10, 1)], indirect=True)
def test_reports_reach_every_good_recipient_past_hostile_ones(ledger, clock, smtp, tmp_path):
    seed_month(ledger, clock)
    _hostile_report_to(ledger)
    settings = SmtpSettings.from_section(smtp.settings(tmp_path))
    summary = send_reports(ledger, NOV, settings=settings, admins=[ADMIN, "ops:x@hpc.example"])
    good = PHYS + ["head@chem.example", ADMIN]
    assert sorted(set(_everyone(smtp))) == sorted(good)
    assert all(len(smtp.handler.to(r)) == 1 for r in good)
    failed = {k: v for o in summary.outcomes for k, v in o.failed.items()}
    assert sorted(failed) == sorted(["x:y@physics.example", CRLF_RCPT, "ops:x@hpc.example"])
    assert summary.failures == 3
    log = {(r.scope, r.recipient): r.status for r in sendlog.entries(ledger.engine, "2026-11")}
    assert log[("physics", CRLF_RCPT)] == log[("physics", "x:y@physics.example")] == "failed"
    assert log[("physics", PHYS[0])] == log[("*site*", ADMIN)] == "sent"
    again = send_reports(ledger, NOV, settings=settings, admins=[ADMIN])
    assert len(smtp.handler.received) == 3 and again.failures == 2


@pytest.mark.parametrize("clock", [at(10, 1)], indirect=True)
def test_cli_report_send_says_failed_on_one_line_each(sqlite_ledger, clock, smtp, tmp_path):
    seed_month(sqlite_ledger, clock)
    _hostile_report_to(sqlite_ledger)
    url = sqlite_ledger.engine.url.render_as_string(hide_password=False)
    lines = ["[database]", f'url = "{url}"', "[keys]", f'dir = "{tmp_path / "keys"}"',
             "[smtp]"]
    for k, v in smtp.settings(tmp_path).items():
        lines.append(f"{k} = {v}" if isinstance(v, int) else f'{k} = "{v}"')
    conf = Path(tmp_path / "gpuledger.toml")
    conf.write_text("\n".join(lines) + "\n")
    res = CliRunner().invoke(cli, ["--config", str(conf), "report", "send", "--month",
                                   "2026-11"])
    assert res.exit_code == 1 and res.exception is None or isinstance(res.exception,
                                                                      SystemExit), res.output
    assert "Traceback" not in res.output
    failed = [line for line in res.output.splitlines() if line.startswith("FAILED")]
    assert failed == [
        "FAILED physics: x:y@physics.example: skipped: not a mail address "
        "(Invalid addr_spec; only 'x' could be parsed from 'x:y@physics.example')",
        f"FAILED physics: {ascii(CRLF_RCPT)}: skipped: not a mail address (control "
        "characters, blanks, non-ASCII or over 254 characters)"]
    assert "Bcc" not in res.output.replace(ascii(CRLF_RCPT), "")
    assert sorted(set(_everyone(smtp))) == sorted(PHYS + ["head@chem.example"])


# -- budget alerts ---------------------------------------------------------------------------


@pytest.mark.parametrize("clock", [at(11, 1)], indirect=True)
def test_alerts_reach_every_good_recipient_past_a_hostile_one(sqlite_ledger, clock, smtp,
                                                              tmp_path):
    lg = sqlite_ledger
    lg.set_report_to("chemistry", ["head@chem.example"])
    lg.set_report_to("physics", PHYS)
    with db.write(lg.engine) as conn:  # chemistry sorts first
        conn.execute(update(A).where(A.c.name == "chemistry").values(
            report_to=[CRLF_RCPT, "head@chem.example", "x:y@chem.example"]))
    for account in ("chemistry", "physics"):
        tok, _ = lg.mint(account, 10 * H, expires=at(6, 30, year=2027))
        hold = lg.reserve(tok, HoldRequest(gpus=1, seconds=9 * H, gpu_type="h100",
                                           user="alice"))
        lg.post(hold.id, 9 * H)
    settings = SmtpSettings.from_section(smtp.settings(tmp_path))
    first = send_alerts(lg, settings=settings)
    good = ["head@chem.example"] + PHYS
    assert [len(smtp.handler.to(r)) for r in good] == [1, 1, 1]
    assert sorted(set(_everyone(smtp))) == sorted(good)
    failed = {k: v for o in first.outcomes for k, v in o.failed.items()}
    assert sorted(failed) == sorted([CRLF_RCPT, "x:y@chem.example"])
    # the good ones are not mailed twice; the bad ones are reported until they are fixed
    again = send_alerts(lg, settings=settings)
    assert len(smtp.handler.received) == 2 and again.failures == 2
