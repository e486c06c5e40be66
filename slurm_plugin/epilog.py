"""``gpuledger-epilog``: slurmd Epilog, once per job per node, as root.

Measures this node's part of the run (the NVML agent's figures, else held time:
``usage.node_usage``) and sends that record (``ledger.nodecharge``) to the daemon, which
prices and charges it to the hold the ledger links to the run (``settlement.charge_node``),
once per job, run and node. The node holds no database credentials and prices nothing.
The record is spooled first (``chargespool``): when the daemon cannot be reached it stays,
fsynced, and is delivered later by the next epilog here or ``gpuledger spool flush``.
It reads only its environment and the prolog's record — no Slurm command, nothing listed
per array — so its cost per task is flat. Closing the hold is whole-job work
(EpilogSlurmctld, else the reconciler). Always exits 0.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from ledger.amounts import fmt_hours
from ledger.daemon.nodedoor import node_client
from ledger.nodecharge import GpuUse, NodeCharge

from . import chargespool, jobstate, safefs, usage
from .hookenv import Hook, main_for

FLUSH_AFTER = 16  # spooled records an epilog delivers after its own
FLUSH_SECONDS = 2.0


def record(h: Hook, run: jobstate.NodeRun, now: float) -> NodeCharge:
    """This node's record of the run (what it measured; nothing priced)."""
    e = h.env
    held_ms = max(0, round((now - run.start) * 1000))
    gpu_usage, source = usage.node_usage(run.job_id, run.restart, run.gpus, held_ms,
                                         h.hooks.agent_socket, h.hooks.agent_spool,
                                         sluid=run.sluid)
    owners = list(dict.fromkeys([run.job_id] + ([run.array_job_id] if run.array_job_id
                                                else []) + e.owners))
    return NodeCharge(
        job_id=run.job_id, restart=run.restart, node=run.node, start=run.start,
        end=max(now, run.start), user=e.user or run.user, partition=e.partition,
        array_job_id=run.array_job_id, sluid=run.sluid, owners=tuple(owners[:4]),
        gpus=tuple(run.gpus),
        gpu_types={int(i): t for i, t in run.gpu_types.items() if t},
        gpu_shards={int(i): n for i, n in run.gpu_shards.items()},
        usage=tuple(GpuUse(index=u.index, held_ms=u.held_ms, busy_ms=u.busy_ms,
                           energy_mj=u.energy_mj, peak_mem_bytes=u.peak_mem_bytes,
                           measured=u.measured, gaps_ms=u.gaps_ms, uuid=u.uuid,
                           reason=u.reason, idle_ms=u.idle_ms, idle_max_ms=u.idle_max_ms)
                    for u in gpu_usage),
        source=source, cluster=h.config.cluster or None)


def epilog(h: Hook, client=None, now: float | None = None) -> None:
    now = time.time() if now is None else now
    try:
        run = jobstate.load(h.hooks.state_dir, h.env.job_id)
    except safefs.UnsafePath as exc:
        h.log.error("state dir refused (%s): run %d left for the reconciler", exc,
                    h.env.restart)
        return
    if run is None:
        # No prolog record (the prolog failed, or a second epilog by hand): the start of
        # this run is unknown here; sacct knows it, so the reconciler charges this node.
        h.log.warning("no prolog record on this node; left for the reconciler (run %d)",
                      h.env.restart)
        return
    rec = record(h, run, now)
    own = client is None
    client = client or node_client(h.hooks.daemon)
    try:
        deliver = _deliverer(client)
        try:
            out = chargespool.submit(h.hooks.spool_dir, rec, deliver)
        except safefs.UnsafePath as exc:  # no spool: one attempt, else the reconciler
            h.log.error("spool refused (%s): delivering without it", exc)
            out = chargespool.send(rec, deliver)
        jobstate.done(h.hooks.state_dir, run)
        _say(h.log, rec, out)
        if out.state in ("charged", "already"):
            _flush_others(h, deliver)
    finally:
        if own:
            client.close()


def _deliverer(client) -> Callable[[NodeCharge], dict]:
    return lambda rec: client.request("charge", record=rec.to_json())


def _say(log: logging.Logger, rec: NodeCharge, out: chargespool.Outcome) -> None:
    a = out.answer or {}
    if out.state == "charged":
        msg = ("charged %s GPU-h on hold %s (%d GPU(s), %s, run %d)",
               fmt_hours(int(a.get("amount", 0))), a.get("hold"), len(rec.usage), rec.source,
               rec.restart)
        note = a.get("note")
        log.log(logging.WARNING if note else logging.INFO, *msg)
        if note:
            log.warning("hold %s: %s", a.get("hold"), note)
    elif out.state == "already":
        note = a.get("note") or "already charged"
        level = logging.ERROR if note.startswith(("UNCOLLECTED", "REFUSED")) else logging.INFO
        log.log(level, "run %d on %s: %s; nothing charged", rec.restart, rec.node, note)
    elif out.state == "spooled":
        log.warning("daemon away (%s): charge kept in the spool for later (%s)", out.why,
                    rec.key)
    else:
        log.error("daemon rejected this node's charge (%s): kept in %s/", out.why,
                  chargespool.REJECTED)


def _flush_others(h: Hook, deliver) -> None:
    try:
        r = chargespool.flush(h.hooks.spool_dir, deliver, limit=FLUSH_AFTER,
                              deadline=time.monotonic() + FLUSH_SECONDS, logger=h.log)
    except (OSError, safefs.UnsafePath) as exc:
        h.log.error("spool flush failed: %s", exc)
        return
    if r.delivered or r.already or r.rejected:
        h.log.info("spool: %d delivered, %d charged before, %d rejected, %d left",
                   r.delivered, r.already, r.rejected, r.left)


main = main_for("gpuledger-epilog", epilog)
