"""Slurm's structured output, read as data: ``squeue --json`` and ``sacct --json``.

Everything a user sets — job name, ``--comment``, paths, ``--wckey``, the script — is a JSON
string here, one value under its own key, so no job name can put a ``QOS=`` or an
``AdminComment=`` where Slurm's own field stands (scontrol's one-line job records print
values unescaped, and a ``Key=Value`` reading of them lets the user choose the fields: never
read).

What moves between releases (each checked against the data_parser of the tag named, in
src/plugins/data_parser/<version>/parsers.c; fixtures/slurm/<release>/ holds each release's
output, recorded on 22.05 and 24.11, derived for the others by fixtures/slurm/derive.py):

* 22.05 (openapi v0.0.38, slurm-22-05-8-1): numbers are plain JSON numbers (0 when unset),
  ``job_state`` and sacct's ``state.current`` are one string; ``squeue --json`` ignores
  ``-j`` and prints every job (the caller picks its job out).
* 23.02 (v0.0.39, slurm-23-02-8-1): ``UINT32_NO_VAL`` fields (``time_limit``,
  ``array_job_id``, ``array_task_id``, ``node_count``; sacct's ``time.limit``,
  ``array.task_id``) become ``{"set", "infinite", "number"}``.
* Federation (every release): squeue names the record's ``cluster`` and a federated job's
  ``federation_siblings_viable`` (a comma list); sacct names the ``cluster``. 22.05 prints
  the ``job_id`` of a copy revoked on a non-origin sibling as null: such a record has the
  job id "" (it is found by its AdminComment, never by an id).
* 23.11 to 26.05 (v0.0.40 to v0.0.45): ``job_state`` and ``state.current`` are lists (the
  base state, then flags such as ``REQUEUED``); squeue's times are
  ``{"set", "infinite", "number"}`` (``TIMESTAMP_NO_VAL``); sacct's stay numbers.
  sacct prints ``sluid`` and ``original_sluid`` (the job's SLUID) from v0.0.45 (26.05).

A key the reader needs that is missing raises :class:`SlurmError`: the callers fail closed
(a job start is requeued or cancelled, the reconciler reports the error and charges
nothing twice), they never guess.
"""

from __future__ import annotations

import functools
import json
from datetime import datetime

from ledger.slurmsyntax import (
    SlurmSyntaxError,
    expand_hostlist,
    gpus_in_tres,
    gres_indices,
    sluid,
)

from .slurm import JobRecord, SlurmError, base_state


def slurm_output(fn):
    """Syntax Slurm cannot have printed (:mod:`ledger.slurmsyntax` refused it) is unreadable
    Slurm output: :class:`SlurmError`, like every other here."""
    @functools.wraps(fn)
    def read(*args, **kw):
        try:
            return fn(*args, **kw)
        except SlurmSyntaxError as exc:
            raise SlurmError(str(exc)) from None
    return read

_SQUEUE_KEYS = ("job_id", "job_state", "admin_comment", "array_job_id", "array_task_id",
                "nodes", "tres_alloc_str", "tres_req_str", "time_limit", "qos", "partition",
                "restart_cnt", "start_time", "end_time", "user_name", "account",
                "tres_per_node", "gres_detail")
_SACCT_KEYS = ("job_id", "state", "time", "array", "nodes", "tres", "comment", "steps",
               "user", "account")


