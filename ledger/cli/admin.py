"""Admin commands: init, db, keys, account, rates, tiers, journal, verify."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from .. import config as config_mod
from .. import db, migrate
from ..amounts import fmt_hours, fmt_rate, parse_rate
from ..errors import ConfigError, InvalidInput
from .context import echo_fields, echo_json, echo_table, parse_when, pass_app


@click.command()
@click.option("--database", "url", help="Database URL (default: SQLite ledger.db next to the config).")
@click.option("--cluster", help="This cluster's name, for token cluster scopes.")
@pass_app
def init(app, url, cluster):
    """Write a config, create the ledger database and migrate it to the latest schema."""
    path = config_mod.config_path(app.config_path)
    if path.exists():
        existing = config_mod.load(path)
        if url and url != existing.database.url:
            raise ConfigError(f"{path} already exists with another database URL; edit it instead")
        click.echo(f"Config {path} exists; keeping it.")
    else:
        config_mod.write_new(path, url or "sqlite:///ledger.db", cluster)
        click.echo(f"Wrote {path}")
    app.__dict__.pop("config", None)
    submit = path.parent / config_mod.SUBMIT_CONF
    if not submit.exists():  # job_submit.lua's settings, from [submit]; never one already there
        config_mod.write_submit_conf(app.config, submit)
        click.echo(f"Wrote {submit} (from [submit]: `gpuledger config render-submit-conf` "
                   "after editing it)")
    ledger = app.ledger
    before, after = migrate.upgrade(ledger.engine)
    ledger.bootstrap()
    click.echo(f"Ledger {db.resolve_url(app.config).render_as_string(hide_password=True)} "
               f"at schema {after}" + ("" if before == after else f" (was {before or 'empty'})"))


@click.group("config")
def config_group():
    """The configuration file: check it, render job_submit.conf, print the reference."""


@config_group.command("check")
@pass_app
def config_check(app):
    """Read the configuration with every check; say where it is."""
    click.echo(f"{app.config.path}: ok")


@config_group.command("render-submit-conf")
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="Write this file (mode 0644, only when it changes) instead of printing.")
@click.option("--check", "dry_run", is_flag=True,
              help="With --output: say whether it would change, write nothing.")
@pass_app
def config_render_submit_conf(app, output, dry_run):
    """job_submit.conf (what job_submit.lua reads) from [submit], cluster and [daemon]."""
    if not output:
        click.echo(config_mod.render_submit_conf(app.config), nl=False)
        return
    changed = config_mod.write_submit_conf(app.config, Path(output), check=dry_run)
    if not changed:
        click.echo(f"{output} unchanged")
    else:
        click.echo(f"{output} {'would change' if dry_run else 'written'}")


@config_group.command("reference")
def config_reference():
    """Every section and key with its type, default and meaning (docs/config.md)."""
    click.echo(config_mod.reference(), nl=False)


@click.group("db")
def db_group():
    """Schema migrations."""


@db_group.command("upgrade")
@click.option("--revision", default="head", show_default=True)
@pass_app
def db_upgrade(app, revision):
    """Migrate the ledger database (Alembic)."""
    before, after = migrate.upgrade(app.ledger.engine, revision)
    app.ledger.bootstrap()
    click.echo(f"Schema {before or 'empty'} -> {after}" if before != after
               else f"Schema already at {after}")


@db_group.command("current")
@pass_app
def db_current(app):
    """Show the schema revision of the ledger database."""
    rev = migrate.current(app.ledger.engine)
    click.echo(f"{rev or 'empty'} (latest {migrate.head()})")
    for schema in migrate.components():
        rev = migrate.current(app.ledger.engine, schema)
        click.echo(f"{schema.name}: {rev or 'empty'} (latest {migrate.head(schema)})")


@click.group("keys")
def keys_group():
    """Ed25519 signing keys."""


@keys_group.command("generate")
@click.option("--kid", help="Key id (default: key-YYYYMMDD, or attest-YYYYMMDD).")
@click.option("--purpose", type=click.Choice(["token", "attest"]), default="token",
              show_default=True,
              help="token: mints tokens; attest: signs exported journal heads, nothing else.")
@pass_app
def keys_generate(app, kid, purpose):
    """Create a key: private file (0600) here, public half in the ledger."""
    from datetime import UTC, datetime

    prefix = "attest-" if purpose == "attest" else "key-"
    kid = kid or prefix + datetime.now(UTC).strftime("%Y%m%d")
    if purpose == "attest":
        public = app.ledger.generate_attest_key(kid)
    else:
        public = app.ledger.generate_key(kid)
    click.echo(f"Generated {purpose} key {kid} ({app.config.keys_dir / (kid + '.key')}), "
               f"public key {public}")


@keys_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="JSON output.")
@pass_app
def keys_list(app, as_json):
    """List keys known to the ledger (token-minting and head-attestation)."""
    keys = [{**k, "purpose": "token"} for k in app.ledger.list_keys()]
    keys += app.ledger.attest_keys()
    if as_json:
        return echo_json(keys)
    echo_table(["KID", "PURPOSE", "CREATED", "RETIRED", "PRIVATE HERE"],
               [[k["kid"], k["purpose"], k["created"][:19], (k["retired"] or "")[:19] or None,
                 "yes" if k["private_key_here"] else "no"] for k in keys])


@keys_group.command("retire")
@click.argument("kid")
@pass_app
def keys_retire(app, kid):
    """Retire a key: it signs nothing new; its tokens verify until they expire."""
    app.ledger.retire_key(kid)
    click.echo(f"Retired {kid}")


@click.group("account")
def account_group():
    """Slurm accounts (projects)."""


@account_group.command("create")
@click.argument("name")
@pass_app
def account_create(app, name):
    """Create an account."""
    app.ledger.create_account(name)
    click.echo(f"Created account {name}")


def _account_rows(app, name=None):
    from ..queries import account_views

    return account_views(app.ledger, name)


@account_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="JSON output.")
@pass_app
def account_list(app, as_json):
    """List accounts with their balances."""
    views = _account_rows(app)
    if as_json:
        return echo_json([v.to_dict() for v in views])
    echo_table(["ACCOUNT", "TOKENS", "REMAINING GPU-H", "HELD GPU-H", "POOL GPU-H"],
               [[v.name, v.tokens, fmt_hours(v.remaining), fmt_hours(v.held), fmt_hours(v.pool)]
                for v in views])


@account_group.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="JSON output.")
@pass_app
def account_show(app, name, as_json):
    """Show one account."""
    (v,) = _account_rows(app, name)
    if as_json:
        return echo_json(v.to_dict())
    echo_fields([("account", v.name), ("tokens", v.tokens),
                 ("remaining", f"{fmt_hours(v.remaining)} GPU-h"),
                 ("held", f"{fmt_hours(v.held)} GPU-h"), ("pool", f"{fmt_hours(v.pool)} GPU-h"),
                 ("report to", ", ".join(v.report_to))])


@account_group.command("set")
@click.argument("name")
@click.option("--report-to", help="Comma-separated report recipients (empty to clear).")
@pass_app
def account_set(app, name, report_to):
    """Change an account's settings."""
    if report_to is None:
        raise InvalidInput("nothing to set (try --report-to a@x,b@y)")
    emails = [e.strip() for e in report_to.split(",") if e.strip()]
    app.ledger.set_report_to(name, emails)
    click.echo(f"Account {name} reports go to {', '.join(emails) or 'nobody'}")


