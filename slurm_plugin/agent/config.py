"""Agent settings: defaults, an optional TOML file, command-line overrides."""

from __future__ import annotations

import socket
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ledger.errors import ConfigError
from ledger.idle import IdlePolicy
from ledger.idle import parse as parse_idle
from slurm_plugin.agent.gresconf import (
    DEFAULT_GRES_CONF,
    DEFAULT_MIG_MINORS,
    parse_gres_conf,
    parse_mig_minors,
    read_text,
)
from slurm_plugin.agent.server import DEFAULT_SOCKET
from slurm_plugin.agent.spool import DEFAULT_SPOOL


@dataclass
class AgentConfig:
    """Settings of `gpuledger agent` (the [agent] table of the config file)."""

    socket: str = DEFAULT_SOCKET
    spool: str = DEFAULT_SPOOL
    interval: float = 1.0
    gres_conf: str = DEFAULT_GRES_CONF
    node_name: str = field(default_factory=lambda: socket.gethostname().split(".")[0])
    # Explicit device list (overrides gres.conf): one entry per Slurm index, each a
    # device file, a GPU-/MIG- UUID, or a list of files (MultipleFiles).
    devices: list[Any] | None = None
    mig_minors: str = DEFAULT_MIG_MINORS
    allowed_uids: list[int] | None = None
    keep_finished_days: float = 7.0
    idle: IdlePolicy = field(default_factory=IdlePolicy)  # the file's [idle] table

    @classmethod
    def load(cls, path: str | None, **overrides: Any) -> AgentConfig:
        data: dict[str, Any] = {}
        idle = IdlePolicy()
        if path:
            raw = tomllib.loads(Path(path).read_text())
            if isinstance(raw.get("idle"), dict):
                try:
                    idle = parse_idle(raw["idle"], f"{path}: [idle]")
                except ConfigError as exc:
                    raise ValueError(str(exc)) from None
            if "agent" in raw:
                data = dict(raw["agent"])
            else:  # a flat file, or a shared file without an [agent] table
                data = {k: v for k, v in raw.items() if not isinstance(v, dict)}
        known = {f.name for f in fields(cls)} - {"idle"}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown agent settings: {', '.join(sorted(unknown))}")
        data.update({k: v for k, v in overrides.items() if v is not None})
        cfg = cls(**data, idle=idle)
        if not 0.05 <= float(cfg.interval) <= 3600:
            raise ValueError("interval must be between 0.05 and 3600 seconds")
        return cfg

    def specs(self) -> list[tuple[str, ...]]:
        """Device files (or UUIDs) per Slurm GPU index."""
        if self.devices is not None:
            return [tuple(d) if isinstance(d, list) else (str(d),) for d in self.devices]
        text = read_text(self.gres_conf)
        return parse_gres_conf(text, self.node_name) if text else []

    def mig_minor_map(self) -> dict[int, tuple[int, int]]:
        text = read_text(self.mig_minors)
        return parse_mig_minors(text) if text else {}
