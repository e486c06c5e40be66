"""``gpuledger reconcile``, ``job show`` and ``spool`` (registered by slurm_plugin.climain)."""

from __future__ import annotations

import sys

import click

from ledger.amounts import fmt_hours, fmt_rate
from ledger.cli import objects
from ledger.cli.context import pass_app
from ledger.cli.output import echo_fields, echo_json, echo_table, json_output, table_output
from ledger.cli.shapes import OBJECTS, obj
from ledger.errors import LedgerError

from .hookconf import hook_config
from .reader import CommandReader
from .slurm import SlurmError

DEBT = obj("debt", "A run of a deferred job that had no hold, charged to its account.", [
    ("job_id", "string", "Slurm job id"),
    ("restart", "integer", "its restart count"),
    ("account", "string?", "the account that owes it"),
    ("owed", "integer", f"its usage, {objects.AMOUNT}"),
    ("charged", "integer", f"charged so far, {objects.AMOUNT}"),
    ("unpaid", "integer", f"still owed, {objects.AMOUNT}"),
])
DECISION = obj("reconcile-decision", "What `reconcile` did with one pending hold, and why.", [
    ("hold", "string", "hold id"),
    ("job", "string?", "its Slurm job"),
    ("action", "string", "settle, void, wait (within the grace period), running, error"),
    ("why", "string", "the reason, in words"),
    ("charged", "integer", f"charged by this pass, {objects.AMOUNT}"),
])
RECONCILE = obj("reconcile", "What `reconcile` did (or, with --dry-run, would do).", [
    ("examined", "integer", "pending holds examined"),
    ("voided", "list of string", "holds released (their jobs never ran)"),
    ("settled", "list of string", "holds settled from Slurm's accounting"),
    ("charged_runs", "integer", "node runs charged"),
    ("charged", "integer", f"charged, {objects.AMOUNT}"),
    ("skipped_active", "integer", "holds whose jobs still run"),
    ("waiting", "integer", "holds with no job yet, within the grace period"),
    ("expired_tokens", "integer", "tokens expired"),
    ("debts", "list of debt", "deferred runs that had no hold"),
    ("errors", "list of string", "what went wrong (exit status 1)"),
    ("dry_run", "boolean", "whether nothing was changed"),
    ("holds", "list of reconcile-decision", "each pending hold examined: what and why"),
])
RECEIPT_RUN = obj("receipt-run", "One node's run of a job, as its settlement recorded it.", [
    ("job_id", "string?", "Slurm job id (array task: its own)"),
    ("node", "string?", "node"),
    ("restart", "integer?", "restart count"),
    ("key", "string", "the charge's idempotency key"),
    ("charged", "integer", f"charged, {objects.AMOUNT}"),
    ("source", "string?", "agent, spool, held or sacct"),
    ("policy", "string?", "allocated or measured"),
    ("held_ms", "integer?", "GPU-milliseconds held"),
    ("busy_ms", "integer?", "GPU-milliseconds busy (measured GPUs)"),
    ("measured", "boolean?", "every GPU measured"),
    ("measured_gpus", "integer", "GPUs measured"),
    ("energy_mj", "integer?", "energy, millijoules"),
    ("gpus", "list of object", "per GPU: the settlement's record (ledger/charge_record.py)"),
    ("created", "timestamp", "when it was charged"),
])
RECEIPT_TIER = obj("receipt-tier", "What one tier cost over a hold's GPUs.", [
    ("tier", "string", "the tier"),
    ("multiplier_ppm", "integer", "its multiplier, parts per million"),
    ("ms", "integer", "GPU-milliseconds held in it"),
    ("amount", "integer", f"charged for it, {objects.AMOUNT}"),
])
RECEIPT_ROW = obj("receipt-journal-row", "A journal row that moved a hold's value.", [
    ("seq", "integer", "row"),
    ("kind", "string", "reserve, resize, charge, release, void, refund"),
    ("amount", "integer", f"moved, {objects.AMOUNT}"),
    ("hash", "string?", "its chain hash"),
])
RECEIPT_HOLD = obj("receipt-hold", "A hold of the job: every field of [hold](#hold), and "
                                   "what it was charged per run.", [
    *[(f.name + ("?" if f.optional else ""), f.shape, f.doc)
      for f in OBJECTS[objects.HOLD].fields],
    ("charges", "list of receipt-run", "per node run"),
    ("policy", "string?", "charge policies used"),
    ("tiers", "list of receipt-tier", "what each tier cost"),
    ("busy_ms", "integer", "GPU-milliseconds busy, measured GPUs"),
    ("measured_held_ms", "integer", "GPU-milliseconds held, measured GPUs"),
    ("efficiency", "number?", "busy / held of the measured GPUs (null: none measured)"),
    ("energy_mj", "integer", "energy, millijoules"),
    ("journal", "list of receipt-journal-row", "the rows that moved its value"),
])
RECEIPT = obj("receipt", "A job's receipt.", [
    ("job", "string", "the job id asked for"),
    ("task", "string?", "the array task asked for"),
    ("cluster", "string?", "the cluster it was asked for (null: any)"),
    ("holds", "list of receipt-hold", "its holds"),
])


