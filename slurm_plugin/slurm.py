"""Reading Slurm: the one adapter over scontrol / squeue / sacct (and pyslurm where it fits).

Parses the machine-readable output of Slurm 22.05 to 26.05 (`scontrol show job -d -o`,
`squeue -h -o`, `sacct -P -n`); tests/fixtures/slurm/<release>/ holds each release's output
(recorded on 22.05 and 24.11, derived from Slurm's source for the others, each README names
the tag and file). What moves between releases:

* 22.05 prints ``TRES=`` where 23.02+ prints ``ReqTRES=`` and ``AllocTRES=``
  (``AllocTRES=(null)`` until a job has nodes: the request counts then); 24.05 drops
  ``Power=``. GRES requests (``TresPerNode=``) are ``gres:gpu`` before 23.11, ``gres/gpu``
  after; TRES strings say ``gres/gpu`` in every release.
* The SLUID (Slurm's realm-unique job id, ``s`` + 13 Crockford base-32 characters):
  24.11 and 25.05 have it only as sacct's ``SLUID`` field, the accounting record's index,
  and no hook sees it; 25.11 gives it to Prolog/Epilog and PrologSlurmctld/EpilogSlurmctld
  as ``SLURM_JOB_SLUID`` and prints it in ``scontrol show job -d`` as ``SLUID=`` (the
  job's SLUID: new on each requeue, kept through a resize), while sacct's ``SLUID`` stays
  the record's index (the same value unless the job was resized); 26.05 adds sacct's
  ``OriginalSLUID``, the job's SLUID. ``JobRecord.sluid`` is the job's SLUID — what the hooks
  see — and is read where a release prints it, never from 24.11/25.05's record index.

Times are the controller's local time without zone; they are read as this host's local time.

pyslurm is used for the live job table only when an importable pyslurm reports the same
major.minor as ``sinfo -V`` (its API follows the Slurm release it was built for).
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

SACCT_FIELDS = ("JobIDRaw", "JobID", "State", "Start", "End", "ElapsedRaw", "NodeList",
                "AllocTRES", "AdminComment")
# Fields sacct has only from a release on (an older sacct refuses an unknown field):
# the job's SLUID (slurm-25-11-7-1 src/sacct/sacct.c "SLUID" prints the record's index, the
# job's SLUID unless it was resized; slurm-26-05-3-1 adds "OriginalSLUID", the job's own).
SACCT_SLUID_FIELDS = (((26, 5), "OriginalSLUID"), ((25, 11), "SLUID"))
SQUEUE_FORMAT = "%A|%i|%F|%K|%T|%r|%N|%D"
ACTIVE_STATES = frozenset({
    "PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_HOLD",
    "REQUEUE_FED", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED", "SPECIAL_EXIT",
    "RESV_DEL_HOLD", "POWER_UP_NODE", "UPDATE_DB",
})
TIMEOUT_S = 30.0
_SLUID = re.compile(r"^[sS][0-9A-HJKMNP-TV-Za-hjkmnp-tv-z]{13}$")


class SlurmError(Exception):
    """A Slurm command failed or printed something this adapter cannot read."""


# -- small parsers ---------------------------------------------------------------------------


def sluid(text: str | None) -> str | None:
    """A SLUID as Slurm prints it (``s`` + 13 Crockford base-32 characters, slurm-25-11-7-1
    src/common/sluid.c print_sluid), else None: an unset one (``s0000000000000``), a
    missing field, anything else."""
    text = (text or "").strip()
    if not _SLUID.match(text) or not text[1:].strip("0"):
        return None
    return text


def sacct_fields(version: tuple[int, int] | None) -> tuple[str, ...]:
    """The ``--format`` fields for this sacct: SACCT_FIELDS, then the job's SLUID where the
    release prints it (one field: OriginalSLUID from 26.05, SLUID in 25.11)."""
    for since, name in SACCT_SLUID_FIELDS:
        if version is not None and version >= since:
            return SACCT_FIELDS + (name,)
    return SACCT_FIELDS


def parse_time(text: str | None) -> datetime | None:
    if not text or text in ("Unknown", "None", "N/A", "(null)"):
        return None
    try:
        return datetime.fromisoformat(text).astimezone()
    except ValueError:
        raise SlurmError(f"not a Slurm time: {text!r}") from None


def parse_duration(text: str | None) -> int | None:
    """``[D-]HH:MM:SS`` / ``MM:SS`` → seconds."""
    if not text or text in ("UNLIMITED", "Partition_Limit", "N/A", "INVALID"):
        return None
    days = 0
    if "-" in text:
        d, _, text = text.partition("-")
        days = int(d)
    parts = [int(p) for p in text.split(":")]
    while len(parts) < 3:
        parts.insert(0, 0)
    h, m, s = parts
    return ((days * 24 + h) * 60 + m) * 60 + s


def gpus_in_tres(tres: str | None) -> dict[str | None, int]:
    """GPU counts by type from a TRES string; untyped GPUs under ``None``.

    ``billing=1,cpu=1,gres/gpu:h100=2,gres/gpu=2,node=1`` → ``{"h100": 2}``;
    ``gres/gpu=2`` alone → ``{None: 2}``; a mixed allocation keeps the typed counts and
    puts any untyped rest under ``None``.
    """
    typed: dict[str | None, int] = {}
    total = 0
    for item in (tres or "").split(","):
        name, _, value = item.partition("=")
        name = name.replace("gres:", "gres/")
        if not name.startswith("gres/gpu") or not value:
            continue
        count = int(value)
        if name == "gres/gpu":
            total = count
        elif name.startswith("gres/gpu:"):
            typed[name.split(":", 1)[1]] = typed.get(name.split(":", 1)[1], 0) + count
    rest = total - sum(typed.values())
    if rest > 0:
        typed[None] = rest
    return typed


def expand_hostlist(text: str | None) -> list[str]:
    """``gpu[01-03,7],login1`` → ``['gpu01', 'gpu02', 'gpu03', 'gpu7', 'login1']``."""
    if not text or text in ("(null)", "None assigned", "None"):
        return []
    names: list[str] = []
    for m in re.finditer(r"([^,\[]+)(?:\[([^\]]*)\])?([^,\[]*)", text):
        prefix, ranges, suffix = m.group(1), m.group(2), m.group(3)
        if ranges is None:
            names.append(prefix + suffix)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            if not hi:
                names.append(f"{prefix}{lo}{suffix}")
                continue
            for n in range(int(lo), int(hi) + 1):
                names.append(f"{prefix}{n:0{len(lo)}d}{suffix}")
    return names


def expand_indices(text: str) -> list[int]:
    """``0-1,3`` → ``[0, 1, 3]`` (GPU indices, task ids)."""
    out: list[int] = []
    for part in (text or "").split(","):
        if not part or part in ("N/A", "(null)"):
            continue
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


_GRES_IDX = re.compile(r"gpu(?::([^:(,]+))?(?::\d+)?\(IDX:([^)]*)\)")


def gres_indices(text: str) -> dict[int, str | None]:
    """``gpu:h100:1(IDX:0),gpu:a100:1(IDX:2)`` → ``{0: 'h100', 2: 'a100'}``."""
    out: dict[int, str | None] = {}
    for m in _GRES_IDX.finditer(text or ""):
        gtype = m.group(1)
        if gtype and gtype.isdigit():  # gpu:2(IDX:0-1): a count, not a type
            gtype = None
        for i in expand_indices(m.group(2)):
            out[i] = gtype
    return out


_KEY = re.compile(r"^[A-Za-z][A-Za-z0-9_/:.]*$")


def split_fields(line: str) -> list[tuple[str, str]]:
    """``Key=Value`` pairs of one ``scontrol -o`` line; a value may hold spaces."""
    pairs: list[tuple[str, str]] = []
    for word in line.strip().split(" "):
        key, eq, value = word.partition("=")
        if eq and _KEY.match(key):
            pairs.append((key, value))
        elif pairs:
            k, v = pairs[-1]
            pairs[-1] = (k, f"{v} {word}" if word else v + " ")
    return [(k, v.rstrip()) for k, v in pairs]


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
    tres_per_node: str | None = None  # scontrol's TresPerNode (--gres), e.g. gres:shard:3
    sluid: str | None = None  # this run's SLUID (25.11+: SLURM_JOB_SLUID in the hooks)
    qos: str | None = None  # the QOS it runs in (scontrol's QOS=)
    partition: str | None = None  # scontrol's Partition= (one, once it runs; a list before)

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


def parse_scontrol_job(line: str) -> JobRecord:
    pairs = split_fields(line)
    d: dict[str, str] = {}
    gpu_idx: dict[str, dict[int, str | None]] = {}
    node_group: list[str] = []
    for key, value in pairs:
        if key == "Nodes":
            node_group = expand_hostlist(value)
        elif key == "GRES" and node_group:
            for node in node_group:
                gpu_idx[node] = gres_indices(value)
        else:
            d.setdefault(key, value)
    if "JobId" not in d:
        raise SlurmError(f"not a scontrol job line: {line[:80]!r}")
    array_job = d.get("ArrayJobId")
    task = d.get("ArrayTaskId")
    # 24.11 prints AllocTRES=(null) until the job has nodes (recorded: a pending array rest,
    # a job cancelled while pending); then the request stands in, as 22.05's TRES= does.
    tres = next((d[k] for k in ("AllocTRES", "TRES", "ReqTRES")
                 if d.get(k) and d[k] != "(null)"), None)
    start = parse_time(d.get("StartTime"))
    nodes = expand_hostlist(d.get("NodeList"))
    record = JobRecord(
        job_id=d["JobId"], display_id=f"{array_job}_{task}" if array_job else d["JobId"],
        state=base_state(d.get("JobState", "")), array_job_id=array_job, array_task=task,
        restarts=int(d["Restarts"]) if d.get("Restarts", "").isdigit() else None,
        reason=d.get("Reason"), start=start if nodes else None,
        end=parse_time(d.get("EndTime")), elapsed_s=parse_duration(d.get("RunTime")),
        nodes=nodes, gpus=gpus_in_tres(tres), gpu_idx=gpu_idx,
        admin_comment=d.get("AdminComment", ""), source="scontrol",
        time_limit_s=parse_duration(d.get("TimeLimit")),
        user=(d.get("UserId") or "").split("(")[0] or None, account=d.get("Account") or None,
        sluid=sluid(d.get("SLUID")),  # 25.11+, with -d (slurm-25-11-7-1 src/scontrol/info_job.c)
        tres_per_node=d.get("TresPerNode") or None,
        qos=d.get("QOS") if d.get("QOS") not in (None, "", "(null)", "N/A") else None,
        partition=d.get("Partition") if d.get("Partition") not in (None, "", "(null)")
        else None,
    )
    return record


def parse_scontrol_jobs(text: str) -> list[JobRecord]:
    return [parse_scontrol_job(ln) for ln in text.splitlines() if ln.startswith("JobId=")]


def parse_squeue(text: str) -> list[JobRecord]:
    """Lines of ``squeue -h -o SQUEUE_FORMAT`` (no admin comment there: squeue lacks it)."""
    out = []
    for line in text.splitlines():
        if not line.strip():
            continue
        raw, shown, array_job, task, state, reason, nodelist, _n = line.split("|", 7)
        is_array = task not in ("N/A", "")
        out.append(JobRecord(job_id=raw, display_id=shown, state=base_state(state),
                             array_job_id=array_job if is_array else None,
                             array_task=task if is_array else None, reason=reason,
                             nodes=expand_hostlist(nodelist), source="squeue"))
    return out


def parse_sacct_steps(text: str) -> set[tuple[str, int]]:
    """Lines of ``sacct -D -P -n --format=JobIDRaw`` (steps included): the runs
    ``(job id, restart)`` with at least one step (``batch``, ``extern``, ``interactive`` or
    a numbered one). A run that PrologSlurmctld cancelled or requeued was given nodes for a
    moment but never started a step: its script never ran. Each step follows its run."""
    runs: set[tuple[str, int]] = set()
    seen: dict[str, int] = {}
    current: tuple[str, int] | None = None
    for line in text.splitlines():
        raw = line.split("|", 1)[0].strip()
        if not raw:
            continue
        job, dot, _step = raw.partition(".")
        if not dot:
            current = (job, seen.get(job, 0))
            seen[job] = current[1] + 1
        elif current is not None and current[0] == job:
            runs.add(current)
    return runs


def parse_sacct(text: str, fields: tuple[str, ...] = SACCT_FIELDS) -> list[JobRecord]:
    """Lines of ``sacct -X -D -P -n --format=<fields>`` (``sacct_fields``); runs of one job
    in order.

    With ``-D`` a requeued job has one record per run (``REQUEUED`` ones first); the run's
    restart number is its position among the records of that job id. AdminComment, which
    may hold ``|``, is read last of SACCT_FIELDS: fields after it are split off the right.
    """
    if fields[:len(SACCT_FIELDS)] != SACCT_FIELDS:
        raise SlurmError(f"sacct fields must start with {','.join(SACCT_FIELDS)}")
    extra = fields[len(SACCT_FIELDS):]
    out: list[JobRecord] = []
    seen: dict[str, int] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        head, tail = line, []
        if extra:
            head, *tail = line.rsplit("|", len(extra))
        parts = head.split("|", len(SACCT_FIELDS) - 1)
        if len(parts) != len(SACCT_FIELDS) or len(tail) != len(extra):
            raise SlurmError(f"sacct line with {len(parts) + len(tail)} fields: {line[:80]!r}")
        raw, shown, state, start, end, elapsed, nodelist, tres, comment = parts
        more = dict(zip(extra, tail))
        array_job, _, task = shown.partition("_")
        task = task.strip("[]")  # a pending rest: 1234_[1-3%1], scontrol's ArrayTaskId 1-3%1
        nodes = expand_hostlist(nodelist)
        run = seen.get(raw, 0)
        seen[raw] = run + 1
        out.append(JobRecord(
            job_id=raw, display_id=shown, state=base_state(state),
            array_job_id=array_job if task else None, array_task=task or None, restarts=run,
            start=parse_time(start) if nodes else None, end=parse_time(end),
            elapsed_s=int(elapsed) if elapsed.isdigit() else None, nodes=nodes,
            gpus=gpus_in_tres(tres), admin_comment=comment.strip(), source="sacct",
            sluid=sluid(more.get("OriginalSLUID") or more.get("SLUID"))))
    last = {r.job_id: i for i, r in enumerate(out)}
    for i, r in enumerate(out):
        r.superseded = last[r.job_id] != i
    return out


# -- the reader ------------------------------------------------------------------------------


class SlurmReader(Protocol):
    """What the hooks and the reconciler need from Slurm (a fake one in tests)."""

    def job(self, job_id: str) -> JobRecord | None: ...

    def array_tasks(self, array_job_id: str) -> list[JobRecord]: ...

    def live_jobs(self) -> list[JobRecord]: ...

    def finished_jobs(self, since: datetime, job_ids: list[str] | None = None
                      ) -> list[JobRecord]: ...

    def stepped_runs(self, job_ids: list[str]) -> set[tuple[str, int]]: ...

    def cancel(self, job_id: str, reason: str) -> None: ...

    def owners(self, job_ids: list[str]) -> dict[str, tuple[str, str]]: ...

    def set_admin_comment(self, job_id: str, text: str) -> None: ...


def _run(cmd: list[str], timeout: float = TIMEOUT_S) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError:
        raise SlurmError(f"{cmd[0]} is not installed") from None
    except subprocess.TimeoutExpired:
        raise SlurmError(f"{' '.join(cmd[:3])} timed out after {timeout:.0f}s") from None
    if out.returncode != 0:
        raise SlurmError(f"{' '.join(cmd[:4])}: {out.stderr.strip() or out.returncode}")
    return out.stdout


def slurm_version() -> tuple[int, int] | None:
    try:
        m = re.search(r"(\d+)\.(\d+)", _run(["sinfo", "-V"], 10))
    except SlurmError:
        return None
    return (int(m.group(1)), int(m.group(2))) if m else None


def pyslurm_matches(version: tuple[int, int] | None) -> bool:
    """True when an importable pyslurm was built for this Slurm's major.minor."""
    if version is None or os.environ.get("GPULEDGER_NO_PYSLURM"):
        return False
    try:
        import pyslurm  # type: ignore[import-not-found]
    except Exception:  # noqa: BLE001 - absent or broken: use the commands
        return False
    text = str(getattr(pyslurm, "__version__", "") or "")
    m = re.match(r"(\d+)\.(\d+)", text)
    return bool(m) and (int(m.group(1)), int(m.group(2))) == version


