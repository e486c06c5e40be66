"""The threaded Unix-socket server: one thread per connection, one log line per request.

slurmctld keeps one connection open and asks one question at a time, so a blocking
thread per connection gives it the shortest path; users' clients connect briefly.
Lines longer than ``max_line`` get an error and the connection is closed; anything
else malformed gets an error reply and the connection stays usable.

Any local user can connect, so what users may take is bounded (:mod:`.limits`): root and
the SlurmUser have connection slots of their own; every other uid has a few connections
and one request in flight, and each of its requests must arrive whole within a deadline
counted from the previous reply (not per ``recv``), else the connection is cut.
"""

from __future__ import annotations

import grp
import os
import socket
import stat
import sys
import threading
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

from ..errors import ConfigError
from .auth import Peer, Policy, peer_credentials
from .handlers import Handlers, error_response
from .instruments import Instruments
from .limits import Admission, Limits
from .protocol import ProtocolError, decode, encode, escape

SWITCH_INTERVAL = 0.0005  # s; Python's default is 0.005
SEND_GRACE = 1.0  # s a user's client has to take its reply, at least
REFUSAL_LOG_INTERVAL = 10.0  # s between log lines about refused connections
_LOGGED = ("user", "account", "partition", "gpus", "type", "seconds", "tasks", "hold",
           "token_id", "amount", "delta", "result", "desc", "reason")


def tune_threads() -> None:
    """Pass the interpreter lock round every 0.5 ms instead of every 5 ms. A reserve takes
    the lock back after each database call; behind a user's CPU-bound request it would
    otherwise wait up to 5 ms each time. (Called by ``gpuledger serve``, not on import.)"""
    sys.setswitchinterval(SWITCH_INTERVAL)


PRIVILEGED_LINE = 65536  # longest line root and the Slurm user may send