@click.command("reconcile")
@click.option("--dry-run", is_flag=True, help="Report what would change; change nothing.")
@click.option("--verbose", "-v", is_flag=True,
              help="Also a line for each hold left alone (still running, or within the grace "
                   "period).")
@json_output(RECONCILE)
@pass_app
def reconcile(app, dry_run, as_json, verbose):
    """Settle or release holds whose jobs are over; expire tokens. One line per hold it
    settles or voids (and, with --verbose, per hold it leaves), saying why."""
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

    try:
        summary = run_with_bar()
    except SlurmError as exc:  # Slurm could not be read: nothing was settled or voided
        raise LedgerError(f"reconcile stopped: cannot read Slurm ({exc}); a hold is settled "
                          "or voided only from what Slurm said, the next run retries") from None
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
        for d in summary.decisions:
            if d.action in ("wait", "running") and not verbose:
                continue
            verb = {"void": "void", "settle": "settle", "wait": "leave", "running": "leave",
                    "error": "error"}[d.action]
            if dry_run and d.action in ("void", "settle"):
                verb = f"would {verb}"
            amount = f", {fmt_hours(d.charged)} GPU-h charged" if d.action == "settle" else ""
            click.echo(f"{d.hold} (job {d.job or '-'}): {verb}{amount}: {d.why}")
        for e in summary.errors:
            click.echo(f"error: {e}", err=True)
    if summary.errors:
        raise SystemExit(1)


@click.group("job")
def job_group():
    """Receipts of Slurm jobs."""


@job_group.command("show")
@click.argument("job_id")
@click.option("--cluster", help="The cluster the job ran on (default: this config's "
              "cluster; clusters sharing a ledger reuse job ids).")
@json_output(RECEIPT)
@table_output
@pass_app
def show(app, job_id, cluster, as_json):
    """What job JOB_ID held, was charged and got back, per node and GPU."""
    from ledger.names import check_slurm_name

    from .receipt import receipt

    if cluster is not None:
        check_slurm_name(cluster, "cluster")
    data = receipt(app.ledger, job_id, CommandReader(use_pyslurm=False),
                   cluster or app.config.cluster)
    if as_json:
        return echo_json(data)
    for h in data["holds"]:
        eff = h["efficiency"]
        echo_fields([("job", h["job_id"] or job_id), ("cluster", h["cluster"] or "-"),
                     ("hold", h["id"]), ("state", h["state"]),
                     ("token", h["token_id"]), ("account", h["account"]), ("user", h["user"]),
                     ("held", f"{fmt_hours(h['amount'])} GPU-h"),
                     ("charged", f"{fmt_hours(h['charged'])} GPU-h"),
                     ("returned", f"{fmt_hours(h['returned'])} GPU-h"),
                     ("policy", h["policy"] or "-"),
                     ("efficiency", f"{eff:.1%} busy of held (measured GPUs)" if eff is not None
                      else "not measured"),
                     ("energy", f"{h['energy_mj'] / 3.6e9:.3f} kWh" if h["energy_mj"]
                      else "not measured"),
                     ("journal", " ".join(f"#{j['seq']}:{j['kind']}" for j in h["journal"]))]
                    + [("tier", f"{t['tier']} x{fmt_rate(t['multiplier_ppm'])}: "
                                f"{t['ms'] / 1000:.1f} GPU-s held, {fmt_hours(t['amount'])} GPU-h")
                       for t in h.get("tiers") or []])
        rows = []
        for c in h["charges"]:
            for g in c["gpus"] or [{}]:
                rows.append(_gpu_row(c, g))
        if rows:
            click.echo("")
            echo_table(["JOB", "RUN", "NODE", "SOURCE", "GPU", "TYPE", "RATE", "HELD S", "BUSY S",
                        "EFF", "ENERGY KJ", "PEAK GIB", "MEASURED", "CHARGED GPU-H"], rows)


