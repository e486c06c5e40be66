"""Slurm's vocabulary: the job record the hooks and the reconciler read. Slurm's syntax
(hostlists, index lists, TRES and GRES strings, durations, SLUIDs) is read by
:mod:`ledger.slurmsyntax`.

Slurm is read as data by :mod:`slurm_plugin.reader` (``squeue --json``, ``sacct --json``,
parsed in :mod:`slurm_plugin.slurmjson`); nothing here reads a ``Key=Value`` line.

* The SLUID (Slurm's realm-unique job id, ``s`` + 13 Crockford base-32 characters): 25.11
  gives it to Prolog/Epilog and PrologSlurmctld/EpilogSlurmctld as ``SLURM_JOB_SLUID`` (the
  job's SLUID: new on each requeue, kept through a resize); 26.05's ``sacct --json`` prints
  ``original_sluid`` (the job's) beside ``sluid`` (the accounting record's index).
  ``JobRecord.sluid`` is the job's SLUID where Slurm's data names it, else None.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

ACTIVE_STATES = frozenset({
    "PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_HOLD",
    "REQUEUE_FED", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED", "SPECIAL_EXIT",
    "RESV_DEL_HOLD", "POWER_UP_NODE", "UPDATE_DB",
})


class SlurmError(Exception):
    """A Slurm command failed or printed something this adapter cannot read."""


# -- job records -----------------------------------------------------------------------------


@dataclass
class JobRecord:
    """One job (or one array task / one run of a requeued job), as Slurm reports it."""

    job_id: str  # the raw numeric id (an array task has its own)
    display_id: str  # 1234 or 1234_5
    state: str
    array_job_id: str | None = None
    array_task: str | None = None  # "5", or "1-3%1" for a pending remainder
    restarts: int | None = None
    reason: str | None = None
    start: datetime | None = None
    end: datetime | None = None
    elapsed_s: int | None = None
    nodes: list[str] = field(default_factory=list)
    gpus: dict[str | None, int] = field(default_factory=dict)  # whole job, by type
    gpu_idx: dict[str, dict[int, str | None]] = field(default_factory=dict)  # node → {index: type}
    admin_comment: str = ""
    source: str = "scontrol"
    time_limit_s: int | None = None
    user: str | None = None
    account: str | None = None
    superseded: bool = False  # sacct -D: a later run of the same job exists
    stepped: bool = False  # sacct: the run started a step (its script ran)
    node_count: int | None = None  # squeue: the nodes it has, or asks for while pending
    tres_per_node: str | None = None  # the --gres request, e.g. gres:shard:3
    sluid: str | None = None  # this run's SLUID (25.11+: SLURM_JOB_SLUID in the hooks)
    qos: str | None = None  # the QOS it runs in
    partition: str | None = None  # one once it runs; the candidates before
    cluster: str | None = None  # the cluster whose record this is (squeue, sacct)
    fed_siblings: tuple[str, ...] = ()  # a federated job's viable siblings (squeue)

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES and not self.superseded

    @property
    def ran(self) -> bool:
        """Whether it was ever given nodes (a job cancelled while pending was not)."""
        return bool(self.nodes) and self.start is not None

    @property
    def gpu_count(self) -> int:
        return sum(self.gpus.values())


def base_state(text: str) -> str:
    """``CANCELLED by 0`` → ``CANCELLED``; ``COMPLETING+`` → ``COMPLETING``."""
    return (text or "").split(" ")[0].rstrip("+").upper()