def _doc(text: str, what: str) -> list[dict]:
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise SlurmError(f"{what}: not JSON ({exc})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("jobs"), list):
        raise SlurmError(f"{what}: no 'jobs' list")
    errors = doc.get("errors") or []
    if errors and not (not doc["jobs"] and all(_empty_result(e) for e in errors)):
        raise SlurmError(f"{what}: {errors}")
    return doc["jobs"]


# ESLURM_REST_EMPTY_RESULT (slurm_errno.h): sacct --json on 22.05 reports "Nothing found"
# as an error when no job matches (a quiet cluster over the lookback window); no jobs.
REST_EMPTY_RESULT = 9003


def _empty_result(error) -> bool:
    return isinstance(error, dict) and error.get("error_number") == REST_EMPTY_RESULT


def _need(job: dict, keys: tuple[str, ...], what: str) -> None:
    if not isinstance(job, dict):
        raise SlurmError(f"{what}: a job that is not an object")
    missing = [k for k in keys if k not in job]
    if missing:
        raise SlurmError(f"{what}: job {job.get('job_id', '?')} has no {', '.join(missing)}")


def number(value) -> int | None:
    """A Slurm number: plain (v0.0.38) or ``{"set", "infinite", "number"}`` (v0.0.39+);
    None when unset or infinite."""
    if value is None:
        return None
    if isinstance(value, dict):
        if not value.get("set") or value.get("infinite"):
            return None
        value = value.get("number")
    if isinstance(value, bool) or not isinstance(value, int):
        raise SlurmError(f"not a Slurm number: {value!r}")
    return value


# The flags that name a job's state before its base state, in the order of Slurm's own
# job_state_string (slurm-24-11-7-1 src/common/slurm_protocol_defs.c): a requeued run's
# record is ["PENDING", "REQUEUED"] in v0.0.40+, and "REQUEUED" in the text and in v0.0.38.
_STATE_FLAGS = ("COMPLETING", "STAGE_OUT", "CONFIGURING", "RESIZING", "REQUEUED",
                "REQUEUE_FED", "REQUEUE_HOLD", "SPECIAL_EXIT", "STOPPED", "REVOKED",
                "RESV_DEL_HOLD", "SIGNALING")


def state(value) -> str:
    """A job's state as Slurm names it: one string (v0.0.38/39), or from a flag list
    (v0.0.40+) the first flag of Slurm's order, else the base state."""
    if isinstance(value, list):
        if not all(isinstance(v, str) for v in value):
            raise SlurmError(f"not a Slurm job state: {value!r}")
        value = next((f for f in _STATE_FLAGS if f in value), value[0] if value else "")
    if not isinstance(value, str):
        raise SlurmError(f"not a Slurm job state: {value!r}")
    return base_state(value)


def _text(value) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise SlurmError(f"not a Slurm string: {value!r}")
    return value


_NO_VAL = 0xFFFFFFFE  # NO_VAL: sacct's time.start of a job that never started (24.11)


def _when(value) -> datetime | None:
    t = number(value)
    return datetime.fromtimestamp(t).astimezone() if t and t < _NO_VAL else None


def _task(array_job: int | None, task_id: int | None, rest: str) -> str | None:
    if not array_job:
        return None
    if task_id is not None:
        return str(task_id)
    return rest or None


def bitmap_tasks(text: str) -> str:
    """sacct v0.0.38's pending array rest, a hex bitmap (``0xE``), as ``1-3``."""
    if not text.lower().startswith("0x"):
        return text
    try:
        bits = int(text, 16)
    except ValueError:
        raise SlurmError(f"not an array bitmap: {text!r}") from None
    out, i = [], 0
    while bits >> i:
        if bits >> i & 1:
            j = i
            while bits >> (j + 1) & 1:
                j += 1
            out.append(str(i) if i == j else f"{i}-{j}")
            i = j + 1
        else:
            i += 1
    return ",".join(out)


@slurm_output
def squeue_record(job: dict, now: datetime | None = None) -> JobRecord:
    """One job of ``squeue --json``."""
    _need(job, _SQUEUE_KEYS, "squeue --json")
    job_id = _id(job["job_id"])
    array_job = number(job["array_job_id"])
    task = _task(array_job, number(job["array_task_id"]),
                 _text(job.get("array_task_string")))
    nodes = expand_hostlist(_text(job["nodes"]))
    details = job["gres_detail"] or []
    if not isinstance(details, list):
        raise SlurmError(f"squeue --json: job {job_id}: gres_detail is not a list")
    gpu_idx = {node: gres_indices(_text(d)) for node, d in zip(nodes, details)}
    start = _when(job["start_time"]) if nodes else None
    end = _when(job["end_time"])
    st = state(job["job_state"])
    elapsed = None
    if start is not None:
        stop = end if st not in ("RUNNING", "SUSPENDED", "CONFIGURING") and end else (
            now or datetime.now().astimezone())
        elapsed = max(0, int((stop - start).total_seconds()))
    tres = _text(job["tres_alloc_str"]) or _text(job["tres_req_str"])
    limit = number(job["time_limit"])
    qos, partition = _text(job["qos"]), _text(job["partition"])
    return JobRecord(
        job_id=job_id, display_id=f"{array_job}_{task}" if task else job_id, state=st,
        array_job_id=str(array_job) if array_job else None, array_task=task,
        restarts=number(job["restart_cnt"]), reason=_text(job.get("state_reason")) or None,
        start=start, end=end, elapsed_s=elapsed, nodes=nodes, gpus=gpus_in_tres(tres),
        gpu_idx=gpu_idx, admin_comment=_text(job["admin_comment"]), source="squeue",
        time_limit_s=limit * 60 if limit is not None else None,
        user=_text(job["user_name"]) or None, account=_text(job["account"]) or None,
        tres_per_node=_text(job["tres_per_node"]) or None,
        sluid=sluid(_text(job.get("sluid"))), qos=qos or None, partition=partition or None,
        node_count=number(job.get("node_count")), cluster=_text(job.get("cluster")) or None,
        fed_siblings=tuple(c for c in _text(job.get("federation_siblings_viable")).split(",")
                           if c))


def _id(value) -> str:
    """A job id as text; "" for 22.05's null id of a revoked sibling copy."""
    n = number(value)
    return "" if n is None else str(n)


def parse_squeue(text: str, now: datetime | None = None) -> list[JobRecord]:
    """Every job of ``squeue --json`` (a pending array rest is one record)."""
    return [squeue_record(j, now) for j in _doc(text, "squeue --json")]


def _sacct_tres(items) -> str:
    """sacct's TRES list as a TRES string (``gres/gpu=2,gres/gpu:h100=2``): one reader of
    GPU counts for both (:func:`ledger.slurmsyntax.gpus_in_tres`)."""
    if not isinstance(items, list):
        raise SlurmError(f"sacct --json: a TRES list that is not a list: {items!r}")
    out = []
    for t in items:
        if not isinstance(t, dict):
            raise SlurmError(f"sacct --json: a TRES that is not an object: {t!r}")
        kind, name, count = t.get("type"), t.get("name"), number(t.get("count"))
        if kind and count is not None:
            out.append(f"{kind}/{name}={count}" if name else f"{kind}={count}")
    return ",".join(out)


@slurm_output
def parse_sacct(text: str) -> list[JobRecord]:
    """Every record of ``sacct --json -D`` (one per run of a requeued job, in order): a
    run's restart count is its position among the records of its job id."""
    out: list[JobRecord] = []
    seen: dict[str, int] = {}
    for job in _doc(text, "sacct --json"):
        _need(job, _SACCT_KEYS, "sacct --json")
        job_id = _id(job["job_id"])
        array = job["array"] or {}
        time = job["time"] or {}
        array_job = number(array.get("job_id"))
        rest = bitmap_tasks(_text(array.get("task")))
        task = _task(array_job, number(array.get("task_id")), rest)
        nodes = expand_hostlist(_text(job["nodes"]))
        run = seen.get(job_id, 0)  # -D: the runs of a requeued job, in order
        seen[job_id] = run + 1
        comment = job["comment"] or {}
        tres = job["tres"] or {}
        steps = job["steps"] or []
        out.append(JobRecord(
            job_id=job_id, display_id=f"{array_job}_{task}" if task else job_id,
            state=state((job["state"] or {}).get("current")),
            array_job_id=str(array_job) if array_job else None, array_task=task,
            restarts=run, start=_when(time.get("start")) if nodes else None,
            end=_when(time.get("end")), elapsed_s=number(time.get("elapsed")), nodes=nodes,
            gpus=gpus_in_tres(_sacct_tres(tres.get("allocated") or [])),
            admin_comment=_text(comment.get("administrator")), source="sacct",
            user=_user(job["user"]), account=_text(job["account"]) or None,
            sluid=sluid(_text(job.get("original_sluid") or job.get("sluid"))),
            stepped=bool(steps), cluster=_text(job.get("cluster")) or None))
    last = {r.job_id: i for i, r in enumerate(out)}
    for i, r in enumerate(out):
        r.superseded = last[r.job_id] != i
    return out


def _user(value) -> str | None:
    """sacct's ``user``: a name (v0.0.38+) or, where a release prints an object, its name."""
    if isinstance(value, dict):
        value = value.get("name")
    return _text(value) or None
