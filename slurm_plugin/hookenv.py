"""What slurmd gives the prolog/epilog, and the shared frame that makes them always exit 0."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from ledger import config as config_mod
from ledger.errors import ConfigError

from . import hooklog
from .hookconf import HookConfig, hook_config
from .slurm import expand_indices

TOKEN_VAR = "SPANK_GPULEDGER_TOKEN"


@dataclass(frozen=True)
class HookEnv:
    job_id: str
    node: str
    restart: int
    gpus: list[int]
    token: str | None
    comment: str | None  # SLURM_JOB_COMMENT: job_submit may mirror its mark there

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> HookEnv:
        restart = env.get("SLURM_JOB_RESTART_COUNT") or env.get("SLURM_RESTART_COUNT") or "0"
        return cls(
            job_id=env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID") or "",
            node=env.get("SLURMD_NODENAME") or os.uname().nodename.split(".")[0],
            restart=int(restart) if restart.isdigit() else 0,
            gpus=expand_indices(env.get("SLURM_JOB_GPUS", "")),
            token=(env.get(TOKEN_VAR) or "").strip() or None,
            comment=env.get("SLURM_JOB_COMMENT"),
        )

    @property
    def may_be_ours(self) -> bool:
        """A job with neither a token nor GPUs nor our mark cannot have a hold: leave at once."""
        return bool(self.token or self.gpus or (self.comment or "").startswith("gpuledger:"))


@dataclass
class Hook:
    env: HookEnv
    config: config_mod.Config
    hooks: HookConfig
    log: logging.Logger
    started: float


def run(name: str, body: Callable[[Hook], None], env: Mapping[str, str] | None = None) -> int:
    """Run a hook body; every failure is logged and left for the reconciler. Always 0."""
    started = time.time()
    e = HookEnv.from_env(os.environ if env is None else env)
    if not e.job_id or not e.may_be_ours:
        return 0
    log = hooklog.setup(name, e.job_id, None, use_syslog=True)
    try:
        config = config_mod.load()
        hooks = hook_config(config)
    except ConfigError as exc:
        log.error("no usable configuration, left for the reconciler: %s", exc)
        return 0
    log = hooklog.setup(name, e.job_id, hooks.log_file, hooks.syslog)
    try:
        body(Hook(e, config, hooks, log, started))
    except Exception as exc:  # noqa: BLE001 - a non-zero exit would drain the node
        log.error("failed, left for the reconciler: %s: %s", exc.__class__.__name__, exc)
    return 0


def main_for(name: str, body: Callable[[Hook], None]) -> Callable[[], None]:
    def main() -> None:
        sys.exit(run(name, body))
    return main
