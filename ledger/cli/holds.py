"""Hold commands: reserve, post, void, list, show."""

from __future__ import annotations

import click

from ..amounts import fmt_duration, fmt_hours
from ..errors import Refusal
from ..views import HoldRequest, HoldView
from . import objects
from .context import pass_app, read_token_arg
from .output import echo_fields, echo_json, echo_table, json_output, table_output


def show_hold(v: HoldView) -> None:
    echo_fields([("hold", v.id), ("state", v.state), ("token", v.token_id),
                 ("account", v.account), ("user", v.user), ("job", v.job_id),
                 ("request", f"{v.gpus} x {v.gpu_type or 'gpu'} x {fmt_duration(v.seconds)}"
                  + (f" x {v.tasks} tasks" if v.tasks > 1 else "")),
                 ("held", f"{fmt_hours(v.amount)} GPU-h"),
                 ("charged", f"{fmt_hours(v.charged)} GPU-h"),
                 ("returned", f"{fmt_hours(v.returned)} GPU-h")])


def refusal_dict(exc: Refusal) -> dict:
    """A refusal as the JSON contract prints it (the ``refusal`` object)."""
    d = exc.to_dict()
    return {"ok": False, **{k: d.get(k) for k in ("reason", "message", "token_id", "needed",
                                                    "available")}}


@click.group("hold")
def hold_group():
    """Two-phase holds (escrow) — what the Slurm hooks do, by hand."""


@hold_group.command("reserve")
@click.argument("token")
@click.option("--gpus", type=int, required=True)
@click.option("--gpu-type")
@click.option("--minutes", type=int, required=True, help="Time limit in minutes.")
@click.option("--tasks", type=int, default=1, show_default=True, help="Array tasks.")
@click.option("--user")
@click.option("--account")
@click.option("--partition")
@click.option("--key", help="Idempotency key.")
@json_output(objects.HOLD)
@pass_app
def reserve(app, token, gpus, gpu_type, minutes, tasks, user, account, partition, key, as_json):
    """Hold the cost of a job on TOKEN (token or @FILE)."""
    request = HoldRequest(gpus=gpus, seconds=minutes * 60 if minutes and minutes > 0 else minutes,
                          gpu_type=gpu_type, tasks=tasks, user=user, account=account,
                          partition=partition)
    try:
        view = app.ledger.reserve(read_token_arg(token), request, key)
    except Refusal as exc:
        if as_json:  # the numbers for scripts; the Error: line and exit 1 as always
            echo_json(refusal_dict(exc))
        raise
    if as_json:
        return echo_json(view.to_dict())
    show_hold(view)


@hold_group.command("post")
@click.argument("hold_id")
@click.option("--gpu-seconds", type=int, required=True, help="Charge, in reference GPU-seconds.")
@click.option("--key", help="Idempotency key.")
@json_output(objects.HOLD)
@pass_app
def post(app, hold_id, gpu_seconds, key, as_json):
    """Charge a hold and return the rest."""
    view = app.ledger.post(hold_id, gpu_seconds, key=key)
    if as_json:
        return echo_json(view.to_dict())
    show_hold(view)


@hold_group.command("void")
@click.argument("hold_id")
@click.option("--reason")
@json_output(objects.HOLD)
@pass_app
def void(app, hold_id, reason, as_json):
    """Cancel a hold, returning everything."""
    view = app.ledger.void(hold_id, reason=reason)
    if as_json:
        return echo_json(view.to_dict())
    click.echo(f"Hold {view.id} {view.state}; returned {fmt_hours(view.returned)} GPU-h")


@hold_group.command("list")
@click.option("--state", type=click.Choice(["pending", "posted", "voided"]))
@click.option("--token", "token_id")
@json_output("list of " + objects.HOLD)
@table_output
@pass_app
def list_(app, state, token_id, as_json):
    """List holds."""
    views = app.ledger.holds(state=state, token_id=token_id)
    if as_json:
        return echo_json([v.to_dict() for v in views])
    echo_table(["HOLD", "STATE", "TOKEN", "JOB", "USER", "HELD GPU-H", "CHARGED", "RETURNED"],
               [[v.id, v.state, v.token_id, v.job_id, v.user, fmt_hours(v.amount),
                 fmt_hours(v.charged), fmt_hours(v.returned)] for v in views])


@hold_group.command("show")
@click.argument("hold_id")
@json_output(objects.HOLD_DETAIL)
@pass_app
def show(app, hold_id, as_json):
    """Show a hold and its charges."""
    view = app.ledger.hold(hold_id)
    if as_json:
        return echo_json({**view.to_dict(), "charges": app.ledger.charges(hold_id)})
    show_hold(view)


COMMANDS = [hold_group]
