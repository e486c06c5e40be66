"""The threaded Unix-socket server: one thread per connection, one log line per request.

slurmctld keeps one connection open and asks one question at a time, so a blocking
thread per connection gives it the shortest path; users' clients connect briefly.
Lines longer than ``max_line`` get an error and the connection is closed; anything
else malformed gets an error reply and the connection stays usable.
"""

from __future__ import annotations

import grp
import os
import signal
import socket
import stat
import sys
import threading
import time
from pathlib import Path
from typing import TextIO

from ..errors import ConfigError
from .auth import Peer, Policy, peer_credentials
from .handlers import Handlers, error_response
from .protocol import ProtocolError, decode, encode, escape

MAX_CONNECTIONS = 256
USER_IDLE_TIMEOUT = 30.0
_LOGGED = ("user", "account", "partition", "gpus", "type", "seconds", "tasks", "hold",
           "token_id", "amount", "delta", "reason")


class RequestLog:
    """One ``key=value`` line per request on a stream (journald under systemd)."""

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream or sys.stderr
        self._lock = threading.Lock()

    def write(self, peer: Peer, request: dict[str, str], response: dict[str, object],
              micros: int) -> None:
        fields: dict[str, object] = {"op": request.get("op", "-"), "peer": peer.name,
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
                self.stream.write(" ".join(f"{k}={escape(v)}" for k, v in fields.items()) + "\n")
                self.stream.flush()
            except (OSError, ValueError):
                pass


class Server:
    def __init__(self, handlers: Handlers, path: str | os.PathLike, *, max_line: int = 16384,
                 group: str | None = None, log: RequestLog | None = None):
        self.handlers = handlers
        self.policy: Policy = handlers.policy
        self.path = Path(path)
        self.max_line = max_line
        self.group = group
        self.log = log or RequestLog()
        self._listener: socket.socket | None = None
        self._stopping = threading.Event()
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)

    # -- socket ---------------------------------------------------------------------------------

    def bind(self) -> None:
        """Create the socket: 0660 with ``group`` when set, else 0666 (peer creds decide)."""
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
        gid = None
        if self.group:
            try:
                gid = grp.getgrnam(self.group).gr_gid
            except KeyError:
                raise ConfigError(f"[daemon] socket_group {self.group!r} does not exist") from None
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            listener.bind(str(self.path))
        finally:
            os.umask(old)
        if gid is not None:
            os.chown(self.path, -1, gid)
            os.chmod(self.path, 0o660)
        else:
            os.chmod(self.path, 0o666)
        listener.listen(128)
        self._listener = listener

    def serve_forever(self) -> None:
        if self._listener is None:
            self.bind()
        self.log.event(event="listening", socket=self.path, pid=os.getpid())
        listener = self._listener
        while not self._stopping.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                if self._stopping.is_set():
                    break
                continue
            if not self._slots.acquire(blocking=False):
                self._refuse_busy(conn)
                continue
            threading.Thread(target=self._connection, args=(conn,), daemon=True).start()

    def stop(self) -> None:
        self._stopping.set()
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

    def install_signal_handlers(self) -> None:
        def on_signal(signum, _frame):
            self.log.event(event="stopping", signal=signal.Signals(signum).name)
            threading.Thread(target=self.stop, daemon=True).start()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

    # -- connections ----------------------------------------------------------------------------

    @staticmethod
    def _refuse_busy(conn: socket.socket) -> None:
        try:
            conn.sendall(encode({"ok": 0, "reason": "busy", "message": "too many connections"}))
        except OSError:
            pass
        conn.close()

    def _connection(self, conn: socket.socket) -> None:
        try:
            peer = self.policy.peer(*peer_credentials(conn))
            if not peer.privileged:
                conn.settimeout(USER_IDLE_TIMEOUT)
            self._serve(conn, peer)
        except OSError:
            pass
        finally:
            conn.close()
            self._slots.release()

    def _serve(self, conn: socket.socket, peer: Peer) -> None:
        buf = b""
        limit = self.max_line
        while True:
            nl = buf.find(b"\n")
            while nl < 0:
                if len(buf) > limit:
                    self._reply(conn, peer, {}, {"ok": 0, "reason": "too_long", "message":
                                                 f"request longer than {limit} bytes"}, 0)
                    return
                chunk = conn.recv(65536)
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
                response = self.handlers.handle(peer, request)
            self._reply(conn, peer, request, response, start)

    def _reply(self, conn: socket.socket, peer: Peer, request: dict[str, str],
               response: dict[str, object], start: int) -> None:
        conn.sendall(encode(response))
        micros = (time.perf_counter_ns() - start) // 1000 if start else 0
        self.log.write(peer, request, response, micros)
