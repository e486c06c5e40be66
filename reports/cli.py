"""``gpuledger report render|send|log``, ``gpuledger alerts send|list`` and
``gpuledger idle send|list``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from ledger.amounts import fmt_hours
from ledger.cli.context import pass_app
from ledger.cli.output import echo_json, echo_table, json_output, table_output
from ledger.cli.shapes import obj
from ledger.errors import InvalidInput
from ledger.views import iso

from . import alerts as alerts_mod
from . import deliver, sendlog
from .period import Month
from .render import FORMATS, ms_hours, render_account

RENDERED = obj("report-files", "Reports `report render` wrote.", [
    ("month", "string", "YYYY-MM"),
    ("format", "string", "html, text or json"),
    ("accounts", "integer", "accounts rendered"),
    ("files", "list of string", "files written"),
    ("no_activity", "list of string", "accounts without activity that month"),
])
MAILED = obj("mailed", "One message of a run: to whom it went.", [
    ("kind", "string", "report or site"),
    ("scope", "string", "the account (or the site summary)"),
    ("recipients", "list of string", "whom it is for"),
    ("sent", "list of string", "sent (or, with --dry-run, written) to"),
    ("already_sent", "list of string", "sent before (once per recipient and month)"),
    ("failed", "map of string", "recipient -> why it failed"),
    ("file", "string?", "--dry-run: the .eml written"),
])
SENT = obj("report-send", "What `report send` did.", [
    ("month", "string", "YYYY-MM"),
    ("dry_run", "boolean", "whether it only wrote .eml files"),
    ("sent", "integer", "messages sent (or written)"),
    ("already_sent", "integer", "recipients that had it already"),
    ("failed", "integer", "recipients it failed for (exit status 1)"),
    ("no_recipients", "list of string", "accounts with nobody to send to"),
    ("messages", "list of mailed", "each message"),
])
DIGEST = obj("digest", "One digest of a run (alerts of an account, idle jobs of an owner).", [
    ("account", "string", "the account, or the owner (`user:alice`)"),
    ("alerts?", "list of string", "alerts: its lines"),
    ("jobs?", "list of string", "idle: its lines"),
    ("sent", "list of string", "sent (or written) to"),
    ("failed", "map of string", "recipient -> why it failed"),
    ("file", "string?", "--dry-run: the .eml written"),
])
DIGESTS = obj("digest-run", "What `alerts send` or `idle send` did.", [
    ("dry_run", "boolean", "whether it only wrote .eml files"),
    ("raised?", "integer", "alerts: newly raised"),
    ("waiting?", "list of string", ("alerts: recipients who had a digest within [reports] "
                                   "alert_digest_s (theirs waits)")),
    ("flagged?", "integer", "idle: settlements newly flagged"),
    ("refunded?", "integer", "idle: refunded, GPU-seconds at the reference rate"),
    ("would_refund?", "integer", "idle --dry-run: what it would refund, GPU-seconds"),
    ("sent", "integer", "digests sent (or written)"),
    ("failed", "integer", "recipients it failed for (exit status 1)"),
    ("no_recipients", "list of string", "accounts with nobody to send to"),
    ("digests", "list of digest", "each digest"),
])
LOG = obj("send-log-row", "One recipient of one message in the send log.", [
    ("kind", "string", "report or site"),
    ("scope", "string", "account (or the site)"),
    ("period", "string", "YYYY-MM"),
    ("recipient", "string", "address"),
    ("status", "string", "sent, failed, …"),
    ("attempts", "integer", "tries"),
    ("error", "string?", "the last failure"),
    ("message_id", "string?", "Message-ID"),
    ("updated", "timestamp", "last change"),
])
ALERT = obj("alert", "A threshold crossed now.", [
    ("account", "string", "account"),
    ("subject", "string", "what it is about (the account or a token)"),
    ("kind", "string", "used, expiry, debt, …"),
    ("threshold", "integer", "the threshold (percent used, days to expiry, …)"),
    ("raised", "timestamp?", "when it was raised (null: new)"),
    ("text", "string", "the alert in words"),
])
IDLE = obj("idle-notice", "A settlement flagged for idle GPUs.", [
    ("charge", "integer", "charge id"),
    ("account", "string", "account"),
    ("user", "string?", "the job's user"),
    ("job", "string?", "Slurm job id"),
    ("node", "string?", "node"),
    ("held_ms", "integer", "GPU-milliseconds held"),
    ("idle_ms", "integer", "GPU-milliseconds idle"),
    ("idle_max_ms", "integer", "longest idle stretch of a GPU, ms"),
    ("idle_cost", "integer", "what the idle time cost, GPU-seconds at the reference rate"),
    ("refund", "integer", "refunded, GPU-seconds at the reference rate"),
    ("charged_at", "timestamp", "when the job was charged"),
    ("mailed_to", "list of string", "whom the digest went to"),
])


def _sealed(app):
    """The ledger, every journal row chained first (rows can wait to be chained on a server
    database, see ledger.journal): reports read the journal and the system wallets."""
    ledger = app.ledger
    ledger.seal_pending()
    return ledger


def _settings(app):
    from .mail import SmtpSettings

    return SmtpSettings.from_config(app.config)


def _admins(app) -> list[str]:
    return list(app.config.reports.admins)


def _progress(enabled: bool):
    """click.progressbar on a terminal (and not for --json), else a plain iterator."""
    def run(items, length, label):
        if not enabled or not sys.stdout.isatty() or length < 2:
            yield from items
            return
        with click.progressbar(items, length=length, label=label) as bar:
            yield from bar

    return run


@click.group("report")
def report_group():
    """Monthly budget reports and the site summary."""


@report_group.command("render")
@click.option("--month", required=True, help="YYYY-MM, or 'previous' / 'current'.")
@click.option("--account", help="Only this account (default: all, plus the site summary).")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="html", show_default=True)
@click.option("--out", type=click.Path(file_okay=False),
              help="Directory for the files (default: stdout for one account's text or JSON, "
                   "else ./gpuledger-report-MONTH).")
@json_output(RENDERED)
@pass_app
def report_render(app, month, account, fmt, out, as_json):
    """Render reports to files (HTML with its PNG chart, text, or JSON)."""
    ledger = _sealed(app)
    m = Month.parse(month, ledger.clock())
    site = deliver.load(ledger, m, account)
    now = ledger.clock()
    if out is None and account and fmt != "html" and not as_json:
        r = render_account(site.accounts[0], generated=now)
        click.echo(r.text if fmt == "text" else _dumps(r.json), nl=False)
        return
    target = Path(out or f"gpuledger-report-{m}")
    _writable_dir(target)
    paths = deliver.render_all(site, fmt, target, include_site=account is None, now=now,
                               progress=_progress(not as_json))
    if as_json:
        return echo_json({"month": str(m), "format": fmt, "accounts": len(site.accounts),
                          "files": [str(p) for p in paths],
                          "no_activity": [r.account for r in site.accounts
                                          if not r.had_activity]})
    click.echo(f"Wrote {len(paths)} files for {len(site.accounts)} account(s) to {target}")


def _writable_dir(target: Path) -> None:
    """Make the output directory (or refuse, naming it) before anything is rendered."""
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InvalidInput(f"cannot write reports to {target}: {exc.strerror}") from None
    if not os.access(target, os.W_OK | os.X_OK):
        raise InvalidInput(f"cannot write reports to {target}: permission denied")


def _dumps(data) -> str:
    import json

    return json.dumps(data, indent=2) + "\n"


@report_group.command("send")
@click.option("--month", required=True, help="YYYY-MM, or 'previous' / 'current'.")
@click.option("--account", help="Only this account (default: all, plus the site summary).")
@click.option("--dry-run", is_flag=True, help="Write .eml files instead of sending.")
@click.option("--out", type=click.Path(file_okay=False),
              help="Directory for --dry-run .eml files (default ./gpuledger-mail-MONTH).")
@json_output(SENT)
@pass_app
def report_send(app, month, account, dry_run, out, as_json):
    """Email each account's report to its recipients (once per recipient and month)."""
    ledger = _sealed(app)
    m = Month.parse(month, ledger.clock())
    settings = None if dry_run and app.config.smtp is None else _settings(app)
    summary = deliver.send_reports(
        ledger, m, settings=settings, account=account, admins=_admins(app), dry_run=dry_run,
        out=Path(out or f"gpuledger-mail-{m}") if dry_run else None,
        progress=_progress(not as_json))
    _report_summary(summary.to_dict(), as_json, dry_run)
    if summary.failures:
        sys.exit(1)


