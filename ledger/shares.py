"""Shares of a GPU: which GRES hand one out, and how many shares each GPU is cut into.

* ``gpu``: whole GPUs (a MIG slice is a ``gpu`` of its profile's type, priced per profile
  by ``ledger.pricing``).
* ``shard``: ``--gres=shard:N`` takes N of the S_g shards gres.conf gives GPU g; S_g may
  differ per GPU (``Name=shard Count=S File=/dev/nvidiaX``; a ``Count=`` naming several
  files, or none — every GPU of the node —, is spread evenly over them, the remainder to
  the first).
* ``mps``: ``--gres=mps:N`` takes N percent of one GPU (S_g = 100 on every GPU).

Slurm 22.05 gives a job its shards (and its MPS share) from ONE GPU per node: a job asking
for more shards than any one GPU has pends forever, so it is refused at submit. The hold
is priced at the worst case over the candidate GPUs (smallest S_g, see
:meth:`Inventory.hold_share`); the settlement charges s_g / S_g of the GPU it ran on.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .errors import InvalidInput
from .slurmsyntax import gres_conf

GPU, SHARD, MPS = "gpu", "shard", "mps"
KINDS = (GPU, SHARD, MPS)
SHARED = (SHARD, MPS)
MPS_PER_GPU = 100
DEFAULT_GRES_CONF = "/etc/slurm/gres.conf"


def check_kind(gres: str) -> str:
    if gres not in KINDS:
        raise InvalidInput(f"unknown GRES {gres!r}: GPU tokens pay for gpu, shard and mps")
    return gres


@dataclass(frozen=True)
class SharedGpu:
    """One GPU of gres.conf and the shards it is cut into (0: no shards)."""

    node: str | None  # None: a line without NodeName= (every node)
    index: int  # Slurm's GPU index on the node
    gpu_type: str | None
    shards: int


@dataclass(frozen=True)
class Inventory:
    """The GPUs of gres.conf with their shard counts."""

    gpus: tuple[SharedGpu, ...] = ()

    def shards_of(self, node: str, index: int) -> int | None:
        """S_g of one GPU (None: gres.conf does not give it shards)."""
        for g in self.gpus:
            if g.index == index and g.node in (node, None) and g.shards > 0:
                return g.shards
        return None

    def hold_share(self, gres: str, gpu_type: str | None, per_node: int) -> int:
        """The share count a request of ``per_node`` units is held at: for shards the
        smallest S_g among the GPUs (of the type, when one is named) that have at least
        ``per_node`` shards; 100 for MPS; 1 for whole GPUs. InvalidInput when no GPU can
        take the request."""
        check_kind(gres)
        if gres == GPU:
            return 1
        if gres == MPS:
            if not 1 <= per_node <= MPS_PER_GPU:
                raise InvalidInput(f"mps:{per_node} asks for {per_node}% of one GPU; "
                                   f"an MPS share is 1 to {MPS_PER_GPU}")
            return MPS_PER_GPU
        typed = [g for g in self.gpus if g.shards > 0
                 and (not gpu_type or g.gpu_type == gpu_type)]
        if not typed:
            what = f"no {gpu_type} GPU" if gpu_type else "no GPU"
            raise InvalidInput(f"shard requests cannot run here: {what} has shards in gres.conf")
        fits = [g.shards for g in typed if g.shards >= per_node]
        if not fits:
            most = max(g.shards for g in typed)
            raise InvalidInput(f"shard:{per_node} asks for more shards than any "
                               f"{gpu_type + ' ' if gpu_type else ''}GPU has (at most {most} "
                               "per GPU; a job's shards come from one GPU per node)")
        return min(fits)


def parse_gres_conf(text: str) -> Inventory:
    """The GPUs and shard counts of a gres.conf (read by :func:`ledger.slurmsyntax.gres_conf`;
    ``AutoDetect`` lines give nothing here)."""
    gpus: dict[str | None, list[tuple[str | None, tuple[str, ...]]]] = {}
    shard_lines: list[tuple[str | None, int, tuple[str, ...]]] = []
    for line in gres_conf(text):
        for node in line.nodes or (None,):
            if line.name == "gpu":
                gpus.setdefault(node, []).extend((line.gpu_type, f) for f in line.gpus())
            elif line.name == SHARD and line.count is not None:
                shard_lines.append((node, line.count, line.files))
    out: list[SharedGpu] = []
    for node, per in gpus.items():
        shards = [0] * len(per)
        for snode, count, files in shard_lines:
            if snode != node:
                continue
            # the GPUs the line names (none named: all of the node's), the count spread
            # evenly over them, the remainder to the first
            targets = [i for i, (_, gfiles) in enumerate(per)
                       if not files or set(files) & set(gfiles)]
            if targets:
                q, r = divmod(count, len(targets))
                for k, i in enumerate(targets):
                    shards[i] += q + (1 if k < r else 0)
        out.extend(SharedGpu(node, i, t, shards[i]) for i, (t, _) in enumerate(per))
    return Inventory(tuple(out))


class GresFile:
    """gres.conf read on first use and again when it changes (its mtime)."""

    def __init__(self, path: str | os.PathLike | None):
        self.path = Path(path) if path else None
        self._seen: tuple[float, Inventory] | None = None

    def inventory(self) -> Inventory:
        if self.path is None:
            return Inventory()
        try:
            mtime = self.path.stat().st_mtime
        except OSError:
            return Inventory()
        if self._seen is None or self._seen[0] != mtime:
            try:
                self._seen = (mtime, parse_gres_conf(self.path.read_text()))
            except OSError:
                return Inventory()
        return self._seen[1]


def node_shares(gres: str, per_node: int | None, gpus_held: int, share: int,
                gpus: list[int] | tuple[int, ...], shards: Mapping[int, int]
                ) -> dict[int, tuple[int, int]]:
    """GPU index → (s, S) on one node for a hold of shares (``{}`` for whole GPUs).

    Slurm gives a job its shards (or MPS share) on ONE GPU per node, the one in
    SLURM_JOB_GPUS, and exactly the count asked per node (``GRES=shard:3(IDX:0)``), so s is
    the hold's ``per_node`` and S that GPU's shard count from gres.conf (100 for MPS; the
    hold's own share when gres.conf does not say). Were several GPUs listed, the whole share
    is put on the one cut into the fewest shards (the others are not charged): the split is
    unknown there, and the charge never undercuts the hold's price.
    """
    if gres == GPU or not gpus:
        return {}
    per = per_node or gpus_held

    def share_of(i: int) -> int:
        return MPS_PER_GPU if gres == MPS else (shards.get(i) or share)

    gpu = min(gpus, key=lambda i: (share_of(i), i))
    return {gpu: (min(per, share_of(gpu)), share_of(gpu))}
