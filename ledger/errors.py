"""Typed exceptions of the ledger. The CLI turns them into ``Error: …`` and exit 1."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class LedgerError(Exception):
    """Base class: every error the library raises on purpose."""


class ConfigError(LedgerError):
    """The configuration file is missing, unreadable or invalid."""


class StorageError(LedgerError):
    """The database is unreachable, read-only or otherwise refused the operation."""


class UniqueViolation(StorageError):
    """A unique key collided (a concurrent writer got there first)."""


class OutcomeUnknown(StorageError):
    """The connection was lost during COMMIT (or a synchronous commit's wait was
    cancelled): the change may or may not have been made, and the operation was not one
    that may simply run again (``ledger.dbretry``)."""


class NotFound(LedgerError):
    """An account, token, hold or key that does not exist."""


class AlreadyExists(LedgerError):
    """Creating something that is already there (account, key file, …)."""


class InvalidInput(LedgerError):
    """An argument that can never be valid (non-positive amount, bad date, …)."""


class StateError(LedgerError):
    """The operation does not fit the object's state (hold already posted, …)."""


class IdempotencyConflict(LedgerError):
    """An idempotency key reused with different fields."""


class KeyError_(LedgerError):
    """Signing key problems (missing private key, retired key, …)."""


class Reason(StrEnum):
    """Why a token cannot pay; stable strings used on the socket and in messages."""

    MALFORMED = "malformed"
    BAD_SIGNATURE = "bad_signature"
    UNKNOWN_KEY = "unknown_key"
    UNKNOWN_TOKEN = "unknown_token"
    NOT_YET_VALID = "not_yet_valid"
    EXPIRED = "expired"
    REVOKED = "revoked"
    EXHAUSTED = "exhausted"
    INSUFFICIENT = "insufficient"
    WRONG_ACCOUNT = "wrong_account"
    WRONG_USER = "wrong_user"
    WRONG_GPU_TYPE = "wrong_gpu_type"
    WRONG_PARTITION = "wrong_partition"
    WRONG_CLUSTER = "wrong_cluster"
    UNKNOWN_GPU_TYPE = "unknown_gpu_type"
    UNKNOWN_ACCOUNT = "unknown_account"


@dataclass
class Refusal(LedgerError):
    """A token that cannot pay for a request, with the numbers to tell the user."""

    reason: Reason
    message: str
    token_id: str | None = None
    needed: int | None = None  # GPU-seconds at reference rate
    available: int | None = None
    details: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def __str__(self) -> str:
        return self.message

    def to_dict(self) -> dict:
        return {
            "reason": str(self.reason),
            "message": self.message,
            "token_id": self.token_id,
            "needed": self.needed,
            "available": self.available,
            **self.details,
        }


class TokenInvalid(Refusal):
    """A token string that does not verify (malformed, forged, unknown key)."""