def _report_summary(d: dict, as_json: bool, dry_run: bool) -> None:
    if as_json:
        return echo_json(d)
    verb = "Wrote" if dry_run else "Sent"
    for msg in d.get("messages", d.get("digests", [])):
        label = _shown(msg.get("scope") or msg.get("account"))
        if msg["sent"]:
            where = f" ({msg['file']})" if msg.get("file") else ""
            click.echo(f"{verb} {label}: {', '.join(msg['sent'])}{where}")
        for rcpt in msg.get("already_sent", []):
            click.echo(f"Already sent {label}: {rcpt}")
        for rcpt, why in msg["failed"].items():
            click.echo(f"FAILED {label}: {_shown(rcpt)}: {why}", err=True)
    if d["no_recipients"]:
        click.echo(f"No recipients: {', '.join(d['no_recipients'])} "
                   "(gpuledger account set NAME --report-to ...)")
    click.echo(f"{d['sent']} {'written' if dry_run else 'sent'}, {d['failed']} failed"
               + (f", {d['already_sent']} already sent" if "already_sent" in d else ""))


def _every(seconds: int) -> str:
    if seconds % 86400 == 0:
        return "day" if seconds == 86400 else f"{seconds // 86400} days"
    if seconds % 3600 == 0:
        return "hour" if seconds == 3600 else f"{seconds // 3600} hours"
    return f"{seconds} s"