def stamp() -> str:
    """The time a log line starts with: UTC, milliseconds (``2026-11-01T12:00:00.123Z``)."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class RequestLog:
    """One ``key=value`` line per request on a stream (journald under systemd), each line
    starting with ``ts=`` (UTC): a log file written without journald is dated too."""

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream or sys.stderr
        self._lock = threading.Lock()

    def write(self, peer: Peer, request: dict[str, str], response: dict[str, object],
              micros: int) -> None:
        fields: dict[str, object] = {"ts": stamp(), "op": request.get("op", "-"),
                                     "peer": peer.name,
                                     "pid": peer.pid, "ok": response.get("ok")}
        for key in _LOGGED:
            value = response.get(key, request.get(key))
            if value is not None and value != "":
                fields[key] = value
        fields["us"] = micros
        line = " ".join(f"{k}={escape(v)}" for k, v in fields.items())
        with self._lock:
            try:
                self.stream.write(line + "\n")
                self.stream.flush()
            except (OSError, ValueError):
                pass  # a broken log stream must not break the service

    def event(self, **fields: object) -> None:
        with self._lock:
            try:
                self.stream.write(" ".join(f"{k}={escape(v)}" for k, v in
                                           {"ts": stamp(), **fields}.items()) + "\n")
                self.stream.flush()
            except (OSError, ValueError):
                pass

    def fault(self, peer: Peer, request: dict[str, str], exc: BaseException) -> None:
        """A server fault (a bug, not bad input): one event line, then its traceback."""
        trace = "".join(traceback.format_exception(exc)).rstrip("\n")
        with self._lock:
            try:
                self.stream.write(" ".join(f"{k}={escape(v)}" for k, v in (
                    ("ts", stamp()), ("event", "fault"), ("op", request.get("op", "-")), ("peer", peer.name),
                    ("pid", peer.pid), ("error", f"{type(exc).__name__}: {exc}"))) + "\n")
                self.stream.write("".join(f"  {line}\n" for line in trace.splitlines()))
                self.stream.flush()
            except (OSError, ValueError):
                pass


class Server:
    def __init__(self, handlers: Handlers, path: str | os.PathLike, *, max_line: int = 16384,
                 group: str | None = None, log: RequestLog | None = None,
                 limits: Limits | None = None, privileged_only: bool = False,
                 instruments: Instruments | None = None):
        self.handlers = handlers
        self.policy: Policy = handlers.policy
        self.path = Path(path)
        # The privileged socket ([daemon] privileged_socket): mode 0600, owned by the
        # SlurmUser, and anyone else who gets in anyway (root's group tricks) is refused.
        self.privileged_only = privileged_only
        self.max_line = max_line
        self.group = group
        self.log = log or RequestLog()
        if handlers.on_fault is None:
            handlers.on_fault = self.log.fault
        self.limits = limits or Limits()
        # this process's counters (submit decisions, latency); shared by its servers
        self.instruments = instruments or handlers.instruments or Instruments()
        if handlers.instruments is None:
            handlers.instruments = self.instruments
        self.admission = Admission(self.limits)
        self._listener: socket.socket | None = None
        self._adopted = False
        self._stopping = threading.Event()
        self._refused = 0
        self._refused_logged_at = 0.0

    # -- socket ---------------------------------------------------------------------------------

    def bind(self) -> None:
        """Create the socket: 0660 with ``group`` when set, else 0666 (peer creds decide);
        a privileged-only socket is 0600 and owned by the SlurmUser."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() or self.path.is_symlink():
            if not stat.S_ISSOCK(self.path.lstat().st_mode):
                raise ConfigError(f"{self.path} exists and is not a socket")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(str(self.path))
            except OSError:
                self.path.unlink()  # stale socket of a daemon that is gone
            else:
                raise ConfigError(f"another daemon is already listening on {self.path}")
            finally:
                probe.close()
        uid = gid = -1
        if self.privileged_only:
            mode = 0o600
            uid = self.policy.slurm_uid if self.policy.slurm_uid is not None else -1
        elif self.group:
            mode = 0o660
            try:
                gid = grp.getgrnam(self.group).gr_gid
            except KeyError:
                raise ConfigError(f"[daemon] socket_group {self.group!r} does not exist") from None
        else:
            mode = 0o666
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            listener.bind(str(self.path))
        finally:
            os.umask(old)
        if uid != -1 or gid != -1:
            os.chown(self.path, uid, gid)
        os.chmod(self.path, mode)
        listener.listen(128)
        self._listener = listener

    def serve_forever(self) -> None:
        if self._listener is None:
            self.bind()
        self.log.event(event="listening", socket=self.path, pid=os.getpid(),
                       privileged=int(self.privileged_only))
        listener = self._listener
        while not self._stopping.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                if self._stopping.is_set():
                    break
                continue
            try:
                peer = self.policy.peer(*peer_credentials(conn))
            except OSError:
                conn.close()
                continue
            why = "this socket is for root and the Slurm user" \
                if self.privileged_only and not peer.privileged else self.admission.connect(peer)
            if why is not None:
                self._refuse(conn, peer, why)
                continue
            try:
                threading.Thread(target=self._connection, args=(conn, peer), daemon=True).start()
            except RuntimeError:  # no thread to be had: refuse rather than stop serving
                self.admission.disconnect(peer)
                self._refuse(conn, peer, "no thread available")

    def stop(self) -> None:
        self._stopping.set()
        if self._adopted:  # the socket is the parent's: leave it listening, and in place
            return
        if self._listener is not None:
            try:
                self._listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._listener.close()
        try:
            if self.path.exists() and stat.S_ISSOCK(self.path.lstat().st_mode):
                self.path.unlink()
        except OSError:
            pass

    def fileno(self) -> int:
        """The listening socket's descriptor (bound), to hand to another process."""
        if self._listener is None:
            self.bind()
        return self._listener.fileno()

    def adopt(self, fd: int) -> None:
        """Serve a listening socket bound by another process (see :mod:`.processes`)."""
        self._listener = socket.socket(fileno=fd)
        self._adopted = True

    # -- connections ----------------------------------------------------------------------------

    @staticmethod
    def _send_now(conn: socket.socket, response: dict[str, object]) -> None:
        """Best effort, never blocking: for a peer that is being turned away."""
        try:
            conn.setblocking(False)
            conn.send(encode(response))
        except OSError:
            pass

    def _refuse(self, conn: socket.socket, peer: Peer, why: str) -> None:
        self._send_now(conn, {"ok": 0, "reason": "busy", "message": why})
        conn.close()
        self._refused += 1
        self.instruments.refused.inc()
        now = time.monotonic()
        if now - self._refused_logged_at >= REFUSAL_LOG_INTERVAL:  # a flood is one line per 10 s
            self._refused_logged_at = now
            self.log.event(event="refused", peer=peer.name, pid=peer.pid, why=why,
                           refused=self._refused, **self.admission.counts())

    def _connection(self, conn: socket.socket, peer: Peer) -> None:
        try:
            self._serve(conn, peer)
        except OSError:
            pass
        finally:
            conn.close()
            self.admission.disconnect(peer)

    def _cut(self, conn: socket.socket, peer: Peer, waited: float) -> None:
        self._send_now(conn, {"ok": 0, "reason": "timeout",
                              "message": f"request not received whole within {waited:g} s"})
        self.log.event(event="cut", peer=peer.name, pid=peer.pid, why="deadline",
                       seconds=f"{waited:g}")

    def _serve(self, conn: socket.socket, peer: Peer) -> None:
        buf = b""
        # root and the Slurm user may send longer lines: a node's charge record of many GPUs
        limit = max(self.max_line, PRIVILEGED_LINE) if peer.privileged else self.max_line
        allowed = self.limits.request_deadline
        while True:
            # A user's request must arrive whole within the deadline, however it trickles in;
            # privileged peers (slurmctld's one persistent connection) may idle as they like.
            deadline = None if peer.privileged else time.monotonic() + allowed
            nl = buf.find(b"\n")
            while nl < 0:
                if len(buf) > limit:
                    self._reply(conn, peer, {}, {"ok": 0, "reason": "too_long", "message":
                                                 f"request longer than {limit} bytes"}, 0)
                    return
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return self._cut(conn, peer, allowed)
                    conn.settimeout(left)
                try:
                    chunk = conn.recv(65536)
                except TimeoutError:
                    return self._cut(conn, peer, allowed)
                if not chunk:
                    return
                buf += chunk
                nl = buf.find(b"\n")
            line, buf = buf[:nl], buf[nl + 1:]
            start = time.perf_counter_ns()
            if len(line) > limit:
                self._reply(conn, peer, {}, {"ok": 0, "reason": "too_long", "message":
                                             f"request longer than {limit} bytes"}, start)
                return
            try:
                request = decode(line)
            except ProtocolError as exc:
                request, response = {}, error_response(exc)
            else:
                response = self._answer(peer, request, deadline)
            if deadline is not None:
                conn.settimeout(max(deadline - time.monotonic(), SEND_GRACE))
            self._reply(conn, peer, request, response, start)

    def _answer(self, peer: Peer, request: dict[str, str], deadline: float | None
                ) -> dict[str, object]:
        if not self.admission.begin(peer, deadline or 0.0):
            return {"ok": 0, "reason": "busy", "message": "too many requests in flight; "
                    "try again in a moment"}
        try:
            return self.handlers.handle(peer, request)
        finally:
            self.admission.end(peer)

    def _reply(self, conn: socket.socket, peer: Peer, request: dict[str, str],
               response: dict[str, object], start: int) -> None:
        conn.sendall(encode(response))
        nanos = time.perf_counter_ns() - start if start else 0
        self.instruments.request(request, response, nanos / 1e9)
        self.log.write(peer, request, response, nanos // 1000)
