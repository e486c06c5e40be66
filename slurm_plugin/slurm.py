"""Slurm's vocabulary: the job record the hooks and the reconciler read, and the small
syntax readers (hostlists, index lists, TRES and GRES strings, durations, SLUIDs).

Slurm is read as data by :mod:`slurm_plugin.reader` (``squeue --json``, ``sacct --json``,
parsed in :mod:`slurm_plugin.slurmjson`); nothing here reads a ``Key=Value`` line.

* The SLUID (Slurm's realm-unique job id, ``s`` + 13 Crockford base-32 characters): 25.11
  gives it to Prolog/Epilog and PrologSlurmctld/EpilogSlurmctld as ``SLURM_JOB_SLUID`` (the
  job's SLUID: new on each requeue, kept through a resize); 26.05's ``sacct --json`` prints
  ``original_sluid`` (the job's) beside ``sluid`` (the accounting record's index).
  ``JobRecord.sluid`` is the job's SLUID where Slurm's data names it, else None.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime

from . import bounded

ACTIVE_STATES = frozenset({
    "PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_HOLD",
    "REQUEUE_FED", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED", "SPECIAL_EXIT",
    "RESV_DEL_HOLD", "POWER_UP_NODE", "UPDATE_DB",
})
_SLUID = re.compile(r"^[sS][0-9A-HJKMNP-TV-Za-hjkmnp-tv-z]{13}$")


class SlurmError(Exception):
    """A Slurm command failed or printed something this adapter cannot read."""


# -- small parsers ---------------------------------------------------------------------------


def sluid(text: str | None) -> str | None:
    """A SLUID as Slurm prints it (``s`` + 13 Crockford base-32 characters, slurm-25-11-7-1
    src/common/sluid.c print_sluid), else None: an unset one (``s0000000000000``), a
    missing field, anything else."""
    text = (text or "").strip()
    if not _SLUID.match(text) or not text[1:].strip("0"):
        return None
    return text


def parse_time(text: str | None) -> datetime | None:
    if not text or text in ("Unknown", "None", "N/A", "(null)"):
        return None
    try:
        return datetime.fromisoformat(text).astimezone()
    except ValueError:
        raise SlurmError(f"not a Slurm time: {text!r}") from None


def parse_duration(text: str | None) -> int | None:
    """``[D-]HH:MM:SS`` / ``MM:SS`` → seconds."""
    if not text or text in ("UNLIMITED", "Partition_Limit", "N/A", "INVALID"):
        return None
    days = 0
    if "-" in text:
        d, _, text = text.partition("-")
        days = int(d)
    parts = [int(p) for p in text.split(":")]
    while len(parts) < 3:
        parts.insert(0, 0)
    h, m, s = parts
    return ((days * 24 + h) * 60 + m) * 60 + s


def gpus_in_tres(tres: str | None) -> dict[str | None, int]:
    """GPU counts by type from a TRES string; untyped GPUs under ``None``.

    ``billing=1,cpu=1,gres/gpu:h100=2,gres/gpu=2,node=1`` → ``{"h100": 2}``;
    ``gres/gpu=2`` alone → ``{None: 2}``; a mixed allocation keeps the typed counts and
    puts any untyped rest under ``None``.
    """
    typed: dict[str | None, int] = {}
    total = 0
    for item in (tres or "").split(","):
        name, _, value = item.partition("=")
        name = name.replace("gres:", "gres/")
        if not name.startswith("gres/gpu") or not value:
            continue
        count = int(value)
        if name == "gres/gpu":
            total = count
        elif name.startswith("gres/gpu:"):
            typed[name.split(":", 1)[1]] = typed.get(name.split(":", 1)[1], 0) + count
    rest = total - sum(typed.values())
    if rest > 0:
        typed[None] = rest
    return typed


MAX_HOSTS = 65536  # Slurm's hostlist.c MAX_RANGE: more names than that in one list is refused


def _split_top(expr: str) -> list[str]:
    """Split on the commas outside brackets."""
    parts, depth, cur = [], 0, []
    for ch in expr:
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p for p in parts if p]


def expand_hostlist(text: str | None, limit: int = MAX_HOSTS) -> list[str]:
    """A Slurm host (or file) list, as slurm-22-05-8-1 src/common/hostlist.c expands it:
    ``gpu[01-03,7],login1`` → ``gpu01 gpu02 gpu03 gpu7 login1``; every bracket of a name is
    a range of its own (``rack[1-2]-n[1-2]`` → ``rack1-n1 rack1-n2 rack2-n1 rack2-n2``); a
    range keeps the width of a zero-padded low end. More than ``limit`` names, an
    unbalanced bracket or a range that runs backwards raise :class:`SlurmError`."""
    if not text or text in ("(null)", "None assigned", "None"):
        return []
    if text.count("[") != text.count("]"):
        raise SlurmError(f"not a hostlist: {text[:80]!r}")
    out: list[str] = []

    def walk(part: str) -> None:
        lb = part.find("[")
        if lb < 0:
            out.append(part)
            if len(out) > limit:
                raise SlurmError(f"hostlist of more than {limit} names: {text[:80]!r}")
            return
        rb = part.find("]", lb)
        if rb < 0:
            raise SlurmError(f"not a hostlist: {text[:80]!r}")
        head, body, tail = part[:lb], part[lb + 1:rb], part[rb + 1:]
        for item in body.split(","):
            lo, dash, hi = item.partition("-")
            if not lo.isdigit() or (dash and not hi.isdigit()):
                raise SlurmError(f"not a hostlist range: {item!r} in {text[:80]!r}")
            first, last = int(lo), int(hi) if dash else int(lo)
            if last < first or last - first > limit:
                raise SlurmError(f"not a hostlist range: {item!r} in {text[:80]!r}")
            width = len(lo) if lo.startswith("0") else 0
            for n in range(first, last + 1):
                walk(f"{head}{n:0{width}d}{tail}")

    for part in _split_top(text):
        walk(part)
    return out


def expand_indices(text: str, limit: int = bounded.MAX_GPUS) -> list[int]:
    """``0-1,3`` → ``[0, 1, 3]`` (GPU indices, task ids); more than ``limit`` entries, or
    anything else, raise :class:`SlurmError` before anything is expanded
    (:func:`slurm_plugin.bounded.expand_indices`)."""
    try:
        return bounded.expand_indices(text, limit)
    except ValueError as exc:
        raise SlurmError(f"not an index list: {(text or '')[:60]!r} ({exc})") from None


_GRES_IDX = re.compile(r"gpu(?::([^:(,]+))?(?::\d+)?\(IDX:([^)]*)\)")


def gres_indices(text: str) -> dict[int, str | None]:
    """``gpu:h100:1(IDX:0),gpu:a100:1(IDX:2)`` → ``{0: 'h100', 2: 'a100'}``."""
    out: dict[int, str | None] = {}
    for m in _GRES_IDX.finditer(text or ""):
        gtype = m.group(1)
        if gtype and gtype.isdigit():  # gpu:2(IDX:0-1): a count, not a type
            gtype = None
        for i in expand_indices(m.group(2)):
            out[i] = gtype
    return out


# -- job records -----------------------------------------------------------------------------


@dataclass
class JobRecord:
    """One job (or one array task / one run of a requeued job), as Slurm reports it."""

    job_id: str  # the raw numeric id (an array task has its own)
    display_id: str  # 1234 or 1234_5
    state: str
    array_job_id: str | None = None
    array_task: str | None = None  # "5", or "1-3%1" for a pending remainder
    restarts: int | None = None
    reason: str | None = None
    start: datetime | None = None
    end: datetime | None = None
    elapsed_s: int | None = None
    nodes: list[str] = field(default_factory=list)
    gpus: dict[str | None, int] = field(default_factory=dict)  # whole job, by type
    gpu_idx: dict[str, dict[int, str | None]] = field(default_factory=dict)  # node → {index: type}
    admin_comment: str = ""
    source: str = "scontrol"
    time_limit_s: int | None = None
    user: str | None = None
    account: str | None = None
    superseded: bool = False  # sacct -D: a later run of the same job exists
    stepped: bool = False  # sacct: the run started a step (its script ran)
    node_count: int | None = None  # squeue: the nodes it has, or asks for while pending
    tres_per_node: str | None = None  # the --gres request, e.g. gres:shard:3
    sluid: str | None = None  # this run's SLUID (25.11+: SLURM_JOB_SLUID in the hooks)
    qos: str | None = None  # the QOS it runs in
    partition: str | None = None  # one once it runs; the candidates before

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES and not self.superseded

    @property
    def ran(self) -> bool:
        """Whether it was ever given nodes (a job cancelled while pending was not)."""
        return bool(self.nodes) and self.start is not None

    @property
    def gpu_count(self) -> int:
        return sum(self.gpus.values())


def base_state(text: str) -> str:
    """``CANCELLED by 0`` → ``CANCELLED``; ``COMPLETING+`` → ``COMPLETING``."""
    return (text or "").split(" ")[0].rstrip("+").upper()


