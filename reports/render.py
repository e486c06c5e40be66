"""Turn the report model into HTML, plain text, JSON and the chart PNG (Jinja2 templates).

Number formats are the same everywhere: GPU-hours with three decimals
(``ledger.amounts.fmt_hours``), percentages with one decimal, ISO dates.
HTML is autoescaped, so account, user and token names cannot inject markup.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from datetime import date, datetime
from functools import lru_cache
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

from ledger.amounts import fmt_hours, hours

from .chart import HEIGHT, WIDTH, burndown_png
from .figures import AccountReport, SiteReport, Statement, UsageLine

TEMPLATES = Path(__file__).with_name("templates")
FORMATS = ("html", "text", "json")


def gpuh(amount: int) -> str:
    return fmt_hours(amount)


def signed(amount: int) -> str:
    return ("+" if amount > 0 else "") + fmt_hours(amount) if amount else "0.000"


def ms_hours(ms: int) -> str:
    """Milliseconds of GPU time → GPU-hours, three decimals (rounded half up)."""
    milli = (ms + 1800) // 3600  # ms / 3.6e6 h, in thousandths
    return f"{milli // 1000}.{milli % 1000:03d}"


def pct(ratio: float | None) -> str:
    return "n/a" if ratio is None else f"{ratio * 100:.1f} %"


def iso(value: date | datetime | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, datetime):
        return value.date().isoformat()
    return value.isoformat()


def iso_time(value: datetime) -> str:
    return value.strftime("%Y-%m-%d %H:%M UTC")


TEXT_WIDTH = 78  # the plain-text part's lines, at most (RFC 5322's advice)


def ljust(value, width: int) -> str:
    return str(value).ljust(width)


def rjust(value, width: int) -> str:
    return str(value).rjust(width)


def cell(value, width: int, indent: int = 2) -> str:
    """A name in a text column ``width`` wide that starts at column ``indent`` (one blank
    after it at least). A longer name keeps its own line (wrapped at TEXT_WIDTH) and the
    row's figures go on the next, so no line grows past the table."""
    text = str(value)
    if len(text) < width:
        return text.ljust(width)
    lines = textwrap.wrap(text, TEXT_WIDTH - indent, break_long_words=True) or [text]
    return ("\n" + " " * indent).join(lines) + "\n" + " " * (indent + width)


def wrap(text: str, indent: int = 2, width: int = TEXT_WIDTH, hang: int = 0) -> str:
    """``text`` wrapped to ``width`` columns, each line indented (continuations ``hang``
    more); words are never split, so a single word longer than a line stands alone."""
    return "\n".join(textwrap.wrap(" ".join(str(text).split()), width=width,
                                   initial_indent=" " * indent,
                                   subsequent_indent=" " * (indent + hang),
                                   break_long_words=False, break_on_hyphens=False))


@lru_cache(maxsize=1)
def environment() -> Environment:
    env = Environment(loader=FileSystemLoader(str(TEMPLATES)),
                      autoescape=select_autoescape(["html"], default_for_string=True),
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                      keep_trailing_newline=True)
    env.filters.update(gpuh=gpuh, signed=signed, ms_hours=ms_hours, pct=pct, iso=iso,
                       iso_time=iso_time, ljust=ljust, rjust=rjust, cell=cell, wrap=wrap, owners=owners)
    return env


@dataclass(frozen=True)
class Rendered:
    """One report in every form; ``chart`` is the PNG (None for the site summary).
    ``images``: (content id, PNG, file name) of each inline image of a mail that shows
    several charts (several reports in one mail, reports.bundle)."""

    name: str  # file stem, e.g. physics-2026-11
    subject: str
    html: str
    text: str
    json: dict
    chart: bytes | None
    images: tuple[tuple[str, bytes, str], ...] = ()


def weeks_or_days(days: int) -> str:
    if days >= 14:
        return f"{days // 7} weeks"
    return f"{days} day" + ("" if days == 1 else "s")


def token_name(t) -> str:
    """A token as a PI knows it: its id and its owners."""
    return f"{t.id} ({owners(t.users)})"


def owners(users) -> str:
    return ", ".join(users) if users else "any user"


def decision(r: AccountReport) -> str:
    """The one line a PI decides from: does the balance last until the main token expires?"""
    p = r.projection
    rate = f"{fmt_hours(p.rate_per_day)} GPU-h/day"
    if p.main is None:
        return ("Nothing is left to spend on an active token: ask your GPU administrator "
                "for GPU-hours.")
    horizon = iso(p.horizon)
    if p.runs_short:
        return (f"Runs out on {iso(p.run_out)}, {weeks_or_days(p.gap_days)} before your main "
                f"token expires ({horizon}); about {fmt_hours(p.short)} GPU-h short at {rate}.")
    if p.rate_per_day == 0:
        return (f"Nothing was charged this month: the balance lasts until your main token "
                f"expires ({horizon}), {fmt_hours(p.spare)} GPU-h spare.")
    return (f"Lasts until your main token expires ({horizon}), about "
            f"{fmt_hours(p.spare)} GPU-h spare at {rate}.")


