"""``gpuledger-prolog``: slurmd Prolog (PrologFlags=Alloc), once per job per node, as root.

Records this run's start, restart count and GPUs (with their types from gres.conf) for the
epilog and registers the job with the NVML agent when there is one. It reads only its
environment: no Slurm command, no ledger. Binding the hold, re-checking the token and
completing a deferred reservation are whole-job work done once by PrologSlurmctld
(``slurm_plugin.ctld``). Always exits 0: a state dir others could write to is refused
(``safefs``) with a log line.
"""

from __future__ import annotations

from . import jobstate, safefs
from .hookenv import Hook, main_for


def prolog(h: Hook) -> None:
    e = h.env
    try:
        jobstate.save(h.hooks.state_dir, jobstate.NodeRun(
            job_id=e.job_id, restart=e.restart, node=e.node, start=h.started, gpus=e.gpus,
            gpu_types=gpu_types(e.node, e.gpus, h.hooks.gres_conf),
            gpu_shards=gpu_shards(e.node, e.gpus, h.hooks.gres_conf),
            array_job_id=e.array_job_id if e.array_job_id != e.job_id else None, user=e.user,
            sluid=e.sluid))
    except safefs.UnsafePath as exc:  # a directory others could write to: nothing in it
        h.log.error("state dir refused (%s): run %d not recorded; its usage is left for the "
                    "reconciler", exc, e.restart)
    else:
        h.log.info("recorded run %d (GPUs %s)", e.restart,
                   ",".join(map(str, e.gpus)) or "none")
    _register_agent(h)


def gpu_types(node: str, gpus: list[int], gres_conf: str) -> dict[str, str | None]:
    """Slurm GPU index → type on this node, from gres.conf (``Type=``, lowercase); {} when
    unknown."""
    from ledger.slurmsyntax import gres_conf as read_gres_conf
    from ledger.slurmsyntax import node_gpus

    from .agent.gresconf import read_text

    text = read_text(gres_conf)
    if text is None:
        return {}
    types = [t for t, _ in node_gpus(read_gres_conf(text), node)]
    return {str(i): types[i] for i in gpus if i < len(types)}


def gpu_shards(node: str, gpus: list[int], gres_conf: str) -> dict[str, int]:
    """Slurm GPU index → the shards gres.conf cuts it into (GPUs without shards left out).
    A shard job's prolog sees its GPU in SLURM_JOB_GPUS like a whole-GPU job's; the ledger's
    hold says it took shares of it."""
    from ledger.shares import parse_gres_conf

    from .agent.gresconf import read_text

    text = read_text(gres_conf)
    if text is None:
        return {}
    inventory = parse_gres_conf(text)
    found = {str(i): inventory.shards_of(node, i) for i in gpus}
    return {i: n for i, n in found.items() if n}


def _register_agent(h: Hook) -> None:
    try:
        from slurm_plugin.agent import client
    except Exception:  # noqa: BLE001 - no agent in this build
        return
    try:
        bindings = client.register(int(h.env.job_id), h.env.restart, h.env.gpus,
                                   socket_path=h.hooks.agent_socket, sluid=h.env.sluid)
    except Exception as exc:  # noqa: BLE001 - settlement falls back to held time
        h.log.warning("agent registration failed: %s", exc)
        return
    for b in bindings:
        if not b.measured:
            h.log.warning("GPU %d will not be measured (settled on held time): %s",
                          b.index, b.reason)


main = main_for("gpuledger-prolog", prolog)
