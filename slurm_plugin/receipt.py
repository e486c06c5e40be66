"""A job's receipt: token, hold, held/charged/returned, per node and per GPU, journal seqs.

Per GPU it shows what the settlement recorded (held, busy, energy, peak memory, rate,
policy); per hold the efficiency, busy ÷ held of the measured GPUs (the reports' rule).
"""

from __future__ import annotations

from dataclasses import asdict

from ledger.charge_record import ChargeRecord
from ledger.errors import NotFound
from ledger.service import Ledger
from reports.figures import Measure

from . import marks
from .reader import SlurmReader
from .slurm import SlurmError


def holds_for_job(ledger: Ledger, job_id: str, reader: SlurmReader | None = None,
                  cluster: str | None = None) -> list:
    """Holds bound to the job (or its array) on ``cluster`` (the clusters sharing a ledger
    reuse each other's job ids), else the one its AdminComment names."""
    base = job_id.split("_")[0]
    found = ledger.holds(job_id=base, cluster=cluster)
    if found or reader is None:
        return found
    try:
        record = reader.job(job_id)
    except SlurmError:
        record = None
    if record is not None and record.array_job_id:
        found = ledger.holds(job_id=record.array_job_id, cluster=cluster)
        if found:
            return found
    mark = marks.parse(record.admin_comment) if record else None
    if isinstance(mark, marks.HoldMark):
        try:
            return [ledger.hold(mark.hold_id)]
        except NotFound:
            return []
    return []


def receipt(ledger: Ledger, job_id: str, reader: SlurmReader | None = None,
            cluster: str | None = None) -> dict:
    holds = holds_for_job(ledger, job_id, reader, cluster)
    if not holds:
        raise NotFound(f"no GPU-token hold for job {job_id}"
                       + (f" on cluster {cluster}" if cluster else ""))
    task_id = job_id if "_" not in job_id else None
    out = []
    for hold in holds:
        charges = ledger.charges(hold.id)
        nodes = []
        measure = Measure()
        for c in charges:
            rec = ChargeRecord.from_dict(c["usage"])
            measure.add(Measure.of_usage(c["usage"]))
            nodes.append({
                "job_id": c["job_id"], "node": c["node"], "restart": c["restart"],
                "key": c["key"], "charged": c["amount"],
                "source": rec.source if rec else None, "policy": rec.policy if rec else None,
                "held_ms": rec.held_ms if rec else None,
                "busy_ms": rec.busy_ms if rec else None,
                "measured": rec.all_measured if rec else None,
                "measured_gpus": rec.measured_gpus if rec else 0,
                "energy_mj": rec.energy_mj if rec else None,
                "gpus": [asdict(g) for g in rec.gpus] if rec else [],
                "created": c["created"],
            })
        policies = sorted({n["policy"] for n in nodes if n["policy"]})
        tiers: dict[str, dict] = {}  # what each tier cost, over every GPU of every charge
        for n in nodes:
            for g in n["gpus"]:
                for t in g.get("tiers") or []:
                    key = f"{t['tier']} x{t['multiplier_ppm']}"
                    acc = tiers.setdefault(key, {"tier": t["tier"],
                                                 "multiplier_ppm": t["multiplier_ppm"],
                                                 "ms": 0, "amount": 0})
                    acc["ms"] += t["ms"]
                    acc["amount"] += t["amount"]
        out.append({**hold.to_dict(), "charges": nodes,
                    "policy": ",".join(policies) or None, "tiers": list(tiers.values()),
                    "busy_ms": measure.busy_ms, "measured_held_ms": measure.held_ms,
                    "efficiency": measure.efficiency,
                    "energy_mj": sum(n["energy_mj"] or 0 for n in nodes),
                    "journal": ledger.hold_journal(hold.id)})
    return {"job": job_id, "task": task_id, "cluster": cluster, "holds": out}
