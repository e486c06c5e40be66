"""``gpuledger-epilog``: slurmd Epilog, once per job per node, as root.

Computes this node's usage of the run (NVML agent, else held time; ``usage.node_usage``) and
charges it under ``<hold>:<sluid>:<node>`` (Slurm 25.11+, the SLUID the prolog recorded) or
``<hold>:<job>:<restart>:<node>`` to the hold the ledger links to this run of the job
(``ledger.settlement.run_hold``; PrologSlurmctld wrote the link). It reads only its
environment and the prolog's record — no Slurm command, nothing listed per array — so its
cost per task is flat.
Closing the hold is whole-job work: EpilogSlurmctld does it (``slurm_plugin.ctld``), the
reconciler otherwise. Always exits 0; what fails is settled later by ``gpuledger reconcile``.
"""

from __future__ import annotations

import logging
import time

from ledger import settlement
from ledger.amounts import fmt_hours
from ledger.charging import charge_gpus
from ledger.service import Ledger

from . import jobstate, safefs, usage
from .hookenv import Hook, main_for


def epilog(h: Hook, ledger: Ledger | None = None, now: float | None = None) -> None:
    e = h.env
    now = time.time() if now is None else now
    try:
        run = jobstate.load(h.hooks.state_dir, e.job_id)
    except safefs.UnsafePath as exc:
        h.log.error("state dir refused (%s): run %d left for the reconciler", exc, e.restart)
        return
    if run is None:
        # No prolog record (the prolog failed, or a second epilog by hand): the start of
        # this run is unknown here; sacct knows it, so the reconciler charges this node.
        h.log.warning("no prolog record on this node; left for the reconciler (run %d)",
                      e.restart)
        return
    ledger = ledger or Ledger.from_config(h.config)
    owners = list(dict.fromkeys([run.job_id] + ([run.array_job_id] if run.array_job_id
                                                 else []) + e.owners))
    hold = settlement.run_hold(ledger, run.job_id, run.restart, owners, user=e.user or run.user,
                           sluid=run.sluid)
    if hold is None:
        other = [x for o in owners for x in ledger.holds(job_id=o)]
        if other:
            h.log.error("hold %s of job %s belongs to user %s, not %s: not charged",
                        other[-1].id, e.job_id, other[-1].user, e.user or run.user)
        else:
            h.log.info("no hold bound to job %s; nothing charged here",
                       "/".join(owners))
        jobstate.done(h.hooks.state_dir, run)
        return
    held_ms = round((now - run.start) * 1000)
    gpu_usage, source = usage.node_usage(run.job_id, run.restart, run.gpus, held_ms,
                                         h.hooks.agent_socket, h.hooks.agent_spool,
                                         sluid=run.sluid)
    types = {int(i): t for i, t in run.gpu_types.items() if t}
    if not types and hold.gpu_type:
        types = {u.index: hold.gpu_type for u in gpu_usage}
    shares = usage.node_shares(hold, run.gpus, {int(i): n for i, n in run.gpu_shards.items()})
    if shares:  # a share of one GPU: only that GPU's line is charged
        gpu_usage = [u for u in gpu_usage if u.index in shares]
    # tiers: the partition it ran in (Slurm says; else the hold's candidates, the largest),
    # the QOS it was held for, each second of the run by time of use
    run_ppm, split = ledger.tiers().terms(e.partition or hold.partition, hold.qos, run.start,
                                          now)
    charged = charge_gpus(gpu_usage, types, ledger.rates(), hold.rate_ppm,
                          h.config.charge.policy, h.config.charge.floor, shares=shares,
                          run_ppm=run_ppm, split=split, source=source,
                          node=run.node, restart=run.restart, start=run.start, end=now)
    result = settlement.post_node(ledger, hold.id, run.job_id, run.restart, run.node,
                              charged.amount, charged, sluid=run.sluid)
    jobstate.done(h.hooks.state_dir, run)
    if result.charged:
        h.log.info("charged %s GPU-h on hold %s (%d GPU(s), %s, run %d)",
                   fmt_hours(result.amount), hold.id, len(gpu_usage), source, run.restart)
    else:
        level = logging.ERROR if result.note.startswith("UNCOLLECTED") else logging.INFO
        h.log.log(level, "hold %s: node %s run %d %s; nothing charged", hold.id, run.node,
                  run.restart, result.note)


main = main_for("gpuledger-epilog", epilog)
