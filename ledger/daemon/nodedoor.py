"""The compute nodes' door into the daemon: ``charge`` over TCP, proven with MUNGE.

Nodes are other hosts, so the controller's Unix sockets (peer credentials from the kernel)
do not reach them. With ``[daemon] node_listen = "host:port"`` the daemon also listens on
TCP for exactly two operations, ``ping`` and ``charge``; each ``charge`` line carries
``cred=``, a MUNGE credential over the SHA-256 of its ``record``, made by root on the
node (``munge.encode``). The daemon accepts it only when munged says: a valid, unexpired,
first-seen credential of uid 0, whose payload is that digest, from the address the record's
node name resolves to (``[daemon] node_check_address``). Anything else is answered
``forbidden`` or ``bad_request`` and closed; nothing a user can send here reaches the ledger.
The same line protocol (``protocol``) as the Unix sockets; a bounded pool of handler threads
and a deadline per connection keep slow or hostile clients from holding the door.
"""

from __future__ import annotations

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

from ..errors import LedgerError
from ..nodecharge import NodeCharge
from . import munge
from .auth import Forbidden, Peer
from .client import Client, DaemonUnavailable
from .protocol import ProtocolError, decode, encode

OPS = frozenset({"ping", "charge"})
CONN_SECONDS = 30.0  # a connection's whole life
IDLE_SECONDS = 10.0
WORKERS = 8


def parse_address(text: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port``) → (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536 or not host:
        raise ValueError(f"not host:port: {text!r}")
    return host.strip("[]"), int(port)


def _op(line: bytes) -> str:
    """The op a request line names, for the metrics (``other`` when there is none)."""
    for part in line.split(b" "):
        if part.startswith(b"op="):
            return part[3:].decode("ascii", "replace")
    return "other"


def is_address(text: str | None) -> bool:
    return bool(text) and not text.startswith("/") and ":" in text


@lru_cache(maxsize=4096)
def _addresses(node: str, stamp: int) -> frozenset[str]:
    try:
        infos = socket.getaddrinfo(node, None, socket.AF_INET, socket.SOCK_STREAM)
    except OSError:
        return frozenset()
    return frozenset(i[4][0] for i in infos)


def node_addresses(node: str) -> frozenset[str]:
    """IPv4 addresses of a node name (cached five minutes)."""
    return _addresses(node, int(time.monotonic() // 300))


class NodeDoor:
    """A TCP listener serving ``ping`` and MUNGE-proven ``charge`` to the handlers."""

    def __init__(self, handlers, address: str, *, max_line: int = 65536,
                 check_address: bool = True, munge_socket: str | None = None, log=None):
        self.handlers = handlers
        self.host, self.port = parse_address(address)
        self.max_line = max_line
        self.check_address = check_address
        self.munge_socket = munge_socket
        self.log = log
        self._listener: socket.socket | None = None
        self._pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="nodedoor")
        self._busy = threading.BoundedSemaphore(WORKERS * 4)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def bind(self) -> None:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        s = socket.socket(family, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((self.host, self.port))
        s.listen(128)
        self.port = s.getsockname()[1]
        self._listener = s

    def start(self) -> None:
        if self._listener is None:
            self.bind()
        self._thread = threading.Thread(target=self._accept, name="nodedoor-accept",
                                        daemon=True)
        self._thread.start()
        if self.log is not None:
            self.log.event(event="listening", node_listen=f"{self.host}:{self.port}")

    def stop(self) -> None:
        self._stop.set()
        if self._listener is not None:
            try:
                self._listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._listener.close()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, peer = self._listener.accept()
            except OSError:
                if self._stop.is_set():
                    return
                time.sleep(0.05)
                continue
            if not self._busy.acquire(blocking=False):
                conn.close()  # full: the node keeps its record and comes back
                continue
            try:
                self._pool.submit(self._serve, conn, peer[0])
            except RuntimeError:
                self._busy.release()
                conn.close()

    def _serve(self, conn: socket.socket, addr: str) -> None:
        deadline = time.monotonic() + CONN_SECONDS
        buf = b""
        try:
            conn.settimeout(IDLE_SECONDS)
            while time.monotonic() < deadline:
                while b"\n" not in buf:
                    if len(buf) > self.max_line:
                        conn.sendall(encode({"ok": 0, "reason": "bad_request",
                                             "message": "request line too long"}))
                        return
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    buf += chunk
                line, _, buf = buf.partition(b"\n")
                start = time.perf_counter()
                answer = self.answer(line, addr)
                conn.sendall(encode(answer))
                instruments = getattr(self.handlers, "instruments", None)
                if instruments is not None:  # the metrics' latency of the nodes' charges
                    instruments.request({"op": _op(line)}, answer, time.perf_counter() - start)
        except OSError:
            return
        finally:
            conn.close()
            self._busy.release()

    def answer(self, line: bytes, addr: str) -> dict[str, object]:
        from .handlers import BadRequest, error_response

        try:
            fields = decode(line)
            op = fields.get("op")
            if op not in OPS:
                raise Forbidden(f"only {', '.join(sorted(OPS))} are served to nodes")
            if op == "ping":
                return {"ok": 1}
            cred = munge.decode(fields.get("cred", ""), self.munge_socket)
            record = fields.get("record", "")
            if cred.payload != munge.digest(record.encode()):
                raise Forbidden("the MUNGE credential is not over this record")
            if cred.uid != 0:
                raise Forbidden(f"charges come from root on a node, not uid {cred.uid}")
            rec = NodeCharge.from_json(record)  # parsed once: checked here, charged below
            if self.check_address and cred.addr not in node_addresses(rec.node):
                raise Forbidden(f"node {rec.node} does not resolve to {cred.addr}, where the "
                                "credential was made")
            return self.handlers.charge_record(rec)
        except munge.MungeError as exc:
            return error_response(Forbidden(str(exc)))
        except (ProtocolError, BadRequest, LedgerError) as exc:
            return error_response(exc)
        except Exception as exc:  # noqa: BLE001 - a request must never kill the door
            if self.handlers.on_fault is not None:
                self.handlers.on_fault(Peer(0, -1, -1, addr, False), {"op": "charge"}, exc)
            return error_response(exc)


class TcpClient(Client):
    """The node side: the daemon's ``node_listen`` over TCP, each ``charge`` with a MUNGE
    credential over its record."""

    def __init__(self, address: str, timeout: float = 10.0, munge_socket: str | None = None):
        super().__init__(address, timeout)
        self.host, self.port = parse_address(address)
        self.munge_socket = munge_socket

    def connect(self) -> None:
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        except OSError as exc:
            raise DaemonUnavailable(f"cannot reach the gpuledger daemon at {self.path}: "
                                    f"{exc.strerror or exc}") from None
        sock.settimeout(self.timeout)
        self._sock = sock

    def call(self, op: str, **fields: object) -> dict[str, str]:
        if op == "charge":
            record = str(fields.get("record", ""))
            try:
                fields["cred"] = munge.encode(munge.digest(record.encode()), self.munge_socket)
            except munge.MungeError as exc:  # munged down here: keep the record for later
                raise DaemonUnavailable(f"cannot prove this node to the daemon: {exc}") from None
        return super().call(op, **fields)


def node_client(address: str, timeout: float = 10.0) -> Client:
    """The client a node's epilog uses: TCP+MUNGE for ``host:port``, else a Unix socket."""
    if is_address(address):
        return TcpClient(address, timeout)
    return Client(address, timeout)
