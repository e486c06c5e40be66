"""Settings of the prolog, epilog and reconciler: the ``[hooks]`` table of gpuledger.toml,
declared (defaults, checks, docs) in :class:`ledger.config.HooksSection`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ledger.config import Config, HooksSection

_D = HooksSection()


@dataclass(frozen=True)
class HookConfig:
    state_dir: Path = Path(_D.state_dir)
    log_file: Path | None = Path(_D.log_file)
    agent_socket: str | None = _D.agent_socket  # None: the agent's default socket
    agent_spool: str | None = _D.agent_spool  # None: the agent's default spool
    syslog: bool = _D.syslog
    grace_s: int = _D.grace_seconds
    lookback_days: int = _D.lookback_days
    gres_conf: str = _D.gres_conf
    close_wait_s: float = _D.close_wait_seconds
    spool_dir: Path = Path(_D.spool_dir)
    daemon: str | None = None  # None: this host's daemon socket (see ``daemon_address``)


def hook_config(config: Config) -> HookConfig:
    h = config.hooks
    return HookConfig(
        state_dir=Path(h.state_dir),
        log_file=Path(h.log_file) if h.log_file else None,
        agent_socket=h.agent_socket or None,
        agent_spool=h.agent_spool or None,
        syslog=h.syslog,
        grace_s=h.grace_seconds,
        lookback_days=h.lookback_days,
        gres_conf=h.gres_conf,
        close_wait_s=h.close_wait_seconds,
        spool_dir=Path(h.spool_dir),
        daemon=h.daemon or config.daemon.privileged_socket or config.daemon.socket,
    )