def _shown(text: str) -> str:
    """A stored name or recipient for one output line: as it is when printable, else
    escaped (a name with a line break must not forge a line of the summary)."""
    return text if text.isprintable() else ascii(text)


@report_group.command("log")
@click.option("--month", required=True, help="YYYY-MM, or 'previous' / 'current'.")
@json_output("list of " + LOG)
@table_output
@pass_app
def report_log(app, month, as_json):
    """Show the send log of a month: who got which report, and failures."""
    m = Month.parse(month, app.ledger.clock())
    rows = sendlog.entries(app.ledger.engine, str(m))
    if as_json:
        return echo_json([{**r.__dict__, "updated": iso(r.updated)} for r in rows])
    echo_table(["KIND", "SCOPE", "RECIPIENT", "STATUS", "ATTEMPTS", "UPDATED", "ERROR"],
               [[r.kind, r.scope, _shown(r.recipient), r.status, r.attempts,
                 iso(r.updated), r.error] for r in rows])


@click.group("alerts")
def alerts_group():
    """Budget alerts (80 / 90 / 100 % used, 30 / 14 / 7 / 0 days before a token expires, by
    default; [reports] in the config), one digest per recipient."""


@alerts_group.command("send")
@click.option("--dry-run", is_flag=True, help="Write .eml files; record nothing.")
@click.option("--out", type=click.Path(file_okay=False),
              help="Directory for --dry-run .eml files (default ./gpuledger-alerts).")
@click.option("--account", help="Only this account.")
@json_output(DIGESTS)
@pass_app
def alerts_send(app, dry_run, out, account, as_json):
    """Raise newly crossed thresholds and reminders ([reports] in the config) and mail each
    recipient one digest of what is due to them."""
    ledger = _sealed(app)
    if account:
        from ledger.queries import account_views

        account_views(ledger, account)  # NotFound for an unknown account
    settings = None if dry_run and app.config.smtp is None else _settings(app)
    summary = alerts_mod.send_alerts(ledger, settings=settings, dry_run=dry_run,
                                     out=Path(out or "gpuledger-alerts") if dry_run else None,
                                     account=account, rules=app.config.reports,
                                     user_mail=app.config.idle.user_mail)
    d = summary.to_dict()
    _report_summary(d, as_json, dry_run)
    if d["waiting"] and not as_json:
        every = app.config.reports.alert_digest_s
        click.echo(f"Waiting ({'one digest' if every else 'a digest'} per "
                   f"{_every(every)}): {', '.join(_shown(r) for r in d['waiting'])}")
    if summary.failures:
        sys.exit(1)


