"""A small blocking client for the daemon's socket (CLI, tests, benchmarks)."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from ..errors import LedgerError, Reason, Refusal
from .protocol import decode, encode

DEFAULT_SOCKET = "/run/gpuledger/gpuledger.sock"
ENV_SOCKET = "GPULEDGER_SOCKET"


class DaemonUnavailable(LedgerError):
    """The daemon could not be reached or did not answer in time."""


class DaemonError(LedgerError):
    """The daemon answered ``ok=0`` with a reason other than a token refusal."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def socket_path(explicit: str | None = None, config_path: str | None = None) -> str:
    """``--socket``, then ``$GPULEDGER_SOCKET``, then the config file if readable, else default.

    A config named by ``--config`` or ``$GPULEDGER_CONFIG`` that does not exist, or that is
    readable but wrong, is an error (answering from another socket would hide it); only an
    unreadable config (ordinary users) falls back to the default socket."""
    if explicit:
        return explicit
    if os.environ.get(ENV_SOCKET):
        return os.environ[ENV_SOCKET]
    from .. import config as config_mod

    path = config_mod.config_path(config_path)
    if config_mod.named_path(config_path) and not path.exists():
        config_mod.load(path)  # raises: no configuration at PATH
    if not os.access(path, os.R_OK):
        return DEFAULT_SOCKET  # ordinary users cannot read the config: use the default
    try:
        return config_mod.load(path).daemon.socket
    except LedgerError:
        if config_mod.named_path(config_path):
            raise
        return DEFAULT_SOCKET


class Client:
    def __init__(self, path: str | os.PathLike, timeout: float = 10.0):
        self.path = str(path)
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._buf = b""

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except OSError as exc:
            sock.close()
            raise DaemonUnavailable(f"cannot reach the gpuledger daemon at {self.path}: "
                                    f"{exc.strerror or exc}") from None
        self._sock = sock

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._buf = b""

    def raw(self, line: bytes) -> dict[str, str]:
        """Send raw bytes (one request line) and return the decoded response line."""
        if self._sock is None:
            self.connect()
        try:
            self._sock.sendall(line)
            while b"\n" not in self._buf:
                chunk = self._sock.recv(65536)
                if not chunk:
                    raise DaemonUnavailable("the gpuledger daemon closed the connection")
                self._buf += chunk
        except TimeoutError:
            self.close()
            raise DaemonUnavailable(f"the gpuledger daemon did not answer within "
                                    f"{self.timeout:g} s") from None
        except OSError as exc:
            self.close()
            raise DaemonUnavailable(f"connection to the gpuledger daemon failed: {exc}") from None
        line_out, _, self._buf = self._buf.partition(b"\n")
        return decode(line_out)

    def call(self, op: str, **fields: object) -> dict[str, str]:
        """One request; the raw response fields (``ok`` is "1" or "0")."""
        return self.raw(encode({"op": op, **fields}))

    def request(self, op: str, **fields: object) -> dict:
        """One request; ok responses as fields (``json`` decoded), else a typed error."""
        resp = self.call(op, **fields)
        if resp.get("ok") != "1":
            raise response_error(resp)
        if "json" in resp:
            return json.loads(resp["json"])
        return resp


def response_error(resp: dict[str, str]) -> LedgerError:
    reason = resp.get("reason", "error")
    message = resp.get("message", "the daemon refused the request")
    try:
        return Refusal(Reason(reason), message, token_id=resp.get("token_id"))
    except ValueError:
        return DaemonError(reason, message)


def connect(path: str | None = None, config_path: str | None = None,
            timeout: float = 10.0) -> Client:
    return Client(Path(socket_path(path, config_path)), timeout=timeout)
