"""Several reports in one mail: a recipient of more than one account's report (and an
admin who is also a PI) gets one message a month with all of them, each with its chart.

The sections are the very bodies of the single reports (``_account_body.*`` and
``_site_body.*``), one after the other; the subject names every account.
"""

from __future__ import annotations

from datetime import datetime

from markupsafe import Markup

from ledger.amounts import fmt_hours

from .figures import AccountReport, SiteReport
from .mail import chart_cid
from .period import Month
from .render import Rendered, account_context, account_json, chart_png, environment, site_json
from .render import statement_lines as _statement_lines

Part = AccountReport | SiteReport


def bundle_subject(parts: list[Part], month: Month) -> str:
    accounts = [p for p in parts if isinstance(p, AccountReport)]
    left = ", ".join(f"{r.account} {fmt_hours(r.statement.closing)}" for r in accounts)
    site = any(isinstance(p, SiteReport) for p in parts)
    text = f"GPU budget {month}: {len(accounts)} accounts" if len(accounts) != 1 \
        else f"GPU budget {month}: {accounts[0].account}"
    if accounts:
        text += f" — {left} GPU-h left"
    return text + (" — and the site summary" if site else "")


def render_bundle(parts: list[Part], month: Month, *, sender: str,
                  generated: datetime) -> Rendered:
    """One message's forms for ``parts``; each account's chart is an inline image with its
    own content id."""
    env = environment()
    html, text, images, data = [], [], [], []
    for p in parts:
        if isinstance(p, AccountReport):
            name = f"{p.account}-{month}"
            cid = chart_cid(name, sender)
            ctx = account_context(p, f"cid:{cid}")
            images.append((cid, chart_png(p), f"{name}.png"))
            data.append(account_json(p))
            body = "_account_body"
        else:
            ctx = {"s": p, "st": p.totals, "statement_lines": _statement_lines(p.totals)}
            data.append(site_json(p))
            body = "_site_body"
        html.append(Markup(env.get_template(f"{body}.html").render(ctx)))
        text.append(env.get_template(f"{body}.txt").render(ctx).rstrip("\n"))
    names = [p.account for p in parts if isinstance(p, AccountReport)]
    intro = (f"Your GPU budget reports for {month.title()}: "
             + ", ".join(names + (["the site summary"] if len(names) < len(parts) else []))
             + ", one after the other.")
    subject = bundle_subject(parts, month)
    ctx = {"parts": html, "intro": intro, "subject": subject, "generated": generated}
    stem = "+".join(names) or "site"
    if len(stem) > 100:  # a file name for the .eml of a dry run
        stem = f"{len(names)}-accounts"
    return Rendered(f"reports-{stem}-{month}", subject,
                    env.get_template("bundle.html").render(ctx),
                    env.get_template("bundle.txt").render({**ctx, "parts": text}),
                    {"month": str(month), "reports": data}, None, tuple(images))
