"""Render reports to files, and send them (or write .eml files) once per recipient and month."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from ledger import db
from ledger.errors import InvalidInput

from . import sendlog
from .bundle import render_bundle
from .figures import AccountReport, SiteReport, build
from .mail import (
    MAX_ADDRESS,
    Mailer,
    MailError,
    SmtpSettings,
    build_message,
    chart_cid,
    message_id,
    sort_recipients,
    write_eml,
)
from .models import SITE
from .period import Month
from .render import FORMATS, Rendered, render_account, render_site

Progress = Callable[[Iterable, int, str], Iterator]


def no_progress(items: Iterable, length: int, label: str) -> Iterator:
    return iter(items)


def load(ledger, month: Month, account: str | None = None) -> SiteReport:
    with db.read(ledger.engine) as conn:
        return build(conn, month, ledger.clock(), account)


# -- files -----------------------------------------------------------------------------------


def write_rendered(r: Rendered, fmt: str, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    if fmt == "html":
        paths.append(out / f"{r.name}.html")
        paths[-1].write_text(r.html)
        if r.chart is not None:
            paths.append(out / f"{r.name}.png")
            paths[-1].write_bytes(r.chart)
    elif fmt == "text":
        paths.append(out / f"{r.name}.txt")
        paths[-1].write_text(r.text)
    else:
        paths.append(out / f"{r.name}.json")
        paths[-1].write_text(json.dumps(r.json, indent=2) + "\n")
    return paths


def render_all(site: SiteReport, fmt: str, out: Path, *, include_site: bool, now: datetime,
               progress: Progress = no_progress) -> list[Path]:
    if fmt not in FORMATS:
        raise InvalidInput(f"unknown format {fmt!r} ({', '.join(FORMATS)})")
    paths: list[Path] = []
    for r in progress(site.accounts, len(site.accounts), "Rendering"):
        paths += write_rendered(render_account(r, generated=now), fmt, out)
    if include_site:
        paths += write_rendered(render_site(site, generated=now), fmt, out)
    return paths


# -- mail ------------------------------------------------------------------------------------


@dataclass
class Outcome:
    kind: str  # report | site
    scope: str  # account name or SITE
    recipients: list[str]
    sent: list[str] = field(default_factory=list)
    already: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    file: str | None = None

    def to_dict(self) -> dict:
        return {"kind": self.kind, "scope": self.scope, "recipients": self.recipients,
                "sent": self.sent, "already_sent": self.already, "failed": self.failed,
                "file": self.file}


@dataclass
class SendSummary:
    month: str
    dry_run: bool
    outcomes: list[Outcome] = field(default_factory=list)
    no_recipients: list[str] = field(default_factory=list)

    @property
    def failures(self) -> int:
        return sum(len(o.failed) for o in self.outcomes)

    def to_dict(self) -> dict:
        return {"month": self.month, "dry_run": self.dry_run,
                "sent": sum(len(o.sent) for o in self.outcomes),
                "already_sent": sum(len(o.already) for o in self.outcomes),
                "failed": self.failures, "no_recipients": self.no_recipients,
                "messages": [o.to_dict() for o in self.outcomes]}


@dataclass
class _Job:
    kind: str
    scope: str
    recipients: list[str]
    pending: list[str]
    report: AccountReport | SiteReport


def send_reports(ledger, month: Month, *, settings: SmtpSettings | None,
                 account: str | None = None, admins: Iterable[str] = (), dry_run: bool = False,
                 out: Path | None = None, progress: Progress = no_progress) -> SendSummary:
    """Send each account's report (and, for all accounts, the site summary to ``admins``).

    Recipients whose server already accepted this month's message are skipped; the
    outcome of every recipient is logged as soon as the server answers. A recipient that is
    not a plain mail address (``reports.mail.mail_address``) is skipped and logged as
    failed; the others get the message.
    """
    if not dry_run and settings is None:
        raise InvalidInput("no [smtp] settings")
    if dry_run and out is None:
        raise InvalidInput("a dry run needs a directory for the .eml files")
    now = ledger.clock()
    period = str(month)
    site = load(ledger, month, account)
    summary = SendSummary(period, dry_run)
    done = {} if dry_run else sendlog.accepted(ledger.engine, "report", period)
    done_site = {} if dry_run else sendlog.accepted(ledger.engine, "site", period)
    jobs: list[_Job] = []
    for r in site.accounts:
        if not r.report_to:
            summary.no_recipients.append(r.account)
            continue
        jobs.append(_Job("report", r.account, list(r.report_to),
                         [x for x in r.report_to if x not in done.get(r.account, set())], r))
    admins = list(dict.fromkeys(admins))
    if account is None and admins:
        jobs.append(_Job("site", SITE, admins,
                         [x for x in admins if x not in done_site.get(SITE, set())], site))
    sender = settings.sender if settings else "gpuledger@localhost"
    mailer = Mailer(settings) if settings and not dry_run else None
    accepted_before = 0
    outcomes: list[Outcome] = []
    due: dict[str, list[int]] = {}  # recipient -> the jobs it still lacks, in order
    for i, job in enumerate(jobs):
        outcome = Outcome(job.kind, job.scope, job.recipients,
                          already=[x for x in job.recipients if x not in job.pending])
        outcomes.append(outcome)
        summary.outcomes.append(outcome)
        _, bad = sort_recipients(job.recipients)
        outcome.failed = {x: bad[x] for x in job.pending if x in bad}
        for x in job.pending:
            if x not in bad:
                due.setdefault(x, []).append(i)
        if outcome.failed and not dry_run:  # logged once, as failed, with why
            _record(ledger, job, period, {}, outcome.failed,
                    message_id(job.kind, job.scope, period, sender))
    # one message per recipient for all it lacks; recipients lacking the same share one
    groups: dict[tuple[int, ...], list[str]] = {}
    for rcpt, idx in due.items():
        groups.setdefault(tuple(idx), []).append(rcpt)
    try:
        for key, rcpts in progress(list(groups.items()), len(groups),
                                   "Sending" if not dry_run else "Writing"):
            group = [jobs[i] for i in key]
            msg, msg_id, name = _message(group, month, period, sender, now, rcpts)
            if dry_run:
                path = str(write_eml(msg, out / f"{name}.eml"))
                for i in key:
                    outcomes[i].file = path
                    outcomes[i].sent += rcpts
                continue
            refused = mailer.send(msg, rcpts)
            results = {x: refused.get(x) for x in rcpts}
            for i in key:
                o = outcomes[i]
                _record(ledger, jobs[i], period, results, {}, msg_id)
                o.sent += [x for x, e in results.items() if e is None]
                o.failed.update({x: e for x, e in results.items() if e is not None})
            accepted_before += sum(1 for e in results.values() if e is None)
    except MailError as exc:
        if accepted_before:
            raise MailError(f"{exc} ({accepted_before} recipients were accepted before this "
                            "and are recorded; re-run to send the rest)") from None
        raise
    finally:
        if mailer is not None:
            mailer.close()
    return summary


def _message(group: list[_Job], month: Month, period: str, sender: str, now: datetime,
             rcpts: list[str]):
    """(the message, its id, a file stem) for one recipient group: a job alone is the
    report as it always was; several are one bundle (reports.bundle)."""
    if len(group) == 1:
        job = group[0]
        msg_id = message_id(job.kind, job.scope, period, sender)
        if job.kind == "site":
            rendered, cid = render_site(job.report, generated=now), None
        else:
            cid = chart_cid(f"{job.scope}-{period}", sender)
            rendered = render_account(job.report, chart_src=f"cid:{cid}", generated=now)
        header = f"{job.kind} {job.scope} {period}"
    else:
        msg_id = message_id("bundle", "\0".join(j.scope for j in group), period, sender)
        rendered = render_bundle([j.report for j in group], month, sender=sender,
                                 generated=now)
        cid = None
        header = f"bundle {' '.join(j.scope for j in group)} {period}"
    msg = build_message(rendered, sender=sender, recipients=rcpts, msg_id=msg_id, when=now,
                        cid=cid, headers={"X-Gpuledger-Report": header})
    return msg, msg_id, rendered.name


def _record(ledger, job: _Job, period: str, results: dict[str, str | None],
            skipped: dict[str, str], msg_id: str) -> None:
    """Log the server's answers and the skipped recipients (failed, with why) of one job."""
    results = dict(results)
    for x, why in skipped.items():
        results[x[:MAX_ADDRESS]] = why
    sendlog.record(ledger.engine, kind=job.kind, scope=job.scope, period=period,
                   results=results, message_id=msg_id, now=ledger.clock())
