"""Token commands: mint, inspect, list, split, revoke; transfer, refund, expire."""

from __future__ import annotations

import os

import click

from ..amounts import fmt_hours, parse_hours
from ..errors import InvalidInput
from ..tokens import Scopes
from ..views import TokenView
from .context import echo_fields, echo_json, echo_table, parse_when, pass_app, read_token_arg

# Left out, a scope does not restrict; given, it must name at least one (``--users ''`` is
# an error, never "everyone"): ledger.tokens.Scopes.parse decides, for every caller.
SCOPE_OPTIONS = (
    ("--users", "Comma-separated users allowed to spend it (leave out: any user)."),
    ("--gpu-types", "Comma-separated GPU types it pays for (leave out: any)."),
    ("--partitions", "Comma-separated partitions it is valid in (leave out: any)."),
    ("--clusters", "Comma-separated clusters it is valid on (leave out: any)."),
)


def scope_options(fn):
    for flag, text in reversed(SCOPE_OPTIONS):
        fn = click.option(flag, help=text)(fn)
    return fn


def write_secret(path: str, token: str) -> None:
    """Write a token file readable by its owner only (0600), replacing any old one."""
    tmp = f"{path}.tmp{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(token + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        raise InvalidInput(f"cannot write {path}: {exc.strerror}") from None


def emit_token(token: str, view: TokenView, out: str | None) -> None:
    if out:
        write_secret(out, token)
        click.echo(f"{view.id} {fmt_hours(view.face)} GPU-h written to {out}")
    else:
        click.echo(token)


def show_token(view: TokenView) -> None:
    scopes = "; ".join(f"{k}={','.join(v)}" for k, v in view.scopes.items()) or "any"
    d = view.to_dict()
    echo_fields([("id", view.id), ("account", view.account), ("status", view.status),
                 ("face", f"{fmt_hours(view.face)} GPU-h"),
                 ("remaining", f"{fmt_hours(view.remaining)} GPU-h"),
                 ("held", f"{fmt_hours(view.held)} GPU-h"),
                 ("not before", d["not_before"]), ("expires", d["expires"]),
                 ("scopes", scopes), ("parent", view.parent), ("key", view.kid),
                 ("reason", view.status_reason)])


@click.group("token")
def token_group():
    """Signed GPU-hour tokens."""


@token_group.command("mint")
@click.option("--account", required=True, help="Slurm account the token belongs to.")
@click.option("--hours", required=True, help="Face value in GPU-hours at the reference rate.")
@click.option("--expires", help="Expiry date (ISO; a date means the end of that day, UTC).")
@click.option("--not-before", help="Start of validity (ISO date or time).")
@scope_options
@click.option("--kid", help="Signing key (default: the newest active key here).")
@click.option("--out", type=click.Path(dir_okay=False), help="Write the token to FILE (0600).")
@pass_app
def mint(app, account, hours, expires, not_before, users, gpu_types, partitions, clusters, kid,
         out):
    """Issue a new token and print it."""
    token, view = app.ledger.mint(
        account, parse_hours(hours), expires=parse_when(expires, end_of_day=True),
        not_before=parse_when(not_before, end_of_day=False),
        scopes=Scopes.parse(users=users, gpu_types=gpu_types, partitions=partitions,
                            clusters=clusters), kid=kid)
    emit_token(token, view, out)


@token_group.command("inspect")
@click.argument("token")
@click.option("--json", "as_json", is_flag=True, help="JSON output.")
@pass_app
def inspect(app, token, as_json):
    """Verify TOKEN (a token, an id or @FILE) and show its ledger state."""
    view = app.ledger.inspect(read_token_arg(token))
    if as_json:
        return echo_json(view.to_dict())
    show_token(view)


@token_group.command("list")
@click.option("--account", help="Only this account's tokens.")
@click.option("--json", "as_json", is_flag=True, help="JSON output.")
@pass_app
def list_(app, account, as_json):
    """List tokens."""
    views = app.ledger.list_tokens(account)
    if as_json:
        return echo_json([v.to_dict() for v in views])
    echo_table(["TOKEN", "ACCOUNT", "STATUS", "FACE GPU-H", "REMAINING", "HELD", "EXPIRES"],
               [[v.id, v.account, v.status, fmt_hours(v.face), fmt_hours(v.remaining),
                 fmt_hours(v.held), v.to_dict()["expires"][:10]] for v in views])


@token_group.command("split")
@click.argument("token")
@click.option("--hours", required=True, help="GPU-hours to move into the new token.")
@click.option("--account", help="Account of the new token (default: the parent's).")
@scope_options
@click.option("--expires", help="Expiry of the new token (not after the parent's).")
@click.option("--out", type=click.Path(dir_okay=False), help="Write the token to FILE (0600).")
@pass_app
def split(app, token, hours, account, users, gpu_types, partitions, clusters, expires, out):
    """Split value off TOKEN (token, id or @FILE) into a new token; scopes only narrow."""
    new, view = app.ledger.split(
        read_token_arg(token), parse_hours(hours), account=account,
        scopes=Scopes.parse(users=users, gpu_types=gpu_types, partitions=partitions,
                            clusters=clusters), expires=parse_when(expires, end_of_day=True))
    emit_token(new, view, out)


@token_group.command("revoke")
@click.argument("token")
@click.option("--reason", required=True, help="Why (journaled).")
@pass_app
def revoke(app, token, reason):
    """Revoke TOKEN: no new holds; its remainder returns to its account."""
    view = app.ledger.revoke(read_token_arg(token), reason)
    click.echo(f"Revoked {view.id}; pending holds still settle")


@click.command("transfer")
@click.option("--from", "src", required=True, help="Source token (id, token or @FILE).")
@click.option("--to", "dst", required=True, help="Destination token (id, token or @FILE).")
@click.option("--hours", required=True)
@click.option("--reason", required=True)
@pass_app
def transfer(app, src, dst, hours, reason):
    """Move GPU-hours from one token to another."""
    amount = parse_hours(hours)
    app.ledger.transfer(read_token_arg(src), read_token_arg(dst), amount, reason)
    click.echo(f"Transferred {fmt_hours(amount)} GPU-h")


@click.command("refund")
@click.argument("hold_id")
@click.option("--hours", required=True)
@click.option("--reason", required=True)
@click.option("--key", help="Idempotency key.")
@pass_app
def refund(app, hold_id, hours, reason, key):
    """Give back GPU-hours a hold was charged."""
    amount = parse_hours(hours)
    view = app.ledger.refund(hold_id, amount, reason, key=key)
    click.echo(f"Refunded {fmt_hours(amount)} GPU-h on {view.id} to token {view.token_id}")


@click.command("expire")
@click.option("--json", "as_json", is_flag=True, help="JSON output.")
@pass_app
def expire(app, as_json):
    """Close expired tokens and move their remainders out."""
    done = app.ledger.expire()
    if as_json:
        return echo_json(done)
    for d in done:
        click.echo(f"Expired {d['token_id']} ({d['account']}): {fmt_hours(d['amount'])} GPU-h")
    click.echo(f"{len(done)} token(s) expired")


COMMANDS = [token_group, transfer, refund, expire]
