"""The agent's state machine: register jobs, sample each round, summarise, persist."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

from ledger.idle import IdlePolicy
from slurm_plugin.agent import accounting
from slurm_plugin.agent.accounting import GpuState, JobState
from slurm_plugin.agent.gpumap import GpuMap
from slurm_plugin.agent.models import GpuBinding, JobUsage
from slurm_plugin.agent.spool import Spool
from slurm_plugin.nvml import DeviceInfo, Nvml, NvmlError, Sample

log = logging.getLogger("gpuledger.agent")

Clock = Callable[[], int]
Canceller = Callable[[int, str], None]


def scancel(job_id: int, reason: str) -> None:
    """Ask Slurm to cancel a job (the agent runs as root on the node). It runs in the
    sampling loop, so a controller that does not answer costs one round at most 5 s (and a
    retry after ``retry_ms``), never a stalled agent."""
    import subprocess

    out = subprocess.run(["scancel", str(job_id)], capture_output=True, text=True, timeout=5,
                         check=False)
    if out.returncode:
        raise OSError(f"scancel {job_id}: {(out.stderr or out.stdout).strip()}")


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


class Agent:
    """Holds one NVML session for its lifetime; all methods run on one thread."""

    def __init__(
        self,
        spool: Spool,
        specs: Sequence[tuple[str, ...]],
        *,
        nvml: Nvml | None = None,
        clock: Clock = wall_ms,
        mig_minors: dict[int, tuple[int, int]] | None = None,
        retry_ms: int = 60_000,
        keep_finished_s: float = 7 * 86400,
        idle: IdlePolicy | None = None,
        canceller: Canceller = scancel,
    ) -> None:
        self.spool = spool
        self.specs = list(specs)
        self.nvml = nvml if nvml is not None else Nvml()
        self.clock = clock
        self.mig_minors = mig_minors or {}
        self.retry_ms = retry_ms
        self.keep_finished_s = keep_finished_s
        self.idle = idle or IdlePolicy()
        self.canceller = canceller
        self.jobs: dict[tuple[int, int], JobState] = {}
        self.devices: list[DeviceInfo] = []
        self.gpumap = GpuMap([], self.specs)
        self.nvml_error: str | None = "not started"
        self._next_open_ms = 0
        self._next_prune_ms = 0
        self._lost: set[str] = set()
        self._cancel_next: dict[tuple[int, int], int] = {}

    # -- lifetime -------------------------------------------------------
    def start(self) -> None:
        self.spool.ensure()
        self._try_open()
        for d in self.spool.load_all():
            try:
                job = JobState.from_dict(d)
            except (KeyError, TypeError, ValueError) as exc:
                log.error("gpuledger-agent: bad spool state %r: %s", d.get("job_id"), exc)
                continue
            if not job.finished:
                job.resumed = True
                self.jobs[job.key] = job
                log.info("gpuledger-agent: resumed job %d.%d from spool", *job.key)

    def stop(self) -> None:
        for job in self.jobs.values():
            self._persist(job)
        self.nvml.close()

    def _try_open(self) -> None:
        now = self.clock()
        if self.nvml.is_open or now < self._next_open_ms:
            return
        try:
            self.nvml.open()
            self.devices = self.nvml.devices()
        except NvmlError as exc:
            self.nvml_error = str(exc) or type(exc).__name__
            self._next_open_ms = now + self.retry_ms
            log.error("gpuledger-agent: NVML unavailable: %s", self.nvml_error)
            self.nvml.close()
            return
        self.nvml_error = None
        self.gpumap = GpuMap(self.devices, self.specs, mig_minors=self.mig_minors)
        log.info("gpuledger-agent: NVML open, %d GPUs", len(self.devices))

    def all_uuids(self) -> list[str]:
        out = []
        for d in self.devices:
            out.append(d.uuid)
            out.extend(m.uuid for m in d.mig)
        return out

    # -- sampling -------------------------------------------------------
    def sample(self, uuids: Sequence[str], *, util: bool = True) -> dict[str, Sample | None]:
        """One reading per device; a failing device reads as None, never raises."""
        out: dict[str, Sample | None] = {}
        if not self.nvml.is_open:
            return {u: None for u in uuids}
        for u in uuids:
            try:
                out[u] = self.nvml.sample(u, util=util)
            except NvmlError as exc:
                out[u] = None
                if u not in self._lost:
                    self._lost.add(u)
                    log.error("gpuledger-agent: cannot sample %s: %s", u, exc)
                continue
            except Exception:  # a binding bug must not stop the agent
                out[u] = None
                log.exception("gpuledger-agent: unexpected error sampling %s", u)
                continue
            if u in self._lost:
                self._lost.discard(u)
                log.info("gpuledger-agent: %s readable again", u)
        return out

    def tick(self) -> None:
        """One sampling round for every GPU; advance and persist every running job."""
        self._try_open()
        samples = self.sample(self.all_uuids())
        now = self.clock()
        for job in self.jobs.values():
            accounting.advance(job, now, samples, self.idle.threshold_bp)
            self._cancel_if_idle(job)
            self._persist(job)
        if now >= self._next_prune_ms:
            self._next_prune_ms = now + 3_600_000
            try:
                self.spool.prune(self.keep_finished_s, now / 1000)
            except OSError as exc:
                log.error("gpuledger-agent: spool prune failed: %s", exc)

    def _cancel_if_idle(self, job: JobState) -> None:
        """Cancel a job whose every measured GPU stayed idle past the flag and the grace
        (``ledger.idle``; off unless the site sets cancel_after_s). Asked once per run."""
        limit = self.idle.cancel_at_ms
        if limit is None or job.cancel_sent or self.clock() < self._cancel_next.get(job.key, 0):
            return
        idle_for = accounting.idle_for_ms(job)
        if idle_for is None or idle_for < limit:
            return
        why = (f"every GPU below {self.idle.threshold_pct} % for {idle_for // 1000} s "
               f"(idle cancel after {limit // 1000} s)")
        job.cancel_sent = True
        try:
            self.canceller(job.job_id, why)
        except Exception as exc:  # noqa: BLE001 - the agent goes on; try again next round
            job.cancel_sent = False
            self._cancel_next[job.key] = self.clock() + self.retry_ms
            log.error("gpuledger-agent[%d]: cannot cancel the idle job: %s", job.job_id, exc)
            return
        log.warning("gpuledger-agent[%d]: cancelled: %s", job.job_id, why)

    def _persist(self, job: JobState) -> None:
        try:
            self.spool.write(job.job_id, job.restart, job.to_dict())
        except OSError as exc:
            log.error("gpuledger-agent: spool write for job %d failed: %s", job.job_id, exc)

    # -- requests -------------------------------------------------------
    def register(self, job_id: int, restart: int, indices: Sequence[int],
                 sluid: str | None = None) -> list[GpuBinding]:
        """Bind a job's Slurm GPU indices; idempotent for the same job and restart (and
        SLUID: a state left by another job with the same id is replaced, not reused)."""
        key = (job_id, restart)
        if key in self.jobs and not self.jobs[key].other_run(sluid):
            return [g.binding() for g in self.jobs[key].gpus]
        old = self.spool.read(job_id, restart)
        if old is not None:  # already finished (or unreadable state): do not reopen
            try:
                state = JobState.from_dict(old)
                if not state.other_run(sluid):
                    return [g.binding() for g in state.gpus]
                log.warning("gpuledger-agent: job %d.%d: state of an earlier job with this "
                            "id (SLUID %s, now %s) replaced", job_id, restart, state.sluid,
                            sluid)
            except (KeyError, TypeError, ValueError):
                pass
        self._try_open()
        gpus = []
        for i in indices:
            if not self.nvml.is_open:
                b = GpuBinding(i, None, False, f"NVML unavailable: {self.nvml_error}")
            else:
                b = self.gpumap.bind(i)
            gpus.append(GpuState(b.index, b.uuid, b.measured, b.reason))
        now = self.clock()
        job = JobState(job_id, restart, now, now, gpus, sluid=sluid)
        uuids = [g.uuid for g in gpus if g.uuid]
        accounting.baseline(job, self.sample(uuids, util=False))
        self.jobs[key] = job
        self._persist(job)
        log.info("gpuledger-agent: job %d.%d registered on %s", job_id, restart, list(indices))
        return [g.binding() for g in gpus]

    def summary(self, job_id: int, restart: int, *, finish: bool = True,
                sluid: str | None = None) -> JobUsage | None:
        """Usage so far; with finish, take a last reading and stop accounting the job.
        None for a job the agent does not know (or knows as another job's SLUID)."""
        key = (job_id, restart)
        job = self.jobs.get(key)
        if job is None:
            stored = self.spool.read(job_id, restart)
            if stored is None:
                return None
            state = JobState.from_dict(stored)
            return None if state.other_run(sluid) else accounting.usage(state)
        if job.other_run(sluid):
            return None
        if not finish:
            return accounting.usage(job)
        samples = self.sample([g.uuid for g in job.gpus if g.uuid])
        accounting.advance(job, self.clock(), samples, self.idle.threshold_bp)
        job.finished = True
        self._persist(job)
        del self.jobs[key]
        log.info("gpuledger-agent: job %d.%d finished", job_id, restart)
        return accounting.usage(job)

    def status(self) -> dict[str, object]:
        return {
            "nvml": self.nvml_error or "ok",
            "gpus": self.all_uuids(),
            "jobs": [f"{j}.{r}" for j, r in sorted(self.jobs)],
        }
