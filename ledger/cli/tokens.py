"""Token commands: mint, inspect, list, split, revoke; transfer, refund, expire."""

from __future__ import annotations

import click

from ..amounts import fmt_hours, parse_hours
from ..amounts import hours as gpu_hours
from ..secretfile import SecretWriter
from ..tokens import Scopes
from ..views import TokenView
from . import objects
from .context import parse_when, pass_app, read_token_arg
from .output import echo_fields, echo_json, echo_table, json_output, table_output

# Left out, a scope does not restrict; given, it must name at least one (``--users ''`` is
# an error, never "everyone"): ledger.tokens.Scopes.parse decides, for every caller.
SCOPE_OPTIONS = (
    ("--users", "Comma-separated users allowed to spend it (leave out: any user)."),
    ("--gpu-types", "Comma-separated GPU types it pays for (leave out: any)."),
    ("--partitions", "Comma-separated partitions it is valid in (leave out: any)."),
    ("--clusters", "Comma-separated clusters it is valid on (leave out: any)."),
)
EXPIRES_HELP = ("Expiry: a date (valid through the end of that day, 23:59:59 UTC) or an ISO "
                "time. Default: 365 days after the start of validity.")


def scope_options(fn):
    for flag, text in reversed(SCOPE_OPTIONS):
        fn = click.option(flag, help=text)(fn)
    return fn


def out_options(fn):
    fn = click.option("--force", is_flag=True,
                      help="With --out: replace an existing file, keeping it as FILE.~N~.")(fn)
    return click.option("--out", type=click.Path(dir_okay=False),
                        help="Write the token to FILE (mode 0600; refuses an existing file "
                             "unless --force).")(fn)


def issue(fn, out: str | None, force: bool):
    """Run ``fn(publish)`` (a mint or a split): with ``--out`` the file is checked before and
    written inside the operation's transaction, so a file that cannot be written issues
    nothing and an issue that fails leaves no file."""
    if not out:
        return fn(None), None
    writer = SecretWriter(out, force=force)
    writer.prepare()
    try:
        return fn(writer.write), writer
    except BaseException:
        writer.undo()
        raise


def emit_token(token: str, view: TokenView, writer: SecretWriter | None, as_json: bool) -> None:
    if as_json:
        return echo_json({"token": None if writer else token,
                          "file": str(writer.path) if writer else None,
                          "backup": str(writer.backup) if writer and writer.backup else None,
                          "view": view.to_dict()})
    if writer is None:
        click.echo(token)
        return
    kept = f" (old file kept as {writer.backup})" if writer.backup else ""
    click.echo(f"{view.id} {fmt_hours(view.face)} GPU-h written to {writer.path}{kept}")


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
@click.option("--hours", required=True,
              help="Face value in GPU-hours at the reference rate (at most [limits] "
                   "max_token_hours).")
@click.option("--expires", help=EXPIRES_HELP)
@click.option("--not-before", help="Start of validity (ISO date or time; default: now).")
@scope_options
@click.option("--from-pool", is_flag=True,
              help="Pay it from the account's pool (revoked remainders), not new value.")
@click.option("--reason", help="Why (journaled).")
@click.option("--kid", help="Signing key (default: the newest active key here).")
@out_options
@json_output(objects.ISSUED)
@pass_app
def mint(app, account, hours, expires, not_before, users, gpu_types, partitions, clusters,
         from_pool, reason, kid, out, force, as_json):
    """Issue a new token and print it (or write it to --out). docs/tokens.md says how to
    hand it to its user."""
    amount = parse_hours(hours)
    exp, nbf = parse_when(expires, end_of_day=True), parse_when(not_before, end_of_day=False)
    scopes = Scopes.parse(users=users, gpu_types=gpu_types, partitions=partitions,
                          clusters=clusters)
    ledger = app.ledger
    (token, view), writer = issue(lambda publish: ledger.mint(
        account, amount, expires=exp, not_before=nbf, scopes=scopes, kid=kid, reason=reason,
        from_pool=from_pool, publish=publish), out, force)
    emit_token(token, view, writer, as_json)


