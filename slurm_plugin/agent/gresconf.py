"""This node's GPU device files from gres.conf, in Slurm index order (read by
:mod:`ledger.slurmsyntax`), and the driver's MIG minors."""

from __future__ import annotations

import re

from ledger.slurmsyntax import gres_conf, node_gpus

DEFAULT_GRES_CONF = "/etc/slurm/gres.conf"
DEFAULT_MIG_MINORS = "/proc/driver/nvidia-caps/mig-minors"


def parse_gres_conf(text: str, node_name: str) -> list[tuple[str, ...]]:
    """Device files of each GPU on `node_name` (:func:`ledger.slurmsyntax.node_gpus`);
    entry i is Slurm GPU index i. `File=` gives one GPU per file; `MultipleFiles=` gives
    one GPU with several files (e.g. a MIG slice: /dev/nvidia0 plus its nvidia-caps files);
    GPUs without device files (AutoDetect) are not listed."""
    return [files for _, files in node_gpus(gres_conf(text), node_name) if files]


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
