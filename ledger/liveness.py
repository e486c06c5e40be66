"""Token liveness, in one place: active, revoked, expired or not yet valid.

A token's ledger status (``active`` / ``revoked`` / ``expired``) is set by revoke and by the
expiry sweep; between its expiry and the sweep a token is already expired. Every path that
asks "may this token pay now?" decides through :func:`liveness`: the signed claims before
the ledger is read, the reserve fast path and its checked path, resize, split and transfer,
where a hold's remainder goes, and the status shown to people.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from .errors import Reason, Refusal, StateError


class Liveness(StrEnum):
    ACTIVE = "active"
    REVOKED = "revoked"
    EXPIRED = "expired"
    NOT_YET_VALID = "not_yet_valid"


def liveness(status: str, not_before: datetime | None, expires: datetime,
             now: datetime) -> Liveness:
    """Revoked beats expired beats not-yet-valid; a token past its expiry is expired even
    before the sweep marks it."""
    if status == "revoked":
        return Liveness.REVOKED
    if status == "expired" or expires <= now:
        return Liveness.EXPIRED
    if not_before is not None and now < not_before:
        return Liveness.NOT_YET_VALID
    return Liveness.ACTIVE


def token_liveness(row, now: datetime) -> Liveness:
    """The liveness of a ``tokens`` row (or anything with status/not_before/expires)."""
    return liveness(row.status, getattr(row, "not_before", None), row.expires, now)


def refusal(state: Liveness, token_id: str, *, expires: datetime,
            not_before: datetime | None = None, reason: str | None = None) -> Refusal | None:
    """Why a token in ``state`` cannot pay for a job, or None when it can."""
    if state is Liveness.REVOKED:
        return Refusal(Reason.REVOKED, f"token {token_id} was revoked: {reason}",
                       token_id=token_id)
    if state is Liveness.EXPIRED:
        return Refusal(Reason.EXPIRED, f"token {token_id} expired on "
                       f"{expires.date().isoformat()}", token_id=token_id)
    if state is Liveness.NOT_YET_VALID:
        return Refusal(Reason.NOT_YET_VALID, f"token {token_id} is not valid before "
                       f"{not_before.isoformat()}", token_id=token_id)
    return None


def refuse_unless_live(row, now: datetime) -> None:
    """Raise the Refusal for a ``tokens`` row that cannot pay now."""
    found = refusal(token_liveness(row, now), row.id, expires=row.expires,
                    not_before=getattr(row, "not_before", None),
                    reason=getattr(row, "status_reason", None))
    if found is not None:
        raise found


def require_spendable(row, now: datetime, what: str) -> None:
    """StateError for a revoked or expired token (split, transfer); not-yet-valid may move."""
    state = token_liveness(row, now)
    if state is Liveness.REVOKED:
        raise StateError(f"token {row.id} is revoked; cannot {what}")
    if state is Liveness.EXPIRED:
        raise StateError(f"token {row.id} expired on {row.expires.date()}; cannot {what}")
