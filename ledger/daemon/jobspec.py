"""sbatch-style GPU requests for ``gpuledger quote`` (the Lua does the same inside slurmctld)."""

from __future__ import annotations

import re

from ..errors import InvalidInput

SHARED_GRES = ("shard", "mps")  # GPU-backed GRES that hand out a share of a GPU
_GRES_GPU = re.compile(r"^(?:gres[:/])?gpu(?::([A-Za-z][A-Za-z0-9_.+-]*))?(?::(\d+))?$")
_GPUS = re.compile(r"^(?:([A-Za-z][A-Za-z0-9_.+-]*):)?(\d+)$")


def parse_gres(text: str) -> tuple[int, str | None]:
    """``gpu:h100:4`` → (4, "h100"); ``gpu:2`` → (2, None); ``gpu`` → (1, None).

    Other GRES in a comma list are ignored; two GPU entries of different types are refused,
    and so are shares of a GPU (``shard``, ``mps``), which tokens cannot pay for yet.
    """
    count, gpu_type = 0, None
    for item in (i.strip() for i in text.split(",")):
        name = re.split(r"[:=]", re.sub(r"^gres[:/]", "", item), maxsplit=1)[0]
        if name in SHARED_GRES:
            raise InvalidInput(f"shared-GPU requests ({item}) cannot be paid with a GPU token "
                               "yet; ask for whole GPUs (gpu:N)")
        if name != "gpu":
            continue
        m = _GRES_GPU.match(item)
        if not m:
            raise InvalidInput(f"cannot read the GPU request {item!r}")
        if m.group(1) and gpu_type and m.group(1) != gpu_type:
            raise InvalidInput("one GPU type per job")
        gpu_type = m.group(1) or gpu_type
        count += int(m.group(2) or 1)
    return count, gpu_type


def parse_gpus(text: str) -> tuple[int, str | None]:
    """``--gpus``-style ``h100:4`` or ``4``."""
    m = _GPUS.match(text.strip())
    if not m:
        raise InvalidInput(f"cannot read the GPU count {text!r} (e.g. 4 or h100:4)")
    return int(m.group(2)), m.group(1)


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