@click.group("rates")
def rates_group():
    """Charge rates per GPU type (reference GPU = 1.0)."""


@rates_group.command("set")
@click.argument("gpu_type")
@click.argument("rate")
@pass_app
def rates_set(app, gpu_type, rate):
    """Set the rate of GPU_TYPE ("default": types without a rate); applies to new holds.

    Requests that name no GPU type are held at the highest rate."""
    app.ledger.set_rate(gpu_type, parse_rate(rate))
    click.echo(f"Rate of {gpu_type} is {fmt_rate(parse_rate(rate))}")


@rates_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="JSON output.")
@pass_app
def rates_list(app, as_json):
    """List rates."""
    rates = app.ledger.rates()
    if as_json:
        return echo_json({k: fmt_rate(v) for k, v in rates.items()})
    echo_table(["GPU TYPE", "RATE"], [[k, fmt_rate(v)] for k, v in rates.items()])


@click.group("tiers")
def tiers_group():
    """Rate multipliers by partition, by QOS and by time of use (off-peak windows)."""


@tiers_group.command("set")
@click.argument("kind", type=click.Choice(["partition", "qos", "offpeak"]))
@click.argument("name")
@click.argument("multiplier")
@click.option("--zone", help="offpeak: the site's time zone (default UTC), e.g. Europe/Berlin.")
@pass_app
def tiers_set(app, kind, name, multiplier, zone):
    """Set a multiplier: `partition scavenger 0.25`, `qos premium 2`, `offpeak 22:00-06:00 0.5`.

    Applies to new holds and to settlements from now on; journaled like a rate. Off-peak
    windows are in the site's time zone and may not overlap."""
    ppm = parse_rate(multiplier)
    app.ledger.set_multiplier(kind, name, ppm, zone=zone)
    click.echo(f"{kind} {name} pays x{fmt_rate(ppm)}" + (f" ({zone or 'UTC'})"
                                                           if kind == "offpeak" else ""))