@token_group.command("inspect")
@click.argument("token")
@json_output(objects.TOKEN)
@pass_app
def inspect(app, token, as_json):
    """Verify TOKEN (a token, an id or @FILE) and show its ledger state."""
    view = app.ledger.inspect(read_token_arg(token))
    if as_json:
        return echo_json(view.to_dict())
    show_token(view)


@token_group.command("list")
@click.option("--account", help="Only this account's tokens.")
@json_output("list of " + objects.TOKEN)
@table_output
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
@click.option("--expires", help="Expiry of the new token (not after the parent's; a date: "
                                 "through 23:59:59 UTC of that day).")
@click.option("--reason", help="Why (journaled).")
@out_options
@json_output(objects.ISSUED)
@pass_app
def split(app, token, hours, account, users, gpu_types, partitions, clusters, expires, reason,
          out, force, as_json):
    """Split value off TOKEN (token, id or @FILE) into a new token; scopes only narrow."""
    ref, amount = read_token_arg(token), parse_hours(hours)
    exp = parse_when(expires, end_of_day=True)
    scopes = Scopes.parse(users=users, gpu_types=gpu_types, partitions=partitions,
                          clusters=clusters)
    ledger = app.ledger
    (new, view), writer = issue(lambda publish: ledger.split(
        ref, amount, account=account, scopes=scopes, expires=exp, reason=reason,
        publish=publish), out, force)
    emit_token(new, view, writer, as_json)


@token_group.command("revoke")
@click.argument("token")
@click.option("--reason", required=True, help="Why (journaled; shown to whoever submits "
                                               "with it).")
@json_output(objects.TOKEN)
@pass_app
def revoke(app, token, reason, as_json):
    """Revoke TOKEN: no new holds; pending holds still settle; its remainder goes to its
    account's pool (`gpuledger account pool`)."""
    view = app.ledger.revoke(read_token_arg(token), reason)
    if as_json:
        return echo_json(view.to_dict())
    click.echo(f"Revoked {view.id}; pending holds still settle")


@click.command("transfer")
@click.option("--from", "src", required=True, help="Source token (id, token or @FILE).")
@click.option("--to", "dst", required=True, help="Destination token (id, token or @FILE).")
@click.option("--hours", required=True)
@click.option("--reason", required=True)
@json_output(objects.TRANSFER)
@pass_app
def transfer(app, src, dst, hours, reason, as_json):
    """Move GPU-hours from one token to another."""
    amount = parse_hours(hours)
    source, dest = app.ledger.transfer(read_token_arg(src), read_token_arg(dst), amount, reason)
    if as_json:
        return echo_json({"amount": amount, "hours": gpu_hours(amount), "from": source.to_dict(),
                          "to": dest.to_dict()})
    click.echo(f"Transferred {fmt_hours(amount)} GPU-h from {source.id} to {dest.id}")


@click.command("refund")
@click.argument("hold_id")
@click.option("--hours", required=True)
@click.option("--reason", required=True)
@click.option("--key", help="Idempotency key.")
@json_output(objects.HOLD)
@pass_app
def refund(app, hold_id, hours, reason, key, as_json):
    """Give back GPU-hours a hold was charged."""
    amount = parse_hours(hours)
    view = app.ledger.refund(hold_id, amount, reason, key=key)
    if as_json:
        return echo_json(view.to_dict())
    click.echo(f"Refunded {fmt_hours(amount)} GPU-h on {view.id} to token {view.token_id}")


@click.command("expire")
@json_output("list of " + objects.EXPIRED)
@pass_app
def expire(app, as_json):
    """Close expired tokens and move their remainders out."""
    done = app.ledger.expire()
    if as_json:
        return echo_json([{**d, "hours": gpu_hours(d["amount"])} for d in done])
    for d in done:
        click.echo(f"Expired {d['token_id']} ({d['account']}): {fmt_hours(d['amount'])} GPU-h")
    click.echo(f"{len(done)} token(s) expired")


COMMANDS = [token_group, transfer, refund, expire]
