"""Settings of the prolog, epilog and reconciler: the ``[hooks]`` table of gpuledger.toml."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ledger.config import Config
from ledger.errors import ConfigError
from ledger.shares import DEFAULT_GRES_CONF


@dataclass(frozen=True)
class HookConfig:
    state_dir: Path = Path("/var/lib/gpuledger/jobs")  # per-node prolog records
    log_file: Path | None = Path("/var/log/gpuledger/hooks.log")
    agent_socket: str | None = None  # None: the agent's default socket
    agent_spool: str | None = None  # None: the agent's default spool (read when it is down)
    syslog: bool = True
    grace_s: int = 600  # a pending hold with no Slurm job is voided after this
    lookback_days: int = 30  # how far back the reconciler asks sacct
    gres_conf: str = DEFAULT_GRES_CONF  # GPU types and shard counts by index (prolog, daemon)
    close_wait_s: float = 30.0  # EpilogSlurmctld waits this long for the nodes' charges


def hook_config(config: Config) -> HookConfig:
    raw = config.section("hooks")
    d = HookConfig()
    try:
        log_file = raw.get("log_file", str(d.log_file))
        return HookConfig(
            state_dir=Path(raw.get("state_dir", str(d.state_dir))),
            log_file=Path(log_file) if log_file else None,
            agent_socket=raw.get("agent_socket") or None,
            agent_spool=raw.get("agent_spool") or None,
            syslog=bool(raw.get("syslog", d.syslog)),
            grace_s=int(raw.get("grace_seconds", d.grace_s)),
            lookback_days=int(raw.get("lookback_days", d.lookback_days)),
            gres_conf=str(raw.get("gres_conf", d.gres_conf)),
            close_wait_s=float(raw.get("close_wait_seconds", d.close_wait_s)),
        )
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{config.path}: [hooks] {exc}") from None
