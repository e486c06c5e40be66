"""What Slurm gives the hooks in their environment, and the frame that makes them exit 0.

The hooks read only their environment (Slurm's docs: prolog/epilog must not call Slurm
commands) — never ``SLURM_JOB_COMMENT``, which is the user's own ``--comment`` and so
hostile input. Which hold belongs to which job is the ledger's record (PrologSlurmctld
binds it from the AdminComment job_submit wrote); the node hooks look it up by job id.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from ledger import config as config_mod
from ledger.errors import ConfigError

from . import hooklog
from .hookconf import HookConfig, hook_config

TOKEN_VAR = "SPANK_GPULEDGER_TOKEN"
_INDICES = re.compile(r"^\d+(?:-\d+)?(?:,\d+(?:-\d+)?)*$")


def env_indices(text: str | None) -> tuple[list[int], str | None]:
    """``0-1,3`` → ([0, 1, 3], None); anything else → ([], why) instead of raising."""
    text = (text or "").strip()
    if not text or text in ("N/A", "(null)"):
        return [], None
    if not _INDICES.match(text):
        return [], f"SLURM_JOB_GPUS={text[:60]!r} is not a list of GPU indices"
    out: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        if int(hi or lo) - int(lo) > 4096:
            return [], f"SLURM_JOB_GPUS={text[:60]!r} is implausibly large"
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out, None


def _digits(text: str | None) -> str | None:
    text = (text or "").strip()
    return text if text.isdigit() else None


@dataclass(frozen=True)
class HookEnv:
    job_id: str
    node: str
    restart: int
    gpus: list[int]
    token: str | None
    user: str | None = None  # SLURM_JOB_USER: set by Slurm, not by the user
    account: str | None = None
    partition: str | None = None
    array_job_id: str | None = None
    array_task_id: str | None = None
    nodes: list[str] = field(default_factory=list)  # SLURM_JOB_NODELIST, expanded
    sluid: str | None = None  # SLURM_JOB_SLUID (Slurm 25.11+): this run's realm-unique id
    problems: tuple[str, ...] = ()  # unreadable variables, logged by the hook

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> HookEnv:
        from .slurm import SlurmError, expand_hostlist, sluid

        problems = []
        restart = env.get("SLURM_JOB_RESTART_COUNT") or env.get("SLURM_RESTART_COUNT") or "0"
        gpus, why = env_indices(env.get("SLURM_JOB_GPUS"))
        if why:
            problems.append(why)
        try:
            nodes = expand_hostlist(env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST"))
        except (SlurmError, ValueError):
            nodes = []
            problems.append(f"SLURM_JOB_NODELIST={env.get('SLURM_JOB_NODELIST', '')[:60]!r} "
                            "is not a host list")
        array_job = _digits(env.get("SLURM_ARRAY_JOB_ID"))
        return cls(
            job_id=_digits(env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")) or "",
            node=env.get("SLURMD_NODENAME") or os.uname().nodename.split(".")[0],
            restart=int(restart) if restart.isdigit() else 0,
            gpus=gpus,
            token=(env.get(TOKEN_VAR) or "").strip() or None,
            user=env.get("SLURM_JOB_USER") or None,
            account=env.get("SLURM_JOB_ACCOUNT") or None,
            partition=env.get("SLURM_JOB_PARTITION") or None,
            array_job_id=array_job,
            array_task_id=_digits(env.get("SLURM_ARRAY_TASK_ID")) if array_job else None,
            nodes=nodes,
            sluid=sluid(env.get("SLURM_JOB_SLUID")),
            problems=tuple(problems),
        )

    @property
    def owners(self) -> list[str]:
        """Job ids a hold of this job may be bound to: its own, then its array's."""
        return list(dict.fromkeys(i for i in (self.job_id, self.array_job_id) if i))

    @property
    def may_be_ours(self) -> bool:
        """A job with neither a token nor GPUs cannot have a hold: leave at once."""
        return bool(self.token or self.gpus or self.problems)


@dataclass
class Hook:
    env: HookEnv
    config: config_mod.Config
    hooks: HookConfig
    log: logging.Logger
    started: float


def run(name: str, body: Callable[[Hook], int | None], env: Mapping[str, str] | None = None,
        *, fail_rc: int = 0) -> int:
    """Run a hook body; every failure is logged and left for the reconciler.

    Returns 0, or what the body returns (PrologSlurmctld asks Slurm to requeue a job it
    could not get paid for); ``fail_rc`` on an unexpected error (0 for the node hooks).
    """
    started = time.time()
    try:
        e = HookEnv.from_env(os.environ if env is None else env)
    except Exception as exc:  # noqa: BLE001 - a non-zero exit would drain the node
        hooklog.setup(name, None, None, use_syslog=True).error(
            "unreadable job environment, nothing done: %s: %s", exc.__class__.__name__, exc)
        return 0
    if not e.job_id or not e.may_be_ours:
        return 0
    log = hooklog.setup(name, e.job_id, None, use_syslog=True)
    try:
        config = config_mod.load()
        hooks = hook_config(config)
    except ConfigError as exc:
        log.error("no usable configuration, left for the reconciler: %s", exc)
        return fail_rc
    log = hooklog.setup(name, e.job_id, hooks.log_file, hooks.syslog)
    for problem in e.problems:
        log.error("%s; this node's usage is left for the reconciler", problem)
    try:
        rc = body(Hook(e, config, hooks, log, started))
    except Exception as exc:  # noqa: BLE001 - a non-zero exit would drain the node
        log.error("failed, left for the reconciler: %s: %s", exc.__class__.__name__, exc)
        return fail_rc
    return rc or 0


def main_for(name: str, body: Callable[[Hook], int | None]) -> Callable[[], None]:
    def main() -> None:
        sys.exit(run(name, body))
    return main
