"""The job-request reader: what a Slurm job asks of the ledger, read from Slurm's own fields.

job_submit.lua forwards Slurm's request as it has it — the ``job_desc`` fields of
slurm_job_submit, the update and the job record of slurm_job_modify, and the limits of
the candidate partitions — and this module alone decides what that asks for: GPUs (or
shares of one), their type, nodes, seconds, array tasks, whether the account is free, and
every refusal with the exact text the user reads. The daemon's ``reserve``, ``resize``
and ``quote`` call it on Slurm's fields (:mod:`ledger.daemon.handlers`), the ``gpuledger
quote`` command writes sbatch's options as those fields, and PrologSlurmctld derives a
run's request from what Slurm allocated with :func:`allocation`. Every piece of Slurm
syntax is read by :mod:`ledger.slurmsyntax`.

Slurm's unset values (the fields are ``job_desc_msg_t``'s, slurm-22-05-8-1
slurm/slurm.h): a number Slurm leaves unset is NO_VAL (NO_VAL16 for the 16-bit counts);
job_submit.lua does not send such a field, and this reader treats the markers as unset
too. ``time_limit`` INFINITE (``-t UNLIMITED``) is sent and refused: a hold needs a bound.
Partition limits travel as ``candidates=name:default_time:max_time:max_nodes:total_nodes,…``
with an empty value for unset or unlimited.

The CPU-job shortcut (:func:`asks_gpu`): a job none of whose ``tres_per_*`` items names a
GPU-backed GRES (gpu, shard, mps) with a count other than zero asks for no GPU. The
Lua applies this one rule before it contacts anyone (such a job costs nothing more), and
this reader applies the same rule first, so the two never disagree about what may pass
unpaid (tests/test_one_rule.py runs both on generated requests).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

from .errors import InvalidInput
from .names import is_identifier
from .slurmsyntax import SHARED_GRES, SlurmSyntaxError, array_size, gres_name, parse_gres
from .views import HoldRequest

NO_VAL = 0xFFFFFFFE  # slurm.h: a 32-bit field left unset
INFINITE = 0xFFFFFFFF  # slurm.h: unlimited
NO_VAL16 = 0xFFFE
TRES_FIELDS = ("tres_per_node", "tres_per_job", "tres_per_task", "tres_per_socket")
# job_desc numbers the reader reads, with the value Slurm leaves in each when unset
NUMBER_FIELDS = {"time_limit": NO_VAL, "min_nodes": NO_VAL, "max_nodes": NO_VAL,
                 "num_tasks": NO_VAL, "ntasks_per_node": NO_VAL16,
                 "sockets_per_node": NO_VAL16}
SHAPE_FIELDS = ("min_nodes", "max_nodes", "num_tasks", "ntasks_per_node", "sockets_per_node")
RECORD_PREFIX = "rec_"  # slurm_job_modify's job record, beside the update's own fields
# the fields that make a request Slurm's (the counted form says gpus= seconds= instead)
SLURM_KEYS = frozenset((*TRES_FIELDS, *NUMBER_FIELDS, "array_inx", "candidates",
                        *(RECORD_PREFIX + k for k in (*TRES_FIELDS, *SHAPE_FIELDS,
                                                      "account"))))
_NUMBER = re.compile(r"^[0-9]{1,10}$")
_GPU_ITEM = re.compile(r"(?:gres[:/])?(?:gpu|shard|mps)(?![A-Za-z0-9_.+-])")
_ZERO = re.compile(r"[:=]0+$")
_NO_TIME = "give the job one with -t/--time (e.g. -t 2:00:00)"

# Why a request is refused (the daemon's ``reason``; job_submit.lua maps each to a code)
REQUEST = "request"  # unreadable or contradictory: slurm.ERROR
NO_TOKEN = "no_token"  # ESLURM_ACCESS_DENIED
TIME_LIMIT = "time_limit"  # ESLURM_INVALID_TIME_LIMIT
DENIED = "denied"  # ESLURM_ACCESS_DENIED


class Refused(InvalidInput):
    """A request job_submit must refuse, with the text the user reads and why."""

    def __init__(self, message: str, reason: str = REQUEST):
        super().__init__(message)
        self.reason = reason


# -- Slurm's fields ------------------------------------------------------------------------

class Partition(NamedTuple):
    """One candidate partition's limits (minutes, node counts; None: unset or unlimited)."""

    name: str
    default_time: int | None = None
    max_time: int | None = None
    max_nodes: int | None = None
    total_nodes: int | None = None