@alerts_group.command("list")
@click.option("--account", help="Only this account.")
@json_output("list of " + ALERT)
@table_output
@pass_app
def alerts_list(app, account, as_json):
    """Thresholds crossed now, and whether each was already raised."""
    from sqlalchemy import select

    from ledger import db

    ledger = _sealed(app)
    with db.read(ledger.engine) as conn:
        conds = alerts_mod.evaluate(conn, ledger.clock(), account, app.config.reports)
        raised = {tuple(r[:4]): r[4] for r in conn.execute(select(
            alerts_mod.AL.c.account, alerts_mod.AL.c.subject, alerts_mod.AL.c.kind,
            alerts_mod.AL.c.threshold, alerts_mod.AL.c.created_at))}
    rows = [{"account": c.account, "subject": c.subject, "kind": c.kind,
             "threshold": c.threshold, "raised": raised.get(c.key), "text": c.describe()}
            for c in conds]
    if as_json:
        return echo_json([{**r, "raised": iso(r["raised"])} for r in rows])
    echo_table(["ACCOUNT", "SUBJECT", "ALERT", "RAISED", "DETAIL"],
               [[r["account"], r["subject"], f"{r['kind']} {r['threshold']}",
                 iso(r["raised"]) if r["raised"] else "new", r["text"]]
                for r in rows])


@click.group("idle")
def idle_group():
    """Idle GPUs: flag jobs, refund the site's share, mail each owner one digest."""


@idle_group.command("send")
@click.option("--days", type=click.IntRange(1, 366), default=7, show_default=True,
              help="Look at settlements of the last DAYS days.")
@click.option("--dry-run", is_flag=True, help="Write .eml files; refund and record nothing.")
@click.option("--out", type=click.Path(file_okay=False),
              help="Directory for --dry-run .eml files (default ./gpuledger-idle).")
@json_output(DIGESTS)
@pass_app
def idle_send(app, days, dry_run, out, as_json):
    """Flag idle settlements ([idle] in the config), refund, and mail the digests."""
    from . import idle as idle_mod

    settings = None if dry_run and app.config.smtp is None else _settings(app)
    summary = idle_mod.send_idle(_sealed(app), app.config.idle, settings=settings, days=days,
                                 dry_run=dry_run,
                                 out=Path(out or "gpuledger-idle") if dry_run else None)
    d = summary.to_dict()
    if not as_json and dry_run:
        click.echo(f"{d['flagged']} newly flagged, would refund {fmt_hours(d['would_refund'])} "
                   "GPU-h (dry run: nothing refunded or recorded)")
    elif not as_json:
        click.echo(f"{d['flagged']} newly flagged, {fmt_hours(d['refunded'])} GPU-h refunded")
    _report_summary(d, as_json, dry_run)
    if summary.failures:
        sys.exit(1)


@idle_group.command("list")
@click.option("--days", type=click.IntRange(1, 3660), default=30, show_default=True,
              help="Settlements of the last DAYS days.")
@click.option("--account", help="Only this account.")
@json_output("list of " + IDLE)
@table_output
@pass_app
def idle_list(app, days, account, as_json):
    """Settlements flagged for idle GPUs: idle time, what it cost, refund, who was told."""
    from datetime import timedelta

    from ledger import db

    from . import idle as idle_mod

    ledger = _sealed(app)
    with db.read(ledger.engine) as conn:
        rows = idle_mod.notices(conn, ledger.clock() - timedelta(days=days), account)
    if as_json:
        return echo_json([{"charge": n.charge_id, "account": n.account, "user": n.user,
                           "job": n.job_id, "node": n.node, "held_ms": n.held_ms,
                           "idle_ms": n.idle_ms, "idle_max_ms": n.idle_max_ms,
                           "idle_cost": n.idle_cost, "refund": n.refund,
                           "charged_at": iso(n.charged_at), "mailed_to": n.mailed_to}
                          for n in rows])
    echo_table(["JOB", "ACCOUNT", "USER", "IDLE_RAW_H", "COST_GPU_H", "REFUND_GPU_H", "MAILED"],
               [[n.job_id or "-", n.account, _shown(n.user or "-"), ms_hours(n.idle_ms),
                 fmt_hours(n.idle_cost), fmt_hours(n.refund), ", ".join(n.mailed_to) or "-"]
                for n in rows])


COMMANDS = [report_group, alerts_group, idle_group]
