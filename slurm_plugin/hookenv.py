"""What Slurm gives the hooks in their environment, and the frame that makes them exit 0.

The hooks read only their environment (Slurm's docs: prolog/epilog must not call Slurm
commands) — never ``SLURM_JOB_COMMENT``, which is the user's own ``--comment`` and so
hostile input. Which hold belongs to which job is the ledger's record (PrologSlurmctld
binds it from the AdminComment job_submit wrote); the node hooks look it up by job id.
Every value is read through :class:`EnvReader` within a length, and lists are expanded only
within a count checked first (``ledger.slurmsyntax``): the environment cannot make a root
hook allocate or log without bound.
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
from ledger import slurmsyntax
from ledger.errors import ConfigError

from . import hooklog
from .hookconf import HookConfig, hook_config

TOKEN_VAR = "SPANK_GPULEDGER_TOKEN"
_INDICES = re.compile(r"^\d+(?:-\d+)?(?:,\d+(?:-\d+)?)*$")

# Every value the hooks take from their environment is read by EnvReader, within a length:
# 4 KiB unless named here. A longer value is refused (one log line), never truncated into
# something else. Lists are then expanded within a count (slurmsyntax.MAX_GPUS,
# slurmsyntax.MAX_HOSTS) checked before anything is built.
MAX_VALUE = 4096
MAX_LENGTH = {
    TOKEN_VAR: 4096 + 64,  # ledger.tokens.MAX_TOKEN_LENGTH, blanks around it allowed
    "SLURM_JOB_NODELIST": 64 * 1024,  # a compressed list of up to slurmsyntax.MAX_HOSTS nodes
    "SLURM_NODELIST": 64 * 1024,
    "SLURM_JOB_ID": 20, "SLURM_JOBID": 20, "SLURM_ARRAY_JOB_ID": 20,
    "SLURM_ARRAY_TASK_ID": 20, "SLURM_JOB_RESTART_COUNT": 9, "SLURM_RESTART_COUNT": 9,
}


def env_indices(text: str | None) -> tuple[list[int], str | None]:
    """``0-1,3`` → ([0, 1, 3], None); anything else → ([], why) instead of raising. A list of
    more than slurmsyntax.MAX_GPUS indices is refused before it is expanded."""
    text = (text or "").strip()
    if not text or text in ("N/A", "(null)"):
        return [], None
    shown = f"SLURM_JOB_GPUS={text[:60]!r}{'…' if len(text) > 60 else ''}"
    if len(text) > MAX_VALUE:
        return [], f"SLURM_JOB_GPUS is {len(text)} characters long (at most {MAX_VALUE})"
    if not _INDICES.match(text):
        return [], f"{shown} is not a list of GPU indices"
    try:
        return slurmsyntax.expand_indices(text, slurmsyntax.MAX_GPUS), None
    except slurmsyntax.TooLarge:
        return [], f"{shown} names more than {slurmsyntax.MAX_GPUS} GPUs"
    except ValueError:
        return [], f"{shown} is not a list of GPU indices"


class EnvReader:
    """The one reader of hook environment values: each within its length (MAX_LENGTH, else
    MAX_VALUE); what is refused is kept in ``problems`` for the hook to log."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env
        self.problems: list[str] = []

    def get(self, *names: str) -> str | None:
        """The first of ``names`` set and non-empty; None when unset, or too long."""
        for name in names:
            value = self.env.get(name)
            if not value:
                continue
            limit = MAX_LENGTH.get(name, MAX_VALUE)
            if len(value) > limit:
                self.problems.append(f"{name} is {len(value)} characters long (at most "
                                     f"{limit}); not used")
                return None
            return value
        return None

    def digits(self, *names: str) -> str | None:
        text = (self.get(*names) or "").strip()
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
    token_given: bool = False  # SPANK_GPULEDGER_TOKEN is set, blank or not

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> HookEnv:
        r = EnvReader(env)
        restart = r.digits("SLURM_JOB_RESTART_COUNT", "SLURM_RESTART_COUNT")
        gpus, why = env_indices(r.get("SLURM_JOB_GPUS"))
        if why:
            r.problems.append(why)
        nodelist = r.get("SLURM_JOB_NODELIST", "SLURM_NODELIST")
        try:
            nodes = slurmsyntax.expand_hostlist(nodelist)  # at most MAX_HOSTS, as it goes
        except slurmsyntax.SlurmSyntaxError:
            nodes = []
            r.problems.append(f"SLURM_JOB_NODELIST={(nodelist or '')[:60]!r} is not a host "
                              "list (or names too many hosts)")
        array_job = r.digits("SLURM_ARRAY_JOB_ID")
        array_task = r.digits("SLURM_ARRAY_TASK_ID")
        job_id = r.digits("SLURM_JOB_ID", "SLURM_JOBID") or ""
        return cls(
            job_id=job_id,
            node=r.get("SLURMD_NODENAME") or os.uname().nodename.split(".")[0],
            restart=int(restart) if restart else 0,
            gpus=gpus,
            token=(r.get(TOKEN_VAR) or "").strip() or None,
            token_given=r.get(TOKEN_VAR) is not None,
            user=r.get("SLURM_JOB_USER"),
            account=r.get("SLURM_JOB_ACCOUNT"),
            partition=r.get("SLURM_JOB_PARTITION"),
            array_job_id=array_job,
            array_task_id=array_task if array_job else None,
            nodes=nodes,
            sluid=slurmsyntax.sluid(r.get("SLURM_JOB_SLUID")),
            problems=tuple(r.problems),
        )

    @property
    def owners(self) -> list[str]:
        """Job ids a hold of this job may be bound to: its own, then its array's."""
        return list(dict.fromkeys(i for i in (self.job_id, self.array_job_id) if i))

    @property
    def may_be_ours(self) -> bool:
        """A job with neither a token nor GPUs cannot have a hold: leave at once. A token
        variable that is there but blank is not "no token": PrologSlurmctld must see such a
        job (a deferred one is cancelled, never run unpaid)."""
        return bool(self.token or self.token_given or self.gpus or self.problems)


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
        if e.problems:  # a job id refused (too long): said once, untagged
            log = hooklog.setup(name, None, None, use_syslog=True)
            for problem in e.problems:
                log.error("%s; nothing done", problem)
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