def _limit(text: str, what: str) -> int | None:
    if text == "":
        return None
    if not _NUMBER.match(text):
        raise InvalidInput(f"candidates: {what} is not a number: {text[:24]!r}")
    value = int(text)
    return None if value in (NO_VAL, INFINITE) else value


@lru_cache(maxsize=256)
def candidates(text: str | None) -> tuple[Partition, ...]:
    """``gpu:60:1440::4,short::240:2:3`` → the partitions a job may run in, in order (the
    same few strings come with every job: read once each)."""
    items = [i for i in (text or "").split(",") if i]
    if len(items) > 64:
        raise InvalidInput("candidates: more than 64 partitions")
    out = []
    for item in items:
        parts = item.rsplit(":", 4)
        if len(parts) != 5 or not is_identifier(parts[0]):
            raise InvalidInput(f"candidates: not name:default:max:max_nodes:nodes: {item[:60]!r}")
        name, *limits = parts
        out.append(Partition(name, *(_limit(v, w) for v, w in zip(
            limits, ("default_time", "max_time", "max_nodes", "total_nodes")))))
    return tuple(out)


class SlurmJob(NamedTuple):
    """Slurm's request fields (job_desc), as job_submit.lua forwards them: GRES strings as
    Slurm wrote them, numbers as integers (None: not sent)."""

    tres_per_node: str | None = None
    tres_per_job: str | None = None
    tres_per_task: str | None = None
    tres_per_socket: str | None = None
    time_limit: int | None = None
    min_nodes: int | None = None
    max_nodes: int | None = None
    num_tasks: int | None = None
    ntasks_per_node: int | None = None
    sockets_per_node: int | None = None
    array_inx: str | None = None
    account: str | None = None
    partition: str | None = None

    @classmethod
    def from_fields(cls, fields: dict[str, str], prefix: str = "") -> SlurmJob:
        """The fields a wire request carries (``prefix``: the job record's, ``rec_``)."""
        values: dict[str, object] = {}
        wire = _WIRE[prefix]
        for key, v in fields.items():
            spec = wire.get(key)
            if spec is None:
                continue
            name, kind = spec
            if kind is int:
                if v:
                    if not _NUMBER.match(v):
                        raise InvalidInput(f"field {key} is not a non-negative integer")
                    values[name] = int(v)
            elif v or kind is None:  # a GRES string "" is kept: an update that clears it
                values[name] = v
        return cls(**values)


# wire key -> (field, kind: None GRES text, int number, str other text), per prefix
_WIRE = {prefix: {prefix + name: (name, kind) for names, kind in (
    (TRES_FIELDS, None), (tuple(NUMBER_FIELDS), int), (("array_inx", "account", "partition"),
                                                       str)) for name in names}
    for prefix in ("", RECORD_PREFIX)}


def _num(value: int | None, none: int = NO_VAL) -> int | None:
    """A count Slurm set, else None (unset, unlimited, the field's own unset marker, 0)."""
    if value is None or value in (NO_VAL, INFINITE, none) or value <= 0:
        return None
    return value


# -- the rules -----------------------------------------------------------------------------

def asks_gpu(job: SlurmJob) -> bool:
    """The CPU-job shortcut, job_submit.lua's ``asks_gpu`` to the letter: whether an item of
    ``tres_per_node/job/task/socket`` names gpu, shard or mps (after an optional ``gres:`` or
    ``gres/``, the whole name: ``gpunic`` is not a GPU) and does not end in a count of zero
    (``gres:gpu:0``). A job that asks no GPU by this rule is never priced."""
    for name in TRES_FIELDS:
        value = getattr(job, name)
        if value:
            for item in value.split(","):
                if _GPU_ITEM.match(item) and not _ZERO.search(item):
                    return True
    return False


