"""sbatch-style GPU requests for ``gpuledger quote`` (the Lua does the same inside slurmctld)."""

from __future__ import annotations

import re

from ..errors import InvalidInput

SHARED_GRES = ("shard", "mps")  # GPU-backed GRES that hand out a share of a GPU
# A GPU type is any name but a bare number (MIG profiles start with one: 3g.40gb).
_TYPE = r"(?!\d+(?::|$))[A-Za-z0-9][A-Za-z0-9_.+-]*"
_GRES_GPU = re.compile(rf"^(?:gres[:/])?(gpu|shard|mps)(?::({_TYPE}))?(?::(\d+))?$")
_GPUS = re.compile(rf"^(?:({_TYPE}):)?(\d+)$")


def parse_gres(text: str, known: tuple[str, ...] = ()) -> tuple[int, str | None, str]:
    """``gpu:h100:4`` → (4, "h100", "gpu"); ``gpu:2`` → (2, None, "gpu"); ``shard:3`` →
    (3, None, "shard"): a count per node, its GPU type, and which GRES (gpu, shard, mps).

    Other GRES in ``known`` (a site's NIC, say) are ignored, any other name is refused as
    unknown; two GPU entries of different types, or whole GPUs with shares, are refused.
    """
    count, gpu_type, kind = 0, None, None
    for item in (i.strip() for i in text.split(",")):
        name = re.split(r"[:=]", re.sub(r"^gres[:/]", "", item), maxsplit=1)[0]
        if name not in ("gpu", *SHARED_GRES):
            if name in known:
                continue
            raise InvalidInput(f"unknown GRES {name!r} in {item!r}: GPU tokens pay for gpu, "
                               "shard and mps")
        m = _GRES_GPU.match(item)
        if not m:
            raise InvalidInput(f"cannot read the GPU request {item!r}")
        if kind and m.group(1) != kind:
            raise InvalidInput("a job asks for whole GPUs or for shares of one (shard, mps), "
                               "not both")
        kind = m.group(1)
        if m.group(2) and gpu_type and m.group(2).lower() != gpu_type:
            raise InvalidInput("one GPU type per job")
        gpu_type = (m.group(2) or "").lower() or gpu_type  # Slurm matches types without case
        count += int(m.group(3) or 1)
    return count, gpu_type, kind or "gpu"


def parse_gpus(text: str) -> tuple[int, str | None]:
    """``--gpus``-style ``h100:4`` or ``4``."""
    m = _GPUS.match(text.strip())
    if not m:
        raise InvalidInput(f"cannot read the GPU count {text!r} (e.g. 4 or h100:4)")
    return int(m.group(2)), m.group(1).lower() if m.group(1) else None


def array_size(spec: str) -> int:
    """``0-9`` → 10, ``0-9:2`` → 5, ``1,3,5`` → 3, ``0-99%10`` → 100."""
    body = spec.split("%", 1)[0]
    total = 0
    for item in body.split(","):
        m = re.match(r"^(\d+)(?:-(\d+)(?::(\d+))?)?$", item.strip())
        if not m:
            raise InvalidInput(f"cannot read the array spec {spec!r}")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) else lo
        step = int(m.group(3)) if m.group(3) else 1
        if hi < lo or step < 1:
            raise InvalidInput(f"cannot read the array spec {spec!r}")
        total += (hi - lo) // step + 1
    return total
