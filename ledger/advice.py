"""What a refusal suggests: by how much a token falls short of a job, the shorter time limit
that would fit, the cheaper tier that would; the partition a scoped token wants.

One text for every door: the reserve's refusal (sbatch, salloc, ``hold reserve``) and
``gpuledger quote`` say the same. Pure arithmetic over the numbers the caller already has
(``ledger.pricing``), so the refusal costs no extra query.
"""

from __future__ import annotations

from dataclasses import replace

from .amounts import fmt_duration, fmt_hours, fmt_rate
from .pricing import hold_cost
from .tiers import Tiers
from .views import HoldRequest


def fitting_minutes(request: HoldRequest, rate: int, share: int, multiplier: int,
                    available: int) -> int | None:
    """The longest time limit in whole minutes, shorter than the request's, at which it
    would fit in ``available``; None when not even one minute would."""
    def cost(minutes: int) -> int:
        return hold_cost(request.gpus, minutes * 60, request.tasks, rate, share, multiplier)

    lo, hi = 0, (request.seconds - 1) // 60
    while lo < hi:  # the largest m in [0, hi] with cost(m) <= available (cost(0) is 0)
        mid = (lo + hi + 1) // 2
        if cost(mid) <= available:
            lo = mid
        else:
            hi = mid - 1
    return lo or None


def cheaper_tier(request: HoldRequest, rate: int, share: int, held_ppm: int, tiers: Tiers,
                 available: int, partitions: tuple[str, ...] = ()
                 ) -> tuple[str, int, int] | None:
    """(``-p NAME`` or ``-q NAME``, multiplier ppm, amount) of the cheapest partition or QOS
    tier at which the request would fit in ``available``; None if none. A token scoped to
    ``partitions`` is offered only those."""
    best = None
    options = [("-p", p, replace(request, partition=p)) for p in tiers.partition
               if not partitions or p in partitions]
    options += [("-q", q, replace(request, qos=q)) for q in tiers.qos]
    for flag, name, req in options:
        ppm = tiers.hold_ppm(req.partitions, req.qos)
        if ppm >= held_ppm:
            continue
        amount = hold_cost(req.gpus, req.seconds, req.tasks, rate, share, ppm)
        if amount <= available and (best is None or amount < best[2]):
            best = (f"{flag} {name}", ppm, amount)
    return best


def shortfall(request: HoldRequest, needed: int, available: int, rate: int, share: int,
              multiplier: int, tiers: Tiers, partitions: tuple[str, ...] = ()) -> str:
    """``5.500 GPU-h short; -t 1:15:00 would fit, or -p scavenger (x0.25) would hold
    2.000 GPU-h``: what to do when a token has ``available`` of the ``needed``."""
    text = f"{fmt_hours(needed - available)} GPU-h short"
    offers = []
    minutes = fitting_minutes(request, rate, share, multiplier, available)
    if minutes:
        offers.append(f"-t {fmt_duration(minutes * 60)} would fit")
    tier = cheaper_tier(request, rate, share, multiplier, tiers, available, partitions)
    if tier:
        offers.append(f"{tier[0]} (x{fmt_rate(tier[1])}) would hold {fmt_hours(tier[2])} GPU-h")
    return text + ("; " + ", or ".join(offers) if offers else "")


def partition_hint(allowed: tuple[str, ...]) -> str:
    """``submit with -p gpu`` (or ``-p gpu or -p a100``) for a token scoped to partitions."""
    return "submit with " + " or ".join(f"-p {p}" for p in allowed[:3]) + \
        (" (or another of its partitions)" if len(allowed) > 3 else "")