@lru_cache(maxsize=256)
def _gres(text: str | None) -> tuple[int, str | None, str | None]:
    """(count, type, shared GRES or None) of one ``tres_per_*`` string (read once each)."""
    if not text:
        return 0, None, None
    try:
        count, gtype, kind = parse_gres(text, others=True)
    except SlurmSyntaxError as exc:
        raise Refused(str(exc)) from None
    return count, gtype, kind if kind in SHARED_GRES else None


def node_cap(partitions: tuple[Partition, ...]) -> int | None:
    """The most nodes any candidate can give one job (its MaxNodes, at most its node
    count); None when one of them is unknown or unlimited."""
    cap = None
    for p in partitions:
        most = min(_num(p.max_nodes) or INFINITE, _num(p.total_nodes) or INFINITE)
        if most == INFINITE:
            return None
        cap = max(cap or 0, most)
    return cap


class Count(NamedTuple):
    """What one job (one array task) asks for: ``gpus`` over all its nodes (shares: shares
    over all nodes, ``per_node`` on each), their type, which GRES, and the nodes counted."""

    gpus: int
    gpu_type: str | None
    gres: str
    per_node: int | None
    nodes: int


def count(job: SlurmJob, partitions: tuple[Partition, ...] = (),
          record: SlurmJob | None = None) -> Count:
    """GPUs of one job: the largest of the per-node/-job/-task/-socket forms, over the most
    nodes Slurm may give it — ``-N``'s upper end, else one per task (``-n 8`` may land on 8
    nodes) up to the candidates' MaxNodes, else ``-N``'s lower end. PrologSlurmctld
    re-prices a hold to what the run got. In an update (``record``: the job as it is), what
    the update leaves unset is the record's."""
    if record is not None:
        job = over(job, record)
    tasks = _num(job.num_tasks)
    nodes = _num(job.max_nodes)
    if not nodes:
        low = _num(job.min_nodes) or 1
        nodes = max(low, min(tasks or 1, node_cap(partitions) or INFINITE))
    if not tasks:
        tasks = (_num(job.ntasks_per_node, NO_VAL16) or 1) * nodes
    sockets = _num(job.sockets_per_node, NO_VAL16) or 1
    best, gtype, shared, per_node = 0, None, None, None
    for name, text, times in (("tres_per_node", job.tres_per_node, nodes),
                              ("tres_per_job", job.tres_per_job, 1),
                              ("tres_per_task", job.tres_per_task, tasks),
                              ("tres_per_socket", job.tres_per_socket, sockets * nodes)):
        if not text:
            continue
        n, t, sh = _gres(text)
        if sh:
            if name != "tres_per_node":
                raise Refused(f"shares of a GPU are asked per node, with --gres={sh}:N")
            shared, per_node = sh, n
        elif n > 0 and shared:
            raise Refused(_NOT_BOTH)
        if t and gtype and t != gtype:
            raise Refused(f"one GPU type per job, not {gtype} and {t}")
        gtype = t or gtype
        best = max(best, n * times)
    if shared and best != per_node * nodes:
        raise Refused(_NOT_BOTH)
    return Count(best, gtype, shared or "gpu", per_node if shared else None, nodes)


_NOT_BOTH = "a job asks for whole GPUs or for shares of one (shard, mps), not both"


def over(update: SlurmJob, record: SlurmJob) -> SlurmJob:
    """An update over the job record: what the update leaves unset (None; a number that is
    not a count) is the record's."""
    return SlurmJob(*(r if u is None or (isinstance(u, int) and _num(u, NO_VAL16) is None)
                      else u for u, r in zip(update, record)))


def minutes(job: SlurmJob, partitions: tuple[Partition, ...]) -> int:
    """Minutes the job may run: its own limit (above every candidate's MaxTime it can never
    run that long: clamped), else the candidates' DefaultTime, else their MaxTime — the
    longest over the candidates; refused when there is none, or it is unlimited."""
    own = _num(job.time_limit)
    if own:
        cap = None
        for p in partitions:
            if p.max_time is None:
                cap = None
                break
            cap = max(cap or 0, p.max_time)
        return cap if cap and own > cap else own
    if job.time_limit == INFINITE:
        raise Refused("GPU jobs need a finite time limit; give one with -t/--time "
                      "(e.g. -t 2:00:00)", TIME_LIMIT)
    most = None
    for p in partitions:
        m = _num(p.default_time) or _num(p.max_time)
        if not m:
            raise Refused(f"partition {p.name} has no default or maximum time limit; "
                          f"{_NO_TIME}", TIME_LIMIT)
        most = max(most or 0, m)
    if not most:
        raise Refused("the job has no time limit; give it one with -t/--time (e.g. -t 2:00:00)",
                      TIME_LIMIT)
    return most


