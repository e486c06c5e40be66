"""Admin commands: init, db, keys, account, rates, tiers, journal, verify."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .. import config as config_mod
from .. import configfiles, db, migrate
from ..amounts import fmt_hours, fmt_rate, parse_decimal, parse_hours, parse_rate
from ..amounts import hours as gpu_hours
from ..errors import ConfigError, InvalidInput
from ..stagedfile import StagedFile
from . import objects
from .context import parse_when, pass_app
from .output import (
    echo_fields,
    echo_json,
    echo_table,
    json_output,
    no_json,
    ppm_number,
    table_output,
)
from .shapes import obj

INIT = obj("init-result", "What `init` wrote and migrated.", [
    ("config", "string", "the config file"),
    ("config_written", "boolean", "false: it existed and was kept"),
    ("submit_conf", "string?", "job_submit.conf written beside it (null: one was there)"),
    ("database", "string", "the database URL, without password"),
    ("schema", "string", "the schema revision now"),
    ("previous", "string?", "the revision before (null: empty)"),
])
CONFIG_CHECK = obj("config-check", "A configuration that passed every check.", [
    ("path", "string", "the file read"),
    ("ok", "boolean", "true"),
])


@click.command()
@click.option("--database", "url", help="Database URL (default: SQLite ledger.db next to the config).")
@click.option("--cluster", help="This cluster's name, for token cluster scopes.")
@json_output(INIT)
@pass_app
def init(app, url, cluster, as_json):
    """Write a config, create the ledger database and migrate it to the latest schema."""
    say = (lambda text: None) if as_json else click.echo
    path = config_mod.config_path(app.config_path)
    written = not path.exists()
    if not written:
        existing = config_mod.load(path)
        if url and url != existing.database.url:
            raise ConfigError(f"{path} already exists with another database URL; edit it instead")
        say(f"Config {path} exists; keeping it.")
    else:
        configfiles.write_new(path, url or "sqlite:///ledger.db", cluster)
        say(f"Wrote {path}")
    app.__dict__.pop("config", None)
    submit = path.parent / config_mod.SUBMIT_CONF
    wrote_submit = not submit.exists()
    if wrote_submit:  # job_submit.lua's settings, from [submit]; never one already there
        configfiles.write_submit_conf(app.config, submit)
        say(f"Wrote {submit} (from [submit]: `gpuledger config render-submit-conf` "
            "after editing it)")
    ledger = app.ledger
    before, after = migrate.upgrade(ledger.engine)
    ledger.bootstrap()
    url_shown = db.resolve_url(app.config).render_as_string(hide_password=True)
    if as_json:
        return echo_json({"config": str(path), "config_written": written,
                          "submit_conf": str(submit) if wrote_submit else None,
                          "database": url_shown, "schema": after, "previous": before})
    say(f"Ledger {url_shown} at schema {after}"
        + ("" if before == after else f" (was {before or 'empty'})"))


@click.group("config")
def config_group():
    """The configuration file: check it, render job_submit.conf, print the reference."""


@config_group.command("check")
@json_output(CONFIG_CHECK)
@pass_app
def config_check(app, as_json):
    """Read the configuration with every check; say where it is."""
    if as_json:
        return echo_json({"path": str(app.config.path), "ok": True})
    click.echo(f"{app.config.path}: ok")


@config_group.command("render-submit-conf")
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="Write this file (mode 0644, only when it changes) instead of printing.")
@click.option("--check", "dry_run", is_flag=True,
              help="With --output: say whether it would change, write nothing.")
@no_json("prints or writes job_submit.conf itself")
@pass_app
def config_render_submit_conf(app, output, dry_run):
    """job_submit.conf (what job_submit.lua reads) from [submit], cluster and [daemon]."""
    if not output:
        click.echo(configfiles.render_submit_conf(app.config), nl=False)
        return
    changed = configfiles.write_submit_conf(app.config, Path(output), check=dry_run)
    if not changed:
        click.echo(f"{output} unchanged")
    else:
        click.echo(f"{output} {'would change' if dry_run else 'written'}")


@config_group.command("reference")
@no_json("prints docs/config.md (Markdown)")
def config_reference():
    """Every section and key with its type, default and meaning (docs/config.md)."""
    click.echo(configfiles.reference(), nl=False)


@click.group("db")
def db_group():
    """Schema migrations."""


@db_group.command("upgrade")
@click.option("--revision", default="head", show_default=True)
@json_output(objects.SCHEMA)
@pass_app
def db_upgrade(app, revision, as_json):
    """Migrate the ledger database (Alembic)."""
    migrate.check_revision(revision)  # before the database is opened
    before, after = migrate.upgrade(app.ledger.engine, revision)
    app.ledger.bootstrap()
    if as_json:
        return echo_json({"component": "ledger", "revision": after, "latest": migrate.head(),
                          "previous": before})
    click.echo(f"Schema {before or 'empty'} -> {after}" if before != after
               else f"Schema already at {after}")


@db_group.command("current")
@json_output("list of " + objects.SCHEMA)
@pass_app
def db_current(app, as_json):
    """Show the schema revision of the ledger database (and of each component's tables)."""
    engine = app.ledger.engine
    rows = [("ledger", migrate.current(engine), migrate.head())] + [
        (s.name, migrate.current(engine, s), migrate.head(s)) for s in migrate.components()]
    if as_json:
        return echo_json([{"component": c, "revision": r, "latest": h} for c, r, h in rows])
    for i, (component, rev, latest) in enumerate(rows):
        click.echo(("" if i == 0 else f"{component}: ") + f"{rev or 'empty'} (latest {latest})")


@click.group("keys")
def keys_group():
    """Ed25519 signing keys."""


@keys_group.command("generate")
@click.option("--kid", help="Key id (default: key-YYYYMMDD, or attest-YYYYMMDD).")
@click.option("--purpose", type=click.Choice(["token", "attest"]), default="token",
              show_default=True,
              help="token: mints tokens; attest: signs exported journal heads, nothing else.")
@json_output(objects.KEY)
@pass_app
def keys_generate(app, kid, purpose, as_json):
    """Create a key: private file (0600) here, public half in the ledger."""
    from datetime import UTC, datetime

    prefix = "attest-" if purpose == "attest" else "key-"
    kid = kid or prefix + datetime.now(UTC).strftime("%Y%m%d")
    if purpose == "attest":
        public = app.ledger.generate_attest_key(kid)
    else:
        public = app.ledger.generate_key(kid)
    if as_json:
        return echo_json(_key(app, kid))
    click.echo(f"Generated {purpose} key {kid} ({app.config.keys_dir / (kid + '.key')}), "
               f"public key {public}")


def _keys(app) -> list[dict]:
    keys = [{**k, "purpose": "token"} for k in app.ledger.list_keys()]
    return keys + app.ledger.attest_keys()


def _key(app, kid: str) -> dict:
    return next(k for k in _keys(app) if k["kid"] == kid)


@keys_group.command("list")
@json_output("list of " + objects.KEY)
@table_output
@pass_app
def keys_list(app, as_json):
    """List keys known to the ledger (token-minting and head-attestation)."""
    keys = _keys(app)
    if as_json:
        return echo_json(keys)
    echo_table(["KID", "PURPOSE", "CREATED", "RETIRED", "PRIVATE HERE"],
               [[k["kid"], k["purpose"], k["created"], k["retired"],
                 "yes" if k["private_key_here"] else "no"] for k in keys])


@keys_group.command("retire")
@click.argument("kid")
@json_output(objects.KEY)
@pass_app
def keys_retire(app, kid, as_json):
    """Retire a key: it signs nothing new; its tokens verify until they expire."""
    app.ledger.retire_key(kid)
    if as_json:
        return echo_json(_key(app, kid))
    click.echo(f"Retired {kid}")


@click.group("account")
def account_group():
    """Slurm accounts (projects)."""


@account_group.command("create")
@click.argument("name")
@json_output(objects.ACCOUNT)
@pass_app
def account_create(app, name, as_json):
    """Create an account."""
    app.ledger.create_account(name)
    if as_json:
        return echo_json(_account_rows(app, name)[0].to_dict())
    click.echo(f"Created account {name}")


def _account_rows(app, name=None):
    from ..queries import account_views

    return account_views(app.ledger, name)


@account_group.command("list")
@json_output("list of " + objects.ACCOUNT)
@table_output
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
@json_output(objects.ACCOUNT)
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
@json_output(objects.ACCOUNT)
@pass_app
def account_set(app, name, report_to, as_json):
    """Change an account's settings."""
    if report_to is None:
        raise InvalidInput("nothing to set (try --report-to a@x,b@y)")
    emails = [e.strip() for e in report_to.split(",") if e.strip()]
    app.ledger.set_report_to(name, emails)
    if as_json:
        return echo_json(_account_rows(app, name)[0].to_dict())
    click.echo(f"Account {name} reports go to {', '.join(emails) or 'nobody'}")


@account_group.group("pool")
def pool_group():
    """An account's pool: what its revoked tokens left. Mint a token from it
    (`gpuledger token mint --account NAME --hours H --from-pool`) or burn it."""


@pool_group.command("burn")
@click.argument("name")
@click.option("--hours", help="GPU-hours to burn (default: all of the pool).")
@click.option("--reason", required=True, help="Why (journaled).")
@click.option("--key", help="Idempotency key: a retry with it burns once.")
@json_output(objects.BURN)
@pass_app
def pool_burn(app, name, hours, reason, key, as_json):
    """Return pool value to the issuer (the reverse of a mint), journaled: it is gone from
    the account."""
    amount = parse_hours(hours) if hours is not None else None
    done = app.ledger.burn_pool(name, amount, reason, key=key)
    if as_json:
        return echo_json({**done, "hours": gpu_hours(done["amount"]),
                          "pool_hours": gpu_hours(done["pool"])})
    click.echo(f"Burned {fmt_hours(done['amount'])} GPU-h of account {name}'s pool; "
               f"{fmt_hours(done['pool'])} GPU-h left in it")


@click.group("rates")
def rates_group():
    """Charge rates per GPU type (reference GPU = 1.0)."""


def _is_zero(text: str) -> bool:
    try:
        return parse_decimal(text, "rate") == 0
    except InvalidInput:
        return False  # parse_rate says what is wrong with it


def _rate_change(gpu_type: str, now: int | None, before: int | None) -> dict:
    return {"gpu_type": gpu_type, "rate": ppm_number(now), "rate_ppm": now,
            "previous": ppm_number(before), "previous_ppm": before}


@rates_group.command("set", context_settings={"ignore_unknown_options": True})
@click.argument("gpu_type")
@click.argument("rate")
@json_output(objects.RATE_CHANGE)
@pass_app
def rates_set(app, gpu_type, rate, as_json):
    """Set the rate of GPU_TYPE ("default": types without a rate); applies to new holds.

    Requests that name no GPU type are held at the highest rate. Undo with `rates unset`
    (or set the old rate again: the change is shown)."""
    if gpu_type != gpu_type.lower():
        raise InvalidInput(f"GPU type {gpu_type!r}: Slurm matches GPU types without case and "
                           f"jobs are priced by the lowercase name; use {gpu_type.lower()!r}")
    if _is_zero(rate):
        raise InvalidInput(f"a rate of 0 would make {gpu_type} free; to remove its rate: "
                           f"gpuledger rates unset {gpu_type}")
    ppm = parse_rate(rate)
    before = app.ledger.set_rate(gpu_type, ppm)
    if as_json:
        return echo_json(_rate_change(gpu_type, ppm, before))
    change = (f"{fmt_rate(before)} -> {fmt_rate(ppm)}" if before is not None
              else f"{fmt_rate(ppm)} (new)")
    undo = (f"gpuledger rates set {gpu_type} {fmt_rate(before)}" if before is not None
            else f"gpuledger rates unset {gpu_type}")
    click.echo(f"Rate of {gpu_type}: {change}; applies to new holds (undo: {undo})")


@rates_group.command("unset")
@click.argument("gpu_type")
@json_output(objects.RATE_CHANGE)
@pass_app
def rates_unset(app, gpu_type, as_json):
    """Remove the rate of GPU_TYPE: it is priced at "default" again (untyped requests at the
    highest rate left)."""
    before = app.ledger.unset_rate(gpu_type)
    if as_json:
        return echo_json(_rate_change(gpu_type, None, before))
    click.echo(f"Rate of {gpu_type}: {fmt_rate(before)} -> unset (new holds price it at "
               "'default')")


@rates_group.command("list")
@json_output("list of " + objects.RATE)
@table_output
@pass_app
def rates_list(app, as_json):
    """List rates."""
    rates = app.ledger.rates()
    if as_json:
        return echo_json([{"gpu_type": k, "rate": ppm_number(v), "rate_ppm": v}
                          for k, v in rates.items()])
    echo_table(["GPU TYPE", "RATE"], [[k, fmt_rate(v)] for k, v in rates.items()])


@click.group("tiers")
def tiers_group():
    """Rate multipliers by partition, by QOS and by time of use (off-peak windows)."""


def _tier_change(kind, name, now, before, zone) -> dict:
    return {"kind": kind, "name": name, "multiplier": ppm_number(now), "multiplier_ppm": now,
            "previous": ppm_number(before), "previous_ppm": before,
            "zone": (zone or "UTC") if kind == "offpeak" else None}


@tiers_group.command("set", context_settings={"ignore_unknown_options": True})
@click.argument("kind", type=click.Choice(["partition", "qos", "offpeak"]))
@click.argument("name")
@click.argument("multiplier")
@click.option("--zone", help="offpeak: the site's time zone (default UTC), e.g. Europe/Berlin.")
@json_output(objects.TIER_CHANGE)
@pass_app
def tiers_set(app, kind, name, multiplier, zone, as_json):
    """Set a multiplier: `partition scavenger 0.25`, `qos premium 2`, `offpeak 22:00-06:00 0.5`.

    Applies to new holds and to settlements from now on; journaled like a rate. Off-peak
    windows are in the site's time zone and may not overlap."""
    ppm = parse_rate(multiplier, "multiplier")
    before = app.ledger.set_multiplier(kind, name, ppm, zone=zone)
    if as_json:
        return echo_json(_tier_change(kind, name, ppm, before, zone))
    click.echo(f"{kind} {name} pays x{fmt_rate(ppm)}"
               + (f" (was x{fmt_rate(before)})" if before is not None else "")
               + (f" ({zone or 'UTC'})" if kind == "offpeak" else ""))


@tiers_group.command("unset")
@click.argument("kind", type=click.Choice(["partition", "qos", "offpeak"]))
@click.argument("name")
@json_output(objects.TIER_CHANGE)
@pass_app
def tiers_unset(app, kind, name, as_json):
    """Remove a multiplier (that tier pays x1 again)."""
    before = app.ledger.unset_multiplier(kind, name)
    if as_json:
        return echo_json(_tier_change(kind, name, None, before, None) | {"zone": None})
    click.echo(f"{kind} {name} pays x1 (was x{fmt_rate(before)})")


@tiers_group.command("list")
@json_output("list of " + objects.TIER)
@table_output
@pass_app
def tiers_list(app, as_json):
    """List multipliers."""
    t = app.ledger.tiers()
    rows = [("partition", k, v, None) for k, v in sorted(t.partition.items())] + \
        [("qos", k, v, None) for k, v in sorted(t.qos.items())] + \
        [("offpeak", w, v, t.zone or "UTC") for w, v in t.offpeak]
    if as_json:
        return echo_json([{"kind": k, "name": n, "multiplier": ppm_number(v), "multiplier_ppm": v,
                           "zone": z} for k, n, v, z in rows])
    echo_table(["KIND", "NAME", "MULTIPLIER", "ZONE"],
               [[k, n, fmt_rate(v), z] for k, n, v, z in rows])


def detail(row: dict) -> str | None:
    """A state change in words (rates, tiers, accounts, keys): ``h100: 1 -> 2``."""
    d, kind = row["data"], row["kind"]

    def rate(ppm):
        return "unset" if ppm is None else fmt_rate(ppm)

    if kind == "rate_set":
        return f"{d.get('gpu_type')}: {rate(d.get('previous_ppm'))} -> {rate(d.get('rate_ppm'))}"
    if kind == "rate_unset":
        return f"{d.get('gpu_type')}: {rate(d.get('previous_ppm'))} -> unset"
    if kind in ("multiplier_set", "multiplier_unset"):
        after = "x" + rate(d.get("multiplier_ppm")) if kind == "multiplier_set" else "unset"
        before = "x" + rate(d.get("previous_ppm")) if d.get("previous_ppm") else "x1"
        zone = f" ({d['zone']})" if d.get("zone") else ""
        return f"{d.get('kind')} {d.get('name')}: {before} -> {after}{zone}"
    if kind == "account_update" and "report_to" in d:
        return "report to " + (", ".join(d["report_to"]) or "nobody")
    if kind in ("key_add", "key_retire") or d.get("kid") and not row["amount"]:
        return f"key {d.get('kid')}"
    if kind == "mint" and d.get("from_pool"):
        return f"from the pool of {row['account']}"
    return None


@click.command("journal")
@click.option("--since", help="ISO date or time.")
@click.option("--limit", type=click.IntRange(min=1), help="Only the newest N rows.")
@json_output("list of " + objects.JOURNAL_ROW)
@table_output
@pass_app
def journal(app, since, limit, as_json):
    """Show journal rows (every movement and state change), oldest first; with --limit,
    the newest N."""
    rows = [{**r, "detail": detail(r)}
            for r in app.ledger.journal(parse_when(since, end_of_day=False), limit)]
    if as_json:
        return echo_json(rows)
    echo_table(["SEQ", "TIME", "KIND", "FROM", "TO", "GPU-H", "TOKEN", "HOLD", "DETAIL",
                "REASON"],
               [[r["seq"], r["time"], r["kind"], r["from"], r["to"],
                 fmt_hours(r["amount"]) if r["amount"] else None, r["token_id"], r["hold_id"],
                 r["detail"], r["reason"]] for r in rows])


@click.command("verify")
@json_output(objects.VERIFY)
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
        # the file is created (and its text written) before the export is journaled:
        # an unwritable path records nothing
        staged = StagedFile(export_head, 0o644).open()
        try:
            result, head = app.ledger.export_head(
                heads, publish=lambda h: staged.write(json.dumps(h, indent=2) + "\n"))
            if head is not None:
                staged.commit()
        finally:
            staged.discard()
    else:
        result = app.ledger.verify_journal(heads)
    if as_json:
        echo_json({**result.to_dict(),
                   **({"head_file": export_head} if export_head and result.ok else {})})
    elif result.ok:
        click.echo(f"OK: {result.rows} journal rows, head {result.head_seq} {result.head_hash}"
                   + (f"; signed head written to {export_head}" if export_head else ""))
    if not result.ok:
        if not as_json:
            click.echo(f"Error: journal verification failed: {result.problem}", err=True)
            for more in result.problems[1:]:
                click.echo(f"  also: {more}", err=True)
        raise SystemExit(1)


@click.command("json-reference")
@no_json("prints docs/cli-json.md (Markdown)")
@click.pass_context
def json_reference(ctx):
    """The JSON contract of every command (docs/cli-json.md)."""
    from .jsondoc import reference

    click.echo(reference(ctx.find_root().command), nl=False)


COMMANDS = [init, config_group, db_group, keys_group, account_group, rates_group, tiers_group,
            journal, verify, json_reference]
