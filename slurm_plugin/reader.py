"""Reading Slurm: the one reader of the live job table and of accounting.

Every read goes through Slurm's structured output (:mod:`slurm_plugin.slurmjson`):
``squeue --json`` for what slurmctld holds, ``sacct --json -D`` for accounting (one record
per run of a requeued job). pyslurm is used for the live table only when an importable
pyslurm reports the same major.minor as ``sinfo -V`` (its API follows the Slurm release it
was built for); its fields are typed values too.

``squeue --json`` of 22.05 ignores ``-j`` and prints every job; later releases filter. The
reader always picks the job out itself, so both are right.
"""

from __future__ import annotations

import os
import re
import subprocess
from datetime import datetime
from typing import Protocol

from ledger.slurmsyntax import expand_hostlist, gpus_in_tres

from . import slurmjson
from .slurm import JobRecord, SlurmError, base_state

TIMEOUT_S = 30.0
_INVALID = ("Invalid job id", "invalid job id")


class SlurmReader(Protocol):
    """What the hooks and the reconciler need from Slurm (a fake one in tests)."""

    def job(self, job_id: str) -> JobRecord | None: ...

    def live_jobs(self) -> list[JobRecord]: ...

    def finished_jobs(self, since: datetime, job_ids: list[str] | None = None
                      ) -> list[JobRecord]: ...

    def stepped_runs(self, job_ids: list[str]) -> set[tuple[str, int]]: ...

    def cancel(self, job_id: str, reason: str) -> None: ...

    def sibling_copies(self, job_id: str, clusters: list[str]) -> list[JobRecord]: ...

    def owners(self, job_ids: list[str]) -> dict[str, tuple[str, str]]: ...


def _run(cmd: list[str], timeout: float = TIMEOUT_S) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False,
                             env={**os.environ, "SLURM_TIME_FORMAT": "standard"})
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


@slurmjson.slurm_output
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
            admin_comment=getattr(job, "admin_comment", None) or "", source="pyslurm",
            qos=getattr(job, "qos", None) or None,
            partition=getattr(job, "partition", None) or None))
    return out


def _chunks(ids: list[str], n: int = 200):
    for i in range(0, len(ids), n):
        yield ids[i:i + n]


class CommandReader:
    """SlurmReader over the commands' JSON (and pyslurm for the live table when it matches)."""

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

    def _squeue(self, job_id: str | None = None) -> list[JobRecord]:
        # every state: from 23.02 squeue filters, and hides finished jobs unless asked
        cmd = ["squeue", "--json", "--all", "--states", "all"]
        if job_id:
            cmd += ["--jobs", str(job_id)]
        try:
            text = _run(cmd)
        except SlurmError as exc:
            if job_id and any(s in str(exc) for s in _INVALID):
                return []
            raise
        return slurmjson.parse_squeue(text)

    def job(self, job_id: str) -> JobRecord | None:
        """One job's record: ``job_id`` is its raw id (an array task has its own) or an
        array task's ``A_T``."""
        job_id = str(job_id)
        jobs = [j for j in self._squeue(job_id) if job_id in (j.job_id, j.display_id)]
        if len(jobs) > 1:
            raise SlurmError(f"squeue --json printed job {job_id} {len(jobs)} times")
        return jobs[0] if jobs else None

    def live_jobs(self) -> list[JobRecord]:
        """Every job slurmctld still holds (array tasks and pending array rests included)."""
        if self._pyslurm:
            try:
                return _pyslurm_live_jobs()
            except Exception:  # noqa: BLE001 - an API drift must not stop settlement
                self._pyslurm = False
        return self._squeue()

    def _sacct(self, job_ids: list[str] | None, since: datetime | None) -> list[JobRecord]:
        cmd = ["sacct", "--json", "-a", "-D"]
        if since is not None:
            cmd += ["-S", since.astimezone().strftime("%Y-%m-%dT%H:%M:%S"), "-E", "now"]
        if job_ids:
            cmd += ["-j", ",".join(job_ids)]
        return slurmjson.parse_sacct(_run(cmd, 120))

    def finished_jobs(self, since: datetime, job_ids: list[str] | None = None
                      ) -> list[JobRecord]:
        return self._sacct(job_ids, since)

    def stepped_runs(self, job_ids: list[str]) -> set[tuple[str, int]]:
        """The runs ``(job id, restart)`` of these jobs that started a step (``sacct -D``)."""
        out: set[tuple[str, int]] = set()
        for chunk in _chunks(job_ids):
            out |= {(r.job_id, r.restarts or 0) for r in self._sacct(chunk, None) if r.stepped}
        return out

    def sibling_copies(self, job_id: str, clusters: list[str]) -> list[JobRecord]:
        """The copies of federated job ``job_id`` on the sibling ``clusters``, from
        accounting (``sacct -M``: slurmdbd knows every cluster's records; a copy revoked on
        a non-origin sibling has no id in that sibling's squeue on 22.05)."""
        if not clusters:
            return []
        cmd = ["sacct", "--json", "-a", "-D", "-M", ",".join(clusters), "-j", str(job_id)]
        return [r for r in slurmjson.parse_sacct(_run(cmd, 60))
                if r.job_id == str(job_id) and r.cluster in clusters]

    def owners(self, job_ids: list[str]) -> dict[str, tuple[str, str]]:
        """Job id → (user, account), from accounting."""
        out: dict[str, tuple[str, str]] = {}
        for chunk in _chunks(job_ids):
            for r in self._sacct(chunk, None):
                out[r.job_id] = (r.user or "", r.account or "")
        return out

    def cancel(self, job_id: str, reason: str) -> None:
        # The reason goes where the user sees it (squeue/scontrol Comment) before the cancel.
        try:
            _run(["scontrol", "update", f"jobid={job_id}", f"comment={reason[:250]}"])
        except SlurmError:
            pass
        _run(["scancel", str(job_id)])
