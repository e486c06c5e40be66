"""What a run of digests did, for the CLI's summary and ``--json``: one outcome per digest
(budget alerts per account, idle GPUs per owner) and the run's totals."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar


@dataclass
class DigestOutcome:
    """One digest: whom it was for, its lines, who got it, who refused it, its .eml."""

    scope: str  # the account, or the owner ("user:alice")
    items: list[str]
    sent: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    file: str | None = None
    items_key: ClassVar[str] = "items"

    def to_dict(self) -> dict:
        return {"account": self.scope, self.items_key: self.items, "sent": self.sent,
                "failed": self.failed, "file": self.file}


@dataclass
class DigestSummary:
    dry_run: bool
    outcomes: list = field(default_factory=list)
    no_recipients: list[str] = field(default_factory=list)

    @property
    def failures(self) -> int:
        return sum(len(o.failed) for o in self.outcomes)

    def totals(self) -> dict:
        """The run's own figures (raised, flagged, …), first in ``to_dict``."""
        return {}

    def to_dict(self) -> dict:
        return {"dry_run": self.dry_run, **self.totals(),
                "sent": sum(len(o.sent) for o in self.outcomes), "failed": self.failures,
                "no_recipients": self.no_recipients,
                "digests": [o.to_dict() for o in self.outcomes]}
