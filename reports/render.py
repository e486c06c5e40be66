"""Turn the report model into HTML, plain text, JSON and the chart PNG (Jinja2 templates).

Number formats are the same everywhere: GPU-hours with three decimals
(``ledger.amounts.fmt_hours``), percentages with one decimal, ISO dates.
HTML is autoescaped, so account, user and token names cannot inject markup.
"""

from __future__ import annotations

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


def ljust(value, width: int) -> str:
    return str(value).ljust(width)


def rjust(value, width: int) -> str:
    return str(value).rjust(width)


@lru_cache(maxsize=1)
def environment() -> Environment:
    env = Environment(loader=FileSystemLoader(str(TEMPLATES)),
                      autoescape=select_autoescape(["html"], default_for_string=True),
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                      keep_trailing_newline=True)
    env.filters.update(gpuh=gpuh, signed=signed, ms_hours=ms_hours, pct=pct, iso=iso,
                       iso_time=iso_time, ljust=ljust, rjust=rjust)
    return env


@dataclass(frozen=True)
class Rendered:
    """One report in every form; ``chart`` is the PNG (None for the site summary)."""

    name: str  # file stem, e.g. physics-2026-11
    subject: str
    html: str
    text: str
    json: dict
    chart: bytes | None


def chart_alt(r: AccountReport) -> str:
    first, last = r.series[0], r.series[-1]
    text = (f"Balance from {fmt_hours(first[1])} GPU-h on {iso(first[0])} to "
            f"{fmt_hours(last[1])} GPU-h on {iso(last[0])}")
    return text + "; " + exhaustion_text(r)


def exhaustion_text(r: AccountReport) -> str:
    p = r.projection
    if p.exhausted:
        return "the balance is exhausted"
    if p.exhaustion is None:
        return "it does not run out at the current rate"
    return f"it runs out on {iso(p.exhaustion)} at {fmt_hours(p.rate_per_day)} GPU-h/day"


def account_subject(r: AccountReport) -> str:
    return f"GPU budget {r.month}: {r.account} — {fmt_hours(r.statement.closing)} GPU-h left"


def render_account(r: AccountReport, *, chart_src: str | None = None,
                   generated: datetime | None = None) -> Rendered:
    """``chart_src``: the image reference in the HTML (``cid:…`` for mail, a file name on disk)."""
    name = f"{r.account}-{r.month}"
    png = burndown_png(r.series, r.month.start, r.month.end, r.projection.rate_per_day,
                       r.projection.exhaustion)
    ctx = dict(r=r, st=r.statement, act=r.activity, generated=generated or r.as_of,
               chart_src=chart_src or f"{name}.png", chart_alt=chart_alt(r),
               chart_width=WIDTH, chart_height=HEIGHT, exhaustion=exhaustion_text(r),
               statement_lines=statement_lines(r.statement), subject=account_subject(r))
    env = environment()
    return Rendered(name, ctx["subject"], env.get_template("account.html").render(ctx),
                    env.get_template("account.txt").render(ctx), account_json(r), png)


def site_subject(s: SiteReport) -> str:
    return (f"GPU site summary {s.month}: {fmt_hours(s.totals.charged - s.totals.refunded)} "
            f"GPU-h charged across {len(s.accounts)} accounts")


def render_site(s: SiteReport, *, generated: datetime | None = None) -> Rendered:
    ctx = dict(s=s, st=s.totals, generated=generated or s.as_of, subject=site_subject(s),
               statement_lines=statement_lines(s.totals))
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
        "tokens": [{"id": t.id, "parent": t.parent, **_amounts(face=t.face, remaining=t.remaining,
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
        "projection": {**_amounts(rate_per_day=r.projection.rate_per_day),
                       "exhaustion": iso(r.projection.exhaustion),
                       "exhausted": r.projection.exhausted},
        "jobs": r.jobs, "settlements": r.settlements,
        "previous_month": {**_amounts(charged=r.previous_charged),
                           "settlements": r.previous_settlements,
                           "change": _ratio(r.change)},
        "returned": r.returned, "returned_hours": hours(r.returned),
    }


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
        "expiring": [{"token": e.id, "account": e.account, **_amounts(remaining=e.remaining),
                      "expires": iso(e.expires)} for e in s.expiring],
    }
