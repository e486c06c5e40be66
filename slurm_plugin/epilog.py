"""``gpuledger-epilog``: slurmd Epilog, once per job per node, as root.

Computes this node's usage of the run (NVML agent, else held time; ``usage.node_usage``),
charges it under ``<hold>:<job>:<restart>:<node>`` and closes the hold when every node,
array task and run sharing it is done (``settle.close_if_done``). Always exits 0; whatever
fails is logged and settled later by ``gpuledger reconcile``.
"""

from __future__ import annotations

import logging

import time

from ledger.amounts import fmt_hours
from ledger.charging import charge_gpus
from ledger.service import Ledger

from . import jobstate, marks, settle, usage
from .hookenv import Hook, main_for
from .slurm import CommandReader, SlurmReader


def epilog(h: Hook, reader: SlurmReader | None = None, ledger: Ledger | None = None,
           now: float | None = None) -> None:
    e = h.env
    reader = reader or CommandReader(use_pyslurm=False)
    now = time.time() if now is None else now
    run = jobstate.load(h.hooks.state_dir, e.job_id)
    record = reader.job(e.job_id)
    if run is None:
        # No prolog record (prolog failed, or a second epilog by hand): Slurm's own figures.
        mark = marks.parse(e.comment) or marks.parse(record.admin_comment if record else "")
        if not isinstance(mark, marks.HoldMark):
            return
        start = record.start.timestamp() if record and record.start else now
        run = jobstate.NodeRun(
            job_id=e.job_id, restart=e.restart, node=e.node, start=start, gpus=e.gpus,
            gpu_types={str(i): t for i, t in (record.gpu_idx.get(e.node, {})
                                              if record else {}).items()},
            hold_id=mark.hold_id, token_id=mark.token_id,
            array_job_id=record.array_job_id if record else None)
        h.log.warning("no prolog record on this node; using Slurm's start time (run %d)",
                      run.restart)
    if not run.hold_id:
        return
    ledger = ledger or Ledger.from_config(h.config)
    hold = ledger.hold(run.hold_id)
    held_ms = round((now - run.start) * 1000)
    gpu_usage, source = usage.node_usage(run.job_id, run.restart, run.gpus, held_ms,
                                         h.hooks.agent_socket, h.hooks.agent_spool)
    types = {int(i): t for i, t in run.gpu_types.items()}
    if not types and hold.gpu_type:
        types = {u.index: hold.gpu_type for u in gpu_usage}
    charged = charge_gpus(gpu_usage, types, ledger.rates(), hold.rate_ppm,
                          h.config.charge.policy, h.config.charge.floor, source=source,
                          node=run.node, restart=run.restart, start=run.start, end=now)
    result = settle.post_node(ledger, run.hold_id, run.job_id, run.restart, run.node,
                              charged.amount, charged)
    jobstate.done(h.hooks.state_dir, run)
    if result.charged:
        h.log.info("charged %s GPU-h on hold %s (%d GPU(s), %s, run %d)",
                   fmt_hours(result.amount),
                   run.hold_id, len(gpu_usage), source, run.restart)
    else:
        level = logging.ERROR if result.note.startswith("UNCOLLECTED") else logging.INFO
        h.log.log(level, "hold %s: node %s run %d %s; nothing charged", run.hold_id, run.node,
                  run.restart, result.note)
    records = _records(reader, run, record)
    closed = settle.close_if_done(ledger, run.hold_id, records, "job finished")
    if closed is not None:
        h.log.info("hold %s closed: charged %s GPU-h, returned %s GPU-h", closed.id,
                   fmt_hours(closed.charged), fmt_hours(closed.returned))


def _records(reader: SlurmReader, run: jobstate.NodeRun, record):
    """Every Slurm record sharing the hold: the array's tasks, or the job itself."""
    if run.array_job_id:
        return reader.array_tasks(run.array_job_id)
    return [record] if record is not None else []


main = main_for("gpuledger-epilog", epilog)
