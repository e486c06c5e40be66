"""The last ``gpuledger verify``: when it ran, whether all was well, the head it checked.

Verify writes ``last-verify.json`` into the keys directory (where it already remembers the
last exported head, :mod:`ledger.attest`) after each check; the daemon's metrics
(``gpuledger_verify_last_*``) and ``gpuledger status`` read it. It is a note about the
journal, not part of it: nothing money depends on reads it. Where the keys directory does
not exist or cannot be written, nothing is recorded and verify's own result stands.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

RECORD = "last-verify.json"
log = logging.getLogger("gpuledger.verify")


@dataclass(frozen=True)
class LastVerify:
    at: float  # seconds since the epoch
    ok: bool
    rows: int
    head_seq: int
    problem: str | None


def record(keys_dir: Path | None, ok: bool, rows: int, head_seq: int,
           problem: str | None = None, now: float | None = None) -> bool:
    """Write the record atomically (mode 0644: it holds no secret); whether it was written."""
    if keys_dir is None or not Path(keys_dir).is_dir():
        return False
    path = Path(keys_dir) / RECORD
    tmp = path.with_name(f".{RECORD}.{os.getpid()}.tmp")
    body = {"at": time.time() if now is None else now, "ok": bool(ok), "rows": int(rows),
            "head_seq": int(head_seq), "problem": problem}
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(body) + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        log.warning("cannot record the last verify in %s: %s", path, exc.strerror or exc)
        return False
    return True


def last(keys_dir: Path | None) -> LastVerify | None:
    """The last verify recorded, or None (never, or the record is unreadable)."""
    if keys_dir is None:
        return None
    try:
        body = json.loads((Path(keys_dir) / RECORD).read_text())
        return LastVerify(float(body["at"]), bool(body["ok"]), int(body["rows"]),
                          int(body["head_seq"]), body.get("problem"))
    except (OSError, ValueError, KeyError, TypeError):
        return None
