"""What the prolog leaves on the node for the epilog: one small JSON file per job run.

The epilog needs the restart count the prolog saw (slurmd already counts a requeue when the
epilog of the requeued run starts), the start time and the GPUs. Written atomically.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path


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


def _path(state_dir: Path, job_id: str, restart: int) -> Path:
    return state_dir / f"{job_id}.{restart}.json"


def save(state_dir: Path, run: NodeRun) -> Path:
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = _path(state_dir, run.job_id, run.restart)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(run.to_dict()))
    os.replace(tmp, path)
    return path


def load(state_dir: Path, job_id: str) -> NodeRun | None:
    """The oldest unsettled run of this job on this node (a requeued run settles first)."""
    runs = []
    for p in state_dir.glob(f"{job_id}.*.json"):
        try:
            runs.append(NodeRun(**json.loads(p.read_text())))
        except (OSError, ValueError, TypeError):
            continue
    return min(runs, key=lambda r: r.restart) if runs else None


def done(state_dir: Path, run: NodeRun) -> None:
    try:
        _path(state_dir, run.job_id, run.restart).unlink()
    except FileNotFoundError:
        pass