@tiers_group.command("unset")
@click.argument("kind", type=click.Choice(["partition", "qos", "offpeak"]))
@click.argument("name")
@pass_app
def tiers_unset(app, kind, name):
    """Remove a multiplier (that tier pays x1 again)."""
    app.ledger.unset_multiplier(kind, name)
    click.echo(f"{kind} {name} pays x1")


@tiers_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="JSON output.")
@pass_app
def tiers_list(app, as_json):
    """List multipliers."""
    t = app.ledger.tiers()
    rows = [["partition", k, fmt_rate(v), ""] for k, v in sorted(t.partition.items())] + \
        [["qos", k, fmt_rate(v), ""] for k, v in sorted(t.qos.items())] + \
        [["offpeak", w, fmt_rate(v), t.zone or ""] for w, v in t.offpeak]
    if as_json:
        return echo_json([dict(zip(["kind", "name", "multiplier", "zone"], r)) for r in rows])
    echo_table(["KIND", "NAME", "MULTIPLIER", "ZONE"], rows)


@click.command("journal")
@click.option("--since", help="ISO date or time.")
@click.option("--limit", type=int)
@click.option("--json", "as_json", is_flag=True, help="JSON output.")
@pass_app
def journal(app, since, limit, as_json):
    """Show journal rows (every movement and state change, in order)."""
    rows = app.ledger.journal(parse_when(since, end_of_day=False), limit)
    if as_json:
        return echo_json(rows)
    echo_table(["SEQ", "TIME", "KIND", "FROM", "TO", "GPU-H", "TOKEN", "HOLD", "REASON"],
               [[r["seq"], r["time"][:19], r["kind"], r["from"], r["to"],
                 fmt_hours(r["amount"]) if r["amount"] else None, r["token_id"], r["hold_id"],
                 r["reason"]] for r in rows])


@click.command("verify")
@click.option("--json", "as_json", is_flag=True, help="JSON output.")
@click.option("--export-head", type=click.Path(dir_okay=False),
              help="When all is well, write the chain head, signed with this host's "
                   "head-attestation key, to this file.")
@click.option("--against", "against", multiple=True, type=click.Path(dir_okay=False),
              help="An earlier exported head (repeatable): it must be a prefix of today's "
                   "chain and not older than an export already seen.")
@pass_app
def verify(app, as_json, export_head, against):
    """Check the journal's hash chain and every balance, hold, token and charge against it,
    in one consistent snapshot; exit 1 naming each problem (the first bad row first)."""
    from .. import attest

    heads = [(path, attest.read_head(path)) for path in against]
    if export_head:
        result, head = app.ledger.export_head(heads)
        if head is not None:
            tmp = Path(export_head + ".tmp")
            tmp.write_text(json.dumps(head, indent=2) + "\n")
            os.chmod(tmp, 0o644)
            os.replace(tmp, export_head)
    else:
        result = app.ledger.verify_journal(heads)
    if as_json:
        echo_json(result.to_dict())
    elif result.ok:
        click.echo(f"OK: {result.rows} journal rows, head {result.head_seq} {result.head_hash}"
                   + (f"; signed head written to {export_head}" if export_head else ""))
    if not result.ok:
        if not as_json:
            click.echo(f"Error: journal verification failed: {result.problem}", err=True)
            for more in result.problems[1:]:
                click.echo(f"  also: {more}", err=True)
        raise SystemExit(1)


COMMANDS = [init, config_group, db_group, keys_group, account_group, rates_group, tiers_group, journal,
            verify]
