"""The job's AdminComment as job_submit.lua writes it: ``gpuledger:hold=<id>;token=<id>``."""

from __future__ import annotations

import re
from dataclasses import dataclass

PREFIX = "gpuledger:"
DEFERRED = "gpuledger:deferred"
_HOLD = re.compile(r"^gpuledger:hold=(hold_[0-9a-f]+);token=(tok_[0-9a-f]+)$")


@dataclass(frozen=True)
class HoldMark:
    hold_id: str
    token_id: str


def parse(comment: str | None) -> HoldMark | str | None:
    """A HoldMark, the string ``DEFERRED``, or None for a comment that is not ours."""
    text = (comment or "").strip()
    if text == DEFERRED:
        return DEFERRED
    m = _HOLD.match(text)
    return HoldMark(m.group(1), m.group(2)) if m else None


def hold_comment(hold_id: str, token_id: str) -> str:
    return f"{PREFIX}hold={hold_id};token={token_id}"