def decision_notes(r: AccountReport) -> list[str]:
    """What stands behind the decision line: the main token, what expires unused, what
    the projection leaves out."""
    p = r.projection
    out = []
    if p.main is not None:
        out.append(f"Main token {token_name(p.main)}: {fmt_hours(p.main.remaining)} GPU-h "
                   f"left, expires {iso(p.main.expires)}.")
    until = p.run_out if p.runs_short else p.horizon
    for loss in p.losses:
        if loss.token is p.main or (until is not None and loss.token.expires > until):
            continue
        out.append(f"Token {token_name(loss.token)} expires on {iso(loss.token.expires)} with "
                   f"about {fmt_hours(loss.amount)} GPU-h unused at this rate: ask your GPU "
                   "administrator to transfer it to a token that lasts longer before then.")
    if p.runs_short:
        out.append("For more GPU-hours, or to move them between tokens or accounts, ask your "
                   "GPU administrator (splits and transfers are theirs to run).")
    if p.unspendable > 0:
        out.append(f"{fmt_hours(p.unspendable)} GPU-h of the closing balance is on no active "
                   "token (the account pool, or tokens past their expiry) and is not counted.")
    return out


def chart_alt(r: AccountReport) -> str:
    first, last = r.series[0], r.series[-1]
    text = (f"Balance from {fmt_hours(first[1])} GPU-h on {iso(first[0])} to "
            f"{fmt_hours(last[1])} GPU-h on {iso(last[0])}")
    return text + "; " + exhaustion_text(r)


def exhaustion_text(r: AccountReport) -> str:
    p = r.projection
    if p.exhausted:
        return "nothing is left to spend"
    if p.run_out is None:
        return "it does not run out at the current rate"
    return f"it runs out on {iso(p.run_out)} at {fmt_hours(p.rate_per_day)} GPU-h/day"


def account_subject(r: AccountReport) -> str:
    return f"GPU budget {r.month}: {r.account} — {fmt_hours(r.statement.closing)} GPU-h left"


def account_context(r: AccountReport, chart_src: str | None = None) -> dict:
    """What the account templates (and the digest of several accounts) show of one report."""
    return {"r": r, "st": r.statement, "act": r.activity,
            "chart_src": chart_src or f"{r.account}-{r.month}.png", "chart_alt": chart_alt(r),
            "chart_width": WIDTH, "chart_height": HEIGHT, "exhaustion": exhaustion_text(r),
            "decision": decision(r), "notes": decision_notes(r),
            "statement_lines": statement_lines(r.statement)}


def chart_png(r: AccountReport) -> bytes:
    return burndown_png(r.series, r.month.start, r.month.end, r.projection)


def render_account(r: AccountReport, *, chart_src: str | None = None,
                   generated: datetime | None = None) -> Rendered:
    """``chart_src``: the image reference in the HTML (``cid:…`` for mail, a file name on disk)."""
    name = f"{r.account}-{r.month}"
    ctx = account_context(r, chart_src or f"{name}.png")
    ctx.update(generated=generated or r.as_of, subject=account_subject(r))
    env = environment()
    return Rendered(name, ctx["subject"], env.get_template("account.html").render(ctx),
                    env.get_template("account.txt").render(ctx), account_json(r), chart_png(r))


def site_subject(s: SiteReport) -> str:
    return (f"GPU site summary {s.month}: {fmt_hours(s.totals.charged - s.totals.refunded)} "
            f"GPU-h charged across {len(s.accounts)} accounts")


def render_site(s: SiteReport, *, generated: datetime | None = None) -> Rendered:
    ctx = {"s": s, "st": s.totals, "generated": generated or s.as_of,
           "subject": site_subject(s), "statement_lines": statement_lines(s.totals)}
    env = environment()
    return Rendered(f"site-{s.month}", ctx["subject"], env.get_template("site.html").render(ctx),
                    env.get_template("site.txt").render(ctx), site_json(s), None)


def statement_lines(st: Statement) -> list[tuple[str, str, int]]:
    """(label, sign, amount) rows of the statement, in reading order."""
    return [
        ("Minted", "+", st.minted),
        ("Received from other accounts (splits, transfers)", "+", st.received),
        ("Sent to other accounts (splits, transfers)", "−", st.sent),
        ("Expired (token remainders and forfeited holds)", "−", st.expired),
        ("Charged to jobs", "−", st.charged),
        ("Refunded", "+", st.refunded),
        ("Change in GPU-h held by running jobs", "−", st.held_change),
    ]


# -- JSON ------------------------------------------------------------------------------------


def _amounts(**values: int) -> dict:
    out = {}
    for k, v in values.items():
        out[k] = v
        out[f"{k}_hours"] = hours(v)
    return out


