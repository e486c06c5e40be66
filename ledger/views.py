"""Plain results the service returns (and the CLI prints); amounts in GPU-seconds."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

from .amounts import check_amount, fmt_duration, hours
from .errors import InvalidInput
from .names import check_user_name
from .shares import GPU, check_kind


def iso(dt: datetime | None) -> str | None:
    """RFC 3339 in UTC, whole seconds, ``Z``: the one timestamp format of every JSON the
    ledger shows (the CLI's ``--json``, the daemon's answers)."""
    if dt is None:
        return None
    if dt.tzinfo is None:  # stored as UTC; some drivers hand it back naive
        dt = dt.replace(tzinfo=UTC)
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class HoldRequest:
    """What a job asks for: ``gpus`` per task instance × ``seconds`` × ``tasks`` (array size).

    ``gres`` is ``gpu`` (whole GPUs), ``shard`` or ``mps`` (``ledger.shares``): then ``gpus``
    counts the shares over all nodes and ``per_node`` those one node takes (one GPU's).
    """

    gpus: int
    seconds: int
    gpu_type: str | None = None
    tasks: int = 1
    account: str | None = None
    user: str | None = None
    partition: str | None = None
    cluster: str | None = None
    gres: str = "gpu"
    per_node: int | None = None
    qos: str | None = None

    def __post_init__(self):
        if self.user is not None:  # where a job's user name enters the ledger (ledger.names)
            check_user_name(self.user)
        for name in ("gpus", "seconds", "tasks"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise InvalidInput(f"{name} must be a positive integer, got {value!r}")
        check_kind(self.gres)
        if self.gres == GPU:
            object.__setattr__(self, "per_node", None)
        else:
            per = self.gpus if self.per_node is None else self.per_node
            if isinstance(per, bool) or not isinstance(per, int) or not 0 < per <= self.gpus \
                    or self.gpus % per:
                raise InvalidInput(f"{self.gres} per node must divide the {self.gpus} "
                                   f"asked for, got {per!r}")
            object.__setattr__(self, "per_node", per)
        if self.gpus > 100_000 or self.tasks > 10_000_000 or self.seconds > 10 * 366 * 86400:
            raise InvalidInput("request is implausibly large")
        check_amount(self.gpus * self.seconds * self.tasks, what="requested GPU-seconds")

    @property
    def partitions(self) -> tuple[str, ...]:
        """Every partition the job may run in (``-p a,b`` is a candidate list)."""
        return tuple(p for p in (self.partition or "").split(",") if p)

    def describe(self) -> str:
        gpu = self.gpu_type or "gpu"
        if self.gres != "gpu":
            gpu = f"{self.gres}" + (f":{self.gpu_type}" if self.gpu_type else "")
        text = f"{self.gpus} x {gpu} x {fmt_duration(self.seconds)}"
        return f"{self.tasks} tasks x {text}" if self.tasks > 1 else text

    def to_dict(self) -> dict:
        # flat fields: a plain dict, not dataclasses.asdict (which deep-copies each value;
        # a reserve builds this three times, on the submit path)
        return {f: getattr(self, f) for f in _REQUEST_FIELDS}


_REQUEST_FIELDS = tuple(HoldRequest.__dataclass_fields__)


@dataclass(frozen=True)
class TokenView:
    id: str
    account: str
    kid: str
    face: int
    remaining: int
    held: int
    status: str
    not_before: datetime
    expires: datetime
    scopes: dict
    parent: str | None
    created: datetime
    status_reason: str | None = None

    def to_dict(self) -> dict:
        return {
            "id": self.id, "account": self.account, "kid": self.kid,
            "face_hours": hours(self.face), "remaining_hours": hours(self.remaining),
            "held_hours": hours(self.held), "face": self.face, "remaining": self.remaining,
            "held": self.held, "status": self.status, "status_reason": self.status_reason,
            "not_before": iso(self.not_before), "expires": iso(self.expires),
            "scopes": self.scopes, "parent": self.parent, "created": iso(self.created),
        }


@dataclass(frozen=True)
class HoldView:
    id: str
    token_id: str
    account: str
    user: str | None
    gpu_type: str | None
    gpus: int
    seconds: int
    tasks: int
    rate_ppm: int
    amount: int
    charged: int
    refunded: int
    state: str
    job_id: str | None
    created: datetime
    resolved: datetime | None
    partition: str | None = None
    cluster: str | None = None
    gres: str = "gpu"
    per_node: int | None = None  # shares one node takes (shard/mps holds)
    share: int = 1  # the shares per GPU the hold was priced at (1: whole GPUs)
    qos: str | None = None
    multiplier_ppm: int = 1_000_000  # the tier multiplier the hold was priced at

    @property
    def returned(self) -> int:
        return self.amount - self.charged if self.state != "pending" else 0

    def to_dict(self) -> dict:
        return {
            "id": self.id, "token_id": self.token_id, "account": self.account, "user": self.user,
            "gpu_type": self.gpu_type, "gpus": self.gpus, "seconds": self.seconds,
            "tasks": self.tasks, "rate_ppm": self.rate_ppm, "partition": self.partition,
            "cluster": self.cluster, "gres": self.gres, "per_node": self.per_node,
            "share": self.share, "qos": self.qos, "multiplier_ppm": self.multiplier_ppm,
            "state": self.state, "job_id": self.job_id,
            "amount": self.amount, "charged": self.charged, "refunded": self.refunded,
            "returned": self.returned, "held_hours": hours(self.amount),
            "charged_hours": hours(self.charged), "returned_hours": hours(self.returned),
            "refunded_hours": hours(self.refunded),
            "created": iso(self.created), "resolved": iso(self.resolved),
        }

    @classmethod
    def from_dict(cls, d: dict) -> HoldView:
        from datetime import datetime as _dt

        def parse(v):
            return _dt.fromisoformat(v.replace("Z", "+00:00")) if v else None

        return cls(
            id=d["id"], token_id=d["token_id"], account=d["account"], user=d["user"],
            gpu_type=d["gpu_type"], gpus=d["gpus"], seconds=d["seconds"], tasks=d["tasks"],
            rate_ppm=d["rate_ppm"], amount=d["amount"], charged=d["charged"],
            refunded=d["refunded"], state=d["state"], job_id=d["job_id"],
            created=parse(d["created"]), resolved=parse(d["resolved"]),
            partition=d.get("partition"), cluster=d.get("cluster"),
            gres=d.get("gres") or "gpu", per_node=d.get("per_node"), share=d.get("share") or 1,
            qos=d.get("qos"), multiplier_ppm=d.get("multiplier_ppm") or 1_000_000,
        )


@dataclass(frozen=True)
class AccountView:
    name: str
    pool: int
    tokens: int
    remaining: int
    held: int
    report_to: list[str] = field(default_factory=list)
    created: datetime | None = None

    def to_dict(self) -> dict:
        return {
            "name": self.name, "pool_hours": hours(self.pool), "tokens": self.tokens,
            "remaining_hours": hours(self.remaining), "held_hours": hours(self.held),
            "pool": self.pool, "remaining": self.remaining, "held": self.held,
            "report_to": self.report_to, "created": iso(self.created),
        }

    def member_dict(self) -> dict:
        """What a member of the account sees (``gpuledger balance``): its tokens' sums, not
        the pool, which pays for nothing until an admin mints a token from it."""
        return {"name": self.name, "tokens": self.tokens, "remaining": self.remaining,
                "held": self.held, "remaining_hours": hours(self.remaining),
                "held_hours": hours(self.held)}