def _gpu_row(c: dict, g: dict) -> list:
    """One receipt line: a GPU of one run on one node, as its settlement recorded it."""
    held, busy = g.get("held_ms") or 0, g.get("busy_ms")
    measured = g.get("measured")
    return [c["job_id"], c["restart"], c["node"], c["source"], g.get("index", "-"),
            g.get("gpu_type"), fmt_rate(g["rate_ppm"]) if g.get("rate_ppm") is not None else None,
            f"{held / 1000:.1f}", f"{busy / 1000:.1f}" if busy is not None else None,
            f"{busy / held:.0%}" if measured and busy is not None and held else None,
            f"{g['energy_mj'] / 1e6:.1f}" if g.get("energy_mj") else None,
            f"{g['peak_mem_bytes'] / 2**30:.1f}" if g.get("peak_mem_bytes") else None,
            {True: "yes", False: f"no: {g.get('reason') or 'unmeasured'}"}.get(measured),
            fmt_hours(g.get("charge") or 0)]


@click.group("spool")
def spool_group():
    """A node's charge records waiting for the daemon (see ``gpuledger-epilog``)."""


SPOOL = obj("spool", "A node's charge spool.", [
    ("spool_dir", "string", "the spool directory ([hooks] spool_dir)"),
    ("waiting", "list of string", "records waiting for delivery, oldest first"),
    ("rejected", "list of string", "records the daemon rejected (kept under rejected/)"),
])
FLUSHED = obj("spool-flush", "What `spool flush` delivered.", [
    ("delivered", "integer", "records charged now"),
    ("already", "integer", "records charged before (a retry)"),
    ("rejected", "integer", "records the daemon rejected (exit status 1)"),
    ("left", "integer", "records still waiting (the daemon away)"),
    ("why", "string", "why delivery stopped (empty: it did not)"),
])


@spool_group.command("list")
@json_output(SPOOL)
@pass_app
def spool_list(app, as_json):
    """Records waiting for delivery, oldest first, and those the daemon rejected."""
    from . import chargespool

    hooks = hook_config(app.config)
    waiting = chargespool.pending(hooks.spool_dir)
    rejected = chargespool.pending(hooks.spool_dir / chargespool.REJECTED)
    if as_json:
        echo_json({"spool_dir": str(hooks.spool_dir), "waiting": waiting, "rejected": rejected})
        return
    click.echo(f"{len(waiting)} waiting, {len(rejected)} rejected in {hooks.spool_dir}")
    for name in waiting:
        click.echo(f"waiting   {name}")
    for name in rejected:
        click.echo(f"rejected  {name}")


@spool_group.command("flush")
@click.option("--limit", type=click.IntRange(1), help="Deliver at most this many records.")
@json_output(FLUSHED)
@pass_app
def spool_flush(app, limit, as_json):
    """Deliver waiting records to the daemon (the node's timer runs this every minute).

    Exit 0 when the spool is empty or the daemon is away (the records stay for the next
    try); exit 1 when records were rejected (they are kept under rejected/)."""
    from dataclasses import asdict

    from ledger.daemon.nodedoor import node_client

    from . import chargespool

    hooks = hook_config(app.config)
    with node_client(hooks.daemon) as client:
        r = chargespool.flush(hooks.spool_dir,
                              lambda rec: client.request("charge", record=rec.to_json()),
                              limit=limit)
    if as_json:
        echo_json(asdict(r))
    else:
        click.echo(f"{r.delivered} delivered, {r.already} charged before, {r.rejected} "
                   f"rejected, {r.left} left" + (f" ({r.why})" if r.why else ""))
    if r.rejected:
        raise LedgerError(f"{r.rejected} record(s) rejected by the daemon, kept under "
                          f"{hooks.spool_dir / chargespool.REJECTED}")


def _agent():
    from .agent.cli import agent

    return agent


def _status():
    from .status import status

    return status


COMMANDS = [reconcile, job_group, spool_group, _agent(), _status()]