def _pyslurm_live_jobs() -> list[JobRecord]:
    """The live job table through pyslurm (>= 23.2 API: ``pyslurm.Jobs.load()``)."""
    import pyslurm  # type: ignore[import-not-found]

    out = []
    for job in pyslurm.Jobs.load().values():
        array_job = getattr(job, "array_id", None)
        task = getattr(job, "array_task_id", None)
        nodes = expand_hostlist(getattr(job, "nodes", None) or "")
        out.append(JobRecord(
            job_id=str(job.id), display_id=f"{array_job}_{task}" if array_job else str(job.id),
            state=base_state(str(job.state)), array_job_id=str(array_job) if array_job else None,
            array_task=str(task) if task is not None else None,
            restarts=getattr(job, "requeue_count", None), nodes=nodes,
            start=datetime.fromtimestamp(job.start_time).astimezone()
            if nodes and getattr(job, "start_time", None) else None,
            gpus=gpus_in_tres(getattr(job, "allocated_tres_str", None)
                              or getattr(job, "tres_alloc_str", None)),
            admin_comment=getattr(job, "admin_comment", None) or "", source="pyslurm"))
    return out


class CommandReader:
    """SlurmReader over the commands (and pyslurm for the live table when it matches)."""

    def __init__(self, use_pyslurm: bool | None = None,
                 version: tuple[int, int] | None = None):
        self._version = version
        self._pyslurm = pyslurm_matches(self.version) if use_pyslurm is None else use_pyslurm

    @property
    def version(self) -> tuple[int, int] | None:
        """This Slurm's major.minor (``sinfo -V``), asked once."""
        if self._version is None:
            self._version = slurm_version()
        return self._version

    def job(self, job_id: str) -> JobRecord | None:
        try:
            text = _run(["scontrol", "show", "job", "-d", "-o", str(job_id)])
        except SlurmError as exc:
            if "Invalid job id" in str(exc):
                return None
            raise
        jobs = [j for j in parse_scontrol_jobs(text) if j.job_id == str(job_id)]
        return jobs[0] if jobs else None

    def one(self, spec: str, raw_id: str) -> JobRecord | None:
        """One job's record: ``spec`` is ``A_T`` for an array task (``A`` lists every task)."""
        try:
            text = _run(["scontrol", "show", "job", "-d", "-o", str(spec)])
        except SlurmError as exc:
            if "Invalid job id" in str(exc):
                return None
            raise
        jobs = [j for j in parse_scontrol_jobs(text) if j.job_id == str(raw_id)]
        return jobs[0] if jobs else None

    def array_tasks(self, array_job_id: str) -> list[JobRecord]:
        """Every record slurmctld still holds for an array (tasks and pending rest)."""
        try:
            text = _run(["scontrol", "show", "job", "-d", "-o", str(array_job_id)])
        except SlurmError as exc:
            if "Invalid job id" in str(exc):
                return []
            raise
        return parse_scontrol_jobs(text)

    def live_jobs(self) -> list[JobRecord]:
        if self._pyslurm:
            try:
                return _pyslurm_live_jobs()
            except Exception:  # noqa: BLE001 - an API drift must not stop settlement
                self._pyslurm = False
        return parse_scontrol_jobs(_run(["scontrol", "show", "job", "-d", "-o"]))

    def queue(self) -> list[JobRecord]:
        return parse_squeue(_run(["squeue", "-h", "-a", "-r", "-o", SQUEUE_FORMAT]))

    def finished_jobs(self, since: datetime, job_ids: list[str] | None = None
                      ) -> list[JobRecord]:
        fields = sacct_fields(self.version)
        cmd = ["sacct", "-a", "-X", "-D", "-P", "-n", "--format=" + ",".join(fields),
               "-S", since.astimezone().strftime("%Y-%m-%dT%H:%M:%S"), "-E", "now"]
        if job_ids:
            cmd += ["-j", ",".join(job_ids)]
        return parse_sacct(_run(cmd, 120), fields)

    def stepped_runs(self, job_ids: list[str]) -> set[tuple[str, int]]:
        """The runs ``(job id, restart)`` of these jobs that started a step (``sacct -D``)."""
        out: set[tuple[str, int]] = set()
        for i in range(0, len(job_ids), 200):
            out |= parse_sacct_steps(_run(["sacct", "-a", "-D", "-P", "-n",
                                           "--format=JobIDRaw", "-j",
                                           ",".join(job_ids[i:i + 200])], 120))
        return out

    def owners(self, job_ids: list[str]) -> dict[str, tuple[str, str]]:
        """Job id → (user, account), from accounting (``sacct -X -P -n``)."""
        out: dict[str, tuple[str, str]] = {}
        for i in range(0, len(job_ids), 200):
            text = _run(["sacct", "-a", "-X", "-P", "-n", "--format=JobIDRaw,User,Account",
                         "-j", ",".join(job_ids[i:i + 200])], 120)
            for line in text.splitlines():
                raw, _, rest = line.partition("|")
                user, _, account = rest.partition("|")
                if raw.strip():
                    out[raw.strip()] = (user.strip(), account.strip())
        return out

    def cancel(self, job_id: str, reason: str) -> None:
        # The reason goes where the user sees it (squeue/scontrol Comment) before the cancel.
        try:
            _run(["scontrol", "update", f"jobid={job_id}", f"comment={reason[:250]}"])
        except SlurmError:
            pass
        _run(["scancel", str(job_id)])

    def set_admin_comment(self, job_id: str, text: str) -> None:
        _run(["scontrol", "update", f"jobid={job_id}", f"admincomment={text}"])
