"""Read this node's GPU device files from gres.conf, in Slurm index order."""

from __future__ import annotations

import re

from slurm_plugin.slurm import expand_hostlist

DEFAULT_GRES_CONF = "/etc/slurm/gres.conf"
DEFAULT_MIG_MINORS = "/proc/driver/nvidia-caps/mig-minors"


def expand(expr: str) -> list[str]:
    """Expand a Slurm host/file list: 'n[01-03,7],x' -> n01 n02 n03 n7 x (the one
    hostlist rule, :func:`slurm_plugin.slurm.expand_hostlist`)."""
    return expand_hostlist(expr)


def _fields(line: str) -> dict[str, str]:
    out = {}
    for tok in line.split():
        key, sep, value = tok.partition("=")
        if sep:
            out[key.lower()] = value
    return out


def parse_gres_conf(text: str, node_name: str) -> list[tuple[str, ...]]:
    """Device files of each GPU on `node_name`; entry i is Slurm GPU index i.

    `File=` gives one GPU per file; `MultipleFiles=` gives one GPU with several
    files (e.g. a MIG slice: /dev/nvidia0 plus its nvidia-caps files).
    """
    gpus: list[tuple[str, ...]] = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        f = _fields(line)
        if f.get("name", "").lower() != "gpu":
            continue
        if "nodename" in f and node_name not in expand(f["nodename"]):
            continue
        if "multiplefiles" in f:
            gpus.append(tuple(expand(f["multiplefiles"])))
        elif "file" in f:
            gpus.extend((p,) for p in expand(f["file"]))
    return gpus


def parse_mig_minors(text: str) -> dict[int, tuple[int, int]]:
    """nvidia-caps minor -> (GPU minor, GPU instance id) from the driver's mig-minors."""
    out: dict[int, tuple[int, int]] = {}
    for line in text.splitlines():
        m = re.match(r"^gpu(\d+)/gi(\d+)/(?:ci\d+/)?access\s+(\d+)$", line.strip())
        if m:
            out[int(m.group(3))] = (int(m.group(1)), int(m.group(2)))
    return out


def read_text(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return fh.read()
    except OSError:
        return None