def array_tasks(spec: str | None) -> int:
    """Tasks of ``--array`` (``0-9`` → 10, ``0-99%10`` → 100); 1 without one."""
    if not spec:
        return 1
    try:
        return array_size(spec)
    except SlurmSyntaxError as exc:
        raise Refused(str(exc)) from None


# -- submit ----------------------------------------------------------------------------------

FREE = "free"  # the account's GPU jobs need no token
NO_GPU = "none"  # the job asks for no GPU


class JobRequest(NamedTuple):
    """What a job asks the ledger to hold: ``gpus`` (or shares) per array task × ``seconds``
    × ``tasks``, over ``nodes``, in the candidate ``partition`` list."""

    gpus: int
    gpu_type: str | None
    gres: str
    per_node: int | None
    nodes: int
    seconds: int
    tasks: int
    partition: str | None

    def hold(self, *, user: str | None = None, account: str | None = None,
             qos: str | None = None, cluster: str | None = None) -> HoldRequest:
        return HoldRequest(gpus=self.gpus, seconds=self.seconds, gpu_type=self.gpu_type,
                           tasks=self.tasks, account=account, user=user,
                           partition=self.partition, cluster=cluster, gres=self.gres,
                           per_node=self.per_node, qos=qos)


def no_token_message(gpus: int) -> str:
    return (f"this job asks for {gpus} GPU(s) but carries no GPU token; submit it with "
            "--gpu-token=@FILE (or --gpu-token=TOKEN, $GPU_TOKEN, ~/.config/gpuledger/token); "
            "see `gpuledger balance` for your tokens")


def partition_names(partitions: tuple[Partition, ...]) -> str | None:
    return ",".join(dict.fromkeys(p.name for p in partitions)) or None


def read_submit(job: SlurmJob, partitions: tuple[Partition, ...], *, token: bool,
                free_accounts: frozenset[str] | tuple[str, ...] = ()) -> JobRequest | str:
    """A submitted job: its :class:`JobRequest`, or ``FREE`` (a free account's job),
    ``NO_GPU``; :class:`Refused` with the user's text. In job_submit.lua's order: the
    request must be readable (even a free account's), then free accounts, then the token,
    then the time limit and the array."""
    if not asks_gpu(job):
        return NO_GPU
    counted = count(job, partitions)
    if job.account and job.account in free_accounts:
        return FREE
    if counted.gpus <= 0:
        return NO_GPU
    if not token:
        raise Refused(no_token_message(counted.gpus), NO_TOKEN)
    return JobRequest(counted.gpus, counted.gpu_type, counted.gres, counted.per_node,
                      counted.nodes, minutes(job, partitions) * 60, array_tasks(job.array_inx),
                      partition_names(partitions))


# -- scontrol update -------------------------------------------------------------------------

@dataclass(frozen=True)
class Change:
    """What an update of a job does to its hold: nothing, ``void`` it (the job asks for no
    GPU any more), or re-price it (the fields that changed; ``gpu_type`` with ``gpus``)."""

    void: bool = False
    seconds: int | None = None
    gpus: int | None = None
    gpu_type: str | None = None
    gres: str | None = None
    per_node: int | None = None
    partition: str | None = None
    account: str | None = None

    @property
    def nothing(self) -> bool:
        return not (self.void or self.seconds or self.gpus or self.partition or self.account)


