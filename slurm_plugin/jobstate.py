"""What the prolog leaves on the node for the epilog: one small JSON file per job run.

The epilog needs the restart count the prolog saw (slurmd already counts a requeue when the
epilog of the requeued run starts), the start time and the GPUs. Written atomically, by root,
through ``safefs`` only (checked directory, no symlinks).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import safefs


@dataclass
class NodeRun:
    job_id: str
    restart: int
    node: str
    start: float  # epoch seconds, from the prolog
    gpus: list[int] = field(default_factory=list)
    gpu_types: dict[str, str | None] = field(default_factory=dict)  # index (text) → type
    gpu_shards: dict[str, int] = field(default_factory=dict)  # index (text) → its shard count
    hold_id: str | None = None  # unused since the ledger maps jobs to holds; old files
    token_id: str | None = None
    array_job_id: str | None = None
    user: str | None = None  # SLURM_JOB_USER at the prolog
    sluid: str | None = None  # SLURM_JOB_SLUID at the prolog (Slurm 25.11+), else None

    def to_dict(self) -> dict:
        return asdict(self)


def _name(job_id: str, restart: int) -> str:
    return f"{job_id}.{restart}.json"


def _path(state_dir: Path, job_id: str, restart: int) -> Path:
    return state_dir / _name(job_id, restart)


def save(state_dir: Path, run: NodeRun) -> Path:
    """Write the run's record (``safefs``: a checked directory, a fresh temp file renamed
    over it); a directory others could write to raises ``safefs.UnsafePath``."""
    return safefs.write_atomic(state_dir, _name(run.job_id, run.restart),
                               json.dumps(run.to_dict()).encode(), mode=0o600,
                               create=True, dir_mode=0o700, fsync=False)


def load(state_dir: Path, job_id: str) -> NodeRun | None:
    """The oldest unsettled run of this job on this node (a requeued run settles first).
    None when there is none; ``safefs.UnsafePath`` when the directory is not safe."""
    prefix = f"{job_id}."
    runs = []
    try:
        d = safefs.SafeDir(state_dir)
    except FileNotFoundError:
        return None
    with d:
        for name in d.names():
            if not (name.startswith(prefix) and name.endswith(".json")):
                continue
            if not name[len(prefix):-len(".json")].isdigit():
                continue
            try:
                runs.append(NodeRun(**json.loads(d.read(name) or b"")))
            except (OSError, ValueError, TypeError):
                continue
    return min(runs, key=lambda r: r.restart) if runs else None


def done(state_dir: Path, run: NodeRun) -> None:
    try:
        with safefs.SafeDir(state_dir) as d:
            d.unlink(_name(run.job_id, run.restart))
    except FileNotFoundError:
        pass
