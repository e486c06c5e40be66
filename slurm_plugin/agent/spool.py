"""Crash-safe local spool: one JSON file per job, replaced atomically."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from ledger.config import AgentSection
from slurm_plugin.safefs import SafeDir

log = logging.getLogger("gpuledger.agent")

DEFAULT_SPOOL = AgentSection.spool  # [agent] spool (ledger.config)
_NAME = re.compile(r"^job-(\d+)\.(\d+)\.json$")


class Spool:
    """Job states under a directory (mode 0700); writes are temp + fsync + rename.

    Every access goes through ``safefs``: the directory must be root's (or this uid's) and
    writable by nobody else, or it is refused (``safefs.UnsafePath``, an OSError); files are
    opened relative to it without following symlinks."""

    def __init__(self, directory: str | os.PathLike[str], *, fsync: bool = True) -> None:
        self.dir = Path(directory)
        self.fsync = fsync

    def ensure(self) -> None:
        with SafeDir(self.dir, create=True, mode=0o700) as d:
            d.chmod(0o700)

    def path(self, job_id: int, restart: int) -> Path:
        return self.dir / self._name(job_id, restart)

    @staticmethod
    def _name(job_id: int, restart: int) -> str:
        return f"job-{int(job_id)}.{int(restart)}.json"

    def _open(self) -> SafeDir | None:
        """The checked directory; None when it does not exist."""
        try:
            return SafeDir(self.dir)
        except FileNotFoundError:
            return None

    def write(self, job_id: int, restart: int, state: dict[str, Any]) -> None:
        data = json.dumps(state, separators=(",", ":"), sort_keys=True).encode()
        with SafeDir(self.dir) as d:
            d.write_atomic(self._name(job_id, restart), data, mode=0o600, fsync=self.fsync)

    def read(self, job_id: int, restart: int) -> dict[str, Any] | None:
        try:
            d = self._open()
        except OSError as exc:
            log.error("gpuledger-agent: spool %s refused: %s", self.dir, exc)
            return None
        if d is None:
            return None
        with d:
            return self._load(d, self._name(job_id, restart))

    def _load(self, d: SafeDir, name: str) -> dict[str, Any] | None:
        try:
            raw = d.read(name)
            if raw is None:
                return None
            state = json.loads(raw)
        except (OSError, ValueError) as exc:
            log.error("gpuledger-agent: unreadable spool file %s: %s", self.dir / name, exc)
            return None
        if not isinstance(state, dict):
            log.error("gpuledger-agent: spool file %s is not an object", self.dir / name)
            return None
        return state

    def load_all(self) -> list[dict[str, Any]]:
        """Every readable job state (temp files and strangers are ignored)."""
        try:
            d = self._open()
        except OSError as exc:
            log.error("gpuledger-agent: spool %s refused: %s", self.dir, exc)
            return []
        if d is None:
            return []
        out = []
        with d:
            for name in d.names():
                if _NAME.match(name):
                    state = self._load(d, name)
                    if state is not None:
                        out.append(state)
        return out

    def prune(self, older_than_s: float, now_s: float) -> int:
        """Delete finished job files (and stale temp files) not touched for older_than_s."""
        removed = 0
        try:
            d = self._open()
        except OSError as exc:
            log.error("gpuledger-agent: spool %s refused: %s", self.dir, exc)
            return 0
        if d is None:
            return 0
        with d:
            for name in d.names():
                try:
                    age = now_s - d.lstat(name).st_mtime
                except OSError:
                    continue
                if age < older_than_s:
                    continue
                if name.endswith(".tmp") or (
                    _NAME.match(name) and (self._load(d, name) or {}).get("finished")
                ):
                    d.unlink(name)
                    removed += 1
        return removed
