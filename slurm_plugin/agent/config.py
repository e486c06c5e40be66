"""Agent settings: the schema's [agent] and [idle] (ledger.config), from an optional TOML
file, then command-line overrides."""

from __future__ import annotations

import socket
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ledger import config as config_mod
from ledger import schema
from ledger.errors import ConfigError
from ledger.idle import IdlePolicy
from slurm_plugin.agent.gresconf import parse_gres_conf, parse_mig_minors, read_text

_D = config_mod.AgentSection()


@dataclass
class AgentConfig:
    """Settings of `gpuledger agent` (the [agent] table of its file; defaults, checks and docs
    in :class:`ledger.config.AgentSection`)."""

    socket: str = _D.socket
    spool: str = _D.spool
    interval: float = _D.interval
    gres_conf: str = _D.gres_conf
    node_name: str = field(default_factory=lambda: socket.gethostname().split(".")[0])
    # Explicit device list (overrides gres.conf): one entry per Slurm index, each a
    # device file, a GPU-/MIG- UUID, or a list of files (MultipleFiles).
    devices: list[Any] | None = None
    mig_minors: str = _D.mig_minors
    allowed_uids: list[int] | None = None
    keep_finished_days: float = _D.keep_finished_days
    idle: IdlePolicy = field(default_factory=IdlePolicy)  # the file's [idle] table

    @classmethod
    def load(cls, path: str | None, **overrides: Any) -> AgentConfig:
        """Defaults, then the file's settings, then ``overrides`` (None: not given); every
        problem is a ValueError naming the file, the table and the key."""
        section, idle = _D, IdlePolicy()
        if path:
            try:
                raw = tomllib.loads(Path(path).read_text())
                section, idle = config_mod.agent_settings(raw, path)
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
            except tomllib.TOMLDecodeError as exc:
                raise ValueError(f"{path} is not valid TOML: {exc}") from None
        items = {i.attr: i for i in schema.items(config_mod.AgentSection)}
        data = {a: getattr(section, a) for a in items if getattr(section, a) is not None}
        for key, value in overrides.items():
            if value is None:
                continue
            if key not in items:
                raise ValueError(f"unknown agent setting {key}")
            try:
                data[key] = schema.convert(items[key], value, "agent option")
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
        for key in ("devices", "allowed_uids"):
            if key in data:
                data[key] = [list(d) if isinstance(d, tuple) else d for d in data[key]]
        return cls(**data, idle=idle)

    def specs(self) -> list[tuple[str, ...]]:
        """Device files (or UUIDs) per Slurm GPU index."""
        if self.devices is not None:
            return [tuple(d) if isinstance(d, list) else (str(d),) for d in self.devices]
        text = read_text(self.gres_conf)
        return parse_gres_conf(text, self.node_name) if text else []

    def mig_minor_map(self) -> dict[int, tuple[int, int]]:
        text = read_text(self.mig_minors)
        return parse_mig_minors(text) if text else {}