def _statement(st: Statement) -> dict:
    return _amounts(opening=st.opening, minted=st.minted, received=st.received, sent=st.sent,
                    expired=st.expired, charged=st.charged, refunded=st.refunded,
                    held_change=st.held_change, closing=st.closing, held_at_end=st.held_at_end)


def _usage(u: UsageLine) -> dict:
    return {"key": u.key, "jobs": u.jobs,
            **_amounts(charged=u.charged, returned=u.returned, refunded=u.refunded,
                       idle_cost=u.measure.idle_cost),
            "busy_ms": u.measure.busy_ms, "measured_held_ms": u.measure.held_ms,
            "idle_ms": u.measure.idle_ms, "efficiency": _ratio(u.measure.efficiency)}


def _ratio(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def account_json(r: AccountReport) -> dict:
    a = r.activity
    tally = {k: {"count": getattr(a, k).count, **_amounts(amount=getattr(a, k).amount)}
             for k in ("minted", "split_in", "split_out", "split_internal", "transfer_in",
                       "transfer_out", "transfer_internal", "expired", "revoked")}
    return {
        "account": r.account, "month": str(r.month), "as_of": r.as_of.isoformat(),
        "activity": r.had_activity, "statement": _statement(r.statement), "tokens_activity": tally,
        "tokens": [{"id": t.id, "parent": t.parent, "users": list(t.users), **_amounts(face=t.face, remaining=t.remaining,
                                                               held=t.held),
                    "expires": iso(t.expires), "status": t.status,
                    "expires_soon": t.expires_soon} for t in r.tokens],
        "by_user": [_usage(u) for u in r.by_user],
        "by_gpu_type": [_usage(u) for u in r.by_gpu_type],
        "by_tier": [_usage(u) for u in r.by_tier],
        "efficiency": {"busy_ms": r.measure.busy_ms, "measured_held_ms": r.measure.held_ms,
                       "held_ms": r.measure.held_all_ms,
                       "unmeasured_charges": r.measure.unmeasured_charges,
                       "ratio": _ratio(r.measure.efficiency),
                       "coverage": _ratio(r.measure.coverage)},
        "least_efficient_jobs": [{"job_id": j.job_id, "hold_id": j.hold_id, "user": j.user,
                                  "gpus": j.gpus, "gpu_type": j.gpu_type, "held_ms": j.held_ms,
                                  "busy_ms": j.busy_ms, "busy_ratio": _ratio(j.busy_ratio)}
                                 for j in r.worst_jobs],
        "burn_down": [{"time": t.isoformat(), **_amounts(balance=b)} for t, b in r.series],
        "projection": projection_json(r),
        "jobs": r.jobs, "settlements": r.settlements,
        "previous_month": {**_amounts(charged=r.previous_charged),
                           "settlements": r.previous_settlements,
                           "change": _ratio(r.change)},
        "returned": r.returned, "returned_hours": hours(r.returned),
    }


def projection_json(r: AccountReport) -> dict:
    p = r.projection
    return {**_amounts(rate_per_day=p.rate_per_day, spendable=p.spendable,
                       unspendable=p.unspendable, short=p.short, spare=p.spare),
            "exhaustion": iso(p.exhaustion), "exhausted": p.exhausted,
            "main_token": None if p.main is None else {
                "id": p.main.id, "users": list(p.main.users), "expires": iso(p.main.expires),
                **_amounts(remaining=p.main.remaining)},
            "runs_short": p.runs_short, "weeks_short": p.gap_days // 7,
            "days_short": p.gap_days,
            "expiring_unused": [{"token": x.token.id, "expires": iso(x.token.expires),
                                 **_amounts(amount=x.amount)} for x in p.losses],
            "decision": decision(r)}


def site_json(s: SiteReport) -> dict:
    return {
        "month": str(s.month), "as_of": s.as_of.isoformat(), "totals": _statement(s.totals),
        "jobs": s.jobs, **_amounts(returned=s.returned, previous_charged=s.previous_charged),
        "utilisation": {"busy_ms": s.measure.busy_ms, "measured_held_ms": s.measure.held_ms,
                        "held_ms": s.measure.held_all_ms, "ratio": _ratio(s.measure.efficiency),
                        "coverage": _ratio(s.measure.coverage)},
        "accounts": [{"account": r.account, "jobs": r.jobs, **_statement(r.statement),
                      "efficiency": _ratio(r.measure.efficiency), "change": _ratio(r.change)}
                     for r in s.accounts],
        "top_accounts": [r.account for r in s.top_accounts],
        "top_users": [{"account": a, "user": u, **_usage(line)} for a, u, line in s.top_users],
        "expiring": [{"token": e.id, "account": e.account, "users": list(e.users), **_amounts(remaining=e.remaining),
                      "expires": iso(e.expires)} for e in s.expiring],
    }
