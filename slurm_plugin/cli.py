"""``gpuledger reconcile`` and ``gpuledger job show`` (registered by ledger.cli when present)."""

from __future__ import annotations

import sys

import click

from ledger.amounts import fmt_hours
from ledger.cli.context import echo_fields, echo_json, echo_table, pass_app

from .hookconf import hook_config
from .slurm import CommandReader


@click.command("reconcile")
@click.option("--dry-run", is_flag=True, help="Report what would change; change nothing.")
@click.option("--json", "as_json", is_flag=True, help="JSON summary.")
@pass_app
def reconcile(app, dry_run, as_json):
    """Settle or release holds whose jobs are over; expire tokens."""
    from .reconcile import Reconciler

    hooks = hook_config(app.config)
    rec = Reconciler(app.ledger, CommandReader(), grace_s=hooks.grace_s,
                     lookback_days=hooks.lookback_days)

    def progress(items):
        if as_json or not sys.stderr.isatty():
            return items
        return click.progressbar(items, label="holds", file=sys.stderr)

    def run_with_bar():
        def wrapped(items):
            bar = progress(items)
            if hasattr(bar, "__enter__"):
                with bar as it:
                    yield from it
            else:
                yield from bar
        return rec.run(dry_run=dry_run, progress=wrapped)

    summary = run_with_bar()
    if as_json:
        echo_json(summary.to_dict())
    else:
        prefix = "would " if dry_run else ""
        click.echo(f"{summary.examined} pending hold(s): {prefix}settle {len(summary.settled)}, "
                   f"{prefix}void {len(summary.voided)}, {summary.skipped_active} still "
                   f"running, {summary.waiting} within the grace period; "
                   f"{prefix}charge {summary.charged_runs} node run(s), "
                   f"{fmt_hours(summary.charged)} GPU-h; expired {summary.expired_tokens} "
                   f"token(s)")
        for e in summary.errors:
            click.echo(f"error: {e}", err=True)
    if summary.errors:
        raise SystemExit(1)


@click.group("job")
def job_group():
    """Receipts of Slurm jobs."""


@job_group.command("show")
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True, help="JSON output.")
@pass_app
def show(app, job_id, as_json):
    """What job JOB_ID held, was charged and got back, per node and GPU."""
    from .receipt import receipt

    data = receipt(app.ledger, job_id, CommandReader(use_pyslurm=False))
    if as_json:
        return echo_json(data)
    for h in data["holds"]:
        echo_fields([("job", h["job_id"] or job_id), ("hold", h["id"]), ("state", h["state"]),
                     ("token", h["token_id"]), ("account", h["account"]), ("user", h["user"]),
                     ("held", f"{fmt_hours(h['amount'])} GPU-h"),
                     ("charged", f"{fmt_hours(h['charged'])} GPU-h"),
                     ("returned", f"{fmt_hours(h['returned'])} GPU-h"),
                     ("journal", " ".join(f"#{j['seq']}:{j['kind']}" for j in h["journal"]))])
        rows = []
        for c in h["charges"]:
            gpus = c["gpus"] or [{}]
            for g in gpus:
                rows.append([c["job_id"], c["restart"], c["node"], c["source"],
                             g.get("index", "-"), g.get("gpu_type"),
                             f"{(g.get('held_ms') or 0) / 1000:.1f}",
                             f"{(g.get('busy_ms') or 0) / 1000:.1f}" if "busy_ms" in g else None,
                             fmt_hours(g.get("charge") or 0)])
        if rows:
            click.echo("")
            echo_table(["JOB", "RUN", "NODE", "SOURCE", "GPU", "TYPE", "HELD S", "BUSY S",
                        "CHARGED GPU-H"], rows)


def _agent():
    from .agent.cli import agent

    return agent


COMMANDS = [reconcile, job_group, _agent()]
