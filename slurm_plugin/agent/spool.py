"""Crash-safe local spool: one JSON file per job, replaced atomically."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

log = logging.getLogger("gpuledger.agent")

DEFAULT_SPOOL = "/var/spool/gpuledger/agent"
_NAME = re.compile(r"^job-(\d+)\.(\d+)\.json$")


class Spool:
    """Job states under a directory (mode 0700); writes are temp + fsync + rename."""

    def __init__(self, directory: str | os.PathLike[str], *, fsync: bool = True) -> None:
        self.dir = Path(directory)
        self.fsync = fsync

    def ensure(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.dir, 0o700)

    def path(self, job_id: int, restart: int) -> Path:
        return self.dir / f"job-{int(job_id)}.{int(restart)}.json"

    def write(self, job_id: int, restart: int, state: dict[str, Any]) -> None:
        final = self.path(job_id, restart)
        tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
        data = json.dumps(state, separators=(",", ":"), sort_keys=True).encode()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data)
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)
        if self.fsync:
            self._sync_dir()

    def _sync_dir(self) -> None:
        fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def read(self, job_id: int, restart: int) -> dict[str, Any] | None:
        return self._load(self.path(job_id, restart))

    def _load(self, p: Path) -> dict[str, Any] | None:
        try:
            d = json.loads(p.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.error("gpuledger-agent: unreadable spool file %s: %s", p, exc)
            return None
        if not isinstance(d, dict):
            log.error("gpuledger-agent: spool file %s is not an object", p)
            return None
        return d

    def load_all(self) -> list[dict[str, Any]]:
        """Every readable job state (temp files and strangers are ignored)."""
        if not self.dir.is_dir():
            return []
        out = []
        for p in sorted(self.dir.iterdir()):
            if _NAME.match(p.name):
                d = self._load(p)
                if d is not None:
                    out.append(d)
        return out

    def prune(self, older_than_s: float, now_s: float) -> int:
        """Delete finished job files (and stale temp files) not touched for older_than_s."""
        removed = 0
        if not self.dir.is_dir():
            return 0
        for p in self.dir.iterdir():
            try:
                age = now_s - p.stat().st_mtime
            except OSError:
                continue
            if age < older_than_s:
                continue
            if p.name.endswith(".tmp") or (
                _NAME.match(p.name) and (self._load(p) or {}).get("finished")
            ):
                p.unlink(missing_ok=True)
                removed += 1
        return removed