def read_modify(update: SlurmJob, record: SlurmJob, partitions: tuple[Partition, ...], *,
                held: bool, free_accounts: frozenset[str] | tuple[str, ...] = ()) -> Change:
    """An update of a pending job (``scontrol update``): the hold's :class:`Change`, or
    :class:`Refused`. ``partitions``: the candidates after the update (for the node cap).

    A job without a hold may not start asking for GPUs, unless its account is free (a
    deferred job has no hold either, but job_submit.lua does not ask for one: PrologSlurmctld
    prices it when it starts). A held job that asks GPUs per task or per socket cannot change its GPUs, nodes or
    tasks: the job record carries no task or socket counts to recount them with."""
    new_time = _num(update.time_limit) is not None or update.time_limit == INFINITE
    new_gpus = any(getattr(update, f) is not None for f in TRES_FIELDS)
    new_shape = any(_num(getattr(update, f), NO_VAL16) for f in SHAPE_FIELDS)
    if not (new_time or new_gpus or new_shape or update.partition or update.account):
        return Change()
    account = update.account or record.account
    if not held:
        if new_gpus and asks_gpu(update) and account not in free_accounts \
                and count(update, partitions, record).gpus > 0:
            raise Refused("GPUs cannot be added to a job submitted without them; cancel it "
                          "and submit again with --gpu-token", DENIED)
        return Change()
    seconds = None
    if new_time:
        if update.time_limit == INFINITE:
            raise Refused("GPU jobs need a finite time limit", TIME_LIMIT)
        seconds = update.time_limit * 60
    priced: dict[str, object] = {}
    if new_gpus or new_shape:
        for f in ("tres_per_task", "tres_per_socket"):
            value = getattr(update, f)
            value = getattr(record, f) if value is None else value
            if value and asks_gpu(SlurmJob(**{f: value})):
                raise Refused("a pending job that asks for GPUs per task or per socket cannot "
                              "change its GPUs, nodes or tasks; cancel it and submit it again",
                              DENIED)
        counted = count(update, partitions, record)
        if counted.gpus <= 0:
            return Change(void=True)
        priced = {"gpus": counted.gpus, "gpu_type": counted.gpu_type, "gres": counted.gres,
                  "per_node": counted.per_node}
    return Change(seconds=seconds, partition=update.partition, account=update.account,
                  **priced)


# -- what a run was given (PrologSlurmctld) ------------------------------------------------

def shares_of(tres_per_node: str | None) -> tuple[str, int, str | None] | None:
    """(shard|mps, shares per node, GPU type) of a job that asks for a share of a GPU (its
    TresPerNode, ``gres:shard:3``), else None (Slurm counts no gres/gpu for shares)."""
    items = [i for i in (tres_per_node or "").split(",") if gres_name(i) in SHARED_GRES]
    if not items:
        return None
    try:
        n, gtype, kind = parse_gres(",".join(items))
    except SlurmSyntaxError:
        return None
    return kind, n, gtype


@dataclass(frozen=True)
class Allocation:
    """What Slurm gave one run: whole GPUs (``gres`` gpu, the type when every GPU has the
    same one) or shares (``per_node`` on each of its nodes); ``gpus`` 0 when none."""

    gpus: int
    gpu_type: str | None
    gres: str
    per_node: int | None


def allocation(gpus_by_type: dict[str | None, int], nodes: int,
               tres_per_node: str | None) -> Allocation:
    """A run's allocation, from Slurm's record of it (squeue: GPUs by type, its nodes, and
    its ``--gres`` request for shares, which Slurm counts as no gres/gpu)."""
    shares = shares_of(tres_per_node)
    if shares:
        kind, per_node, gtype = shares
        return Allocation(per_node * max(1, nodes), gtype, kind, per_node)
    total = sum(gpus_by_type.values())
    types = [t for t in gpus_by_type if t]
    one = types[0] if len(types) == 1 and None not in gpus_by_type else None
    return Allocation(total, one if total else None, "gpu", None)


def run_request(alloc: Allocation, time_limit_s: int | None) -> JobRequest:
    """The request of a run that starts with no hold (deferred at submit, or its hold lost):
    what it was given, for its time limit (at least a minute; an hour when Slurm shows
    none), one task."""
    return JobRequest(max(1, alloc.gpus), alloc.gpu_type, alloc.gres, alloc.per_node,
                      1, max(60, time_limit_s or 3600), 1, None)
