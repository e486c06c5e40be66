"""Line protocol: one JSON object per line each way, bounded in size.

Requests:  {"op": "ping"}
           {"op": "register", "job_id": 12, "restart": 0, "gpus": [0, 1]}
           {"op": "summary", "job_id": 12, "restart": 0, "finish": true}
           (register and summary take "sluid": "s…", the run's SLUID, where Slurm gives one)
           {"op": "status"}
Replies:   {"ok": true, ...} or {"ok": false, "error": "..."}
"""

from __future__ import annotations

import json
import logging
from typing import Any

from slurm_plugin.agent.core import Agent

log = logging.getLogger("gpuledger.agent")

MAX_LINE = 64 * 1024
MAX_GPUS = 256


class BadRequest(ValueError):
    """The request is malformed; the reply says why."""


def encode(obj: dict[str, Any]) -> bytes:
    data = json.dumps(obj, separators=(",", ":")).encode() + b"\n"
    if len(data) > MAX_LINE:
        raise ValueError(f"message of {len(data)} bytes exceeds {MAX_LINE}")
    return data


def decode(line: bytes) -> dict[str, Any]:
    if len(line) > MAX_LINE:
        raise BadRequest("line too long")
    try:
        obj = json.loads(line)
    except (UnicodeDecodeError, ValueError):
        raise BadRequest("not JSON") from None
    if not isinstance(obj, dict):
        raise BadRequest("not a JSON object")
    return obj


def _uint(req: dict[str, Any], name: str) -> int:
    v = req.get(name)
    if type(v) is not int or v < 0 or v >= 2**63:
        raise BadRequest(f"{name} must be a non-negative integer")
    return v


def _sluid(req: dict[str, Any]) -> str | None:
    from ledger.slurmsyntax import sluid

    v = req.get("sluid")
    if v is None:
        return None
    if not isinstance(v, str) or sluid(v) is None:
        raise BadRequest("sluid must be a SLUID")
    return v


def _gpus(req: dict[str, Any]) -> list[int]:
    v = req.get("gpus")
    if not isinstance(v, list) or len(v) > MAX_GPUS:
        raise BadRequest(f"gpus must be a list of at most {MAX_GPUS} indices")
    if any(type(i) is not int or not 0 <= i < 65536 for i in v):
        raise BadRequest("gpus must hold indices 0..65535")
    if len(set(v)) != len(v):
        raise BadRequest("gpus has duplicates")
    return v


def dispatch(agent: Agent, req: dict[str, Any]) -> dict[str, Any]:
    op = req.get("op")
    if op == "ping":
        return {"ok": True}
    if op == "status":
        return {"ok": True, **agent.status()}
    if op == "register":
        b = agent.register(_uint(req, "job_id"), _uint(req, "restart"), _gpus(req),
                           sluid=_sluid(req))
        return {"ok": True, "gpus": [x.to_dict() for x in b]}
    if op == "summary":
        finish = req.get("finish", True)
        if not isinstance(finish, bool):
            raise BadRequest("finish must be a boolean")
        u = agent.summary(_uint(req, "job_id"), _uint(req, "restart"), finish=finish,
                          sluid=_sluid(req))
        if u is None:
            return {"ok": False, "error": "unknown job"}
        return {"ok": True, "usage": u.to_dict()}
    raise BadRequest(f"unknown op {str(op)[:40]!r}")


def handle_line(agent: Agent, line: bytes) -> dict[str, Any]:
    """The reply to one request line; never raises."""
    try:
        return dispatch(agent, decode(line))
    except BadRequest as exc:
        return {"ok": False, "error": f"bad request: {exc}"}
    except Exception:
        log.exception("gpuledger-agent: request failed")
        return {"ok": False, "error": "internal error"}
