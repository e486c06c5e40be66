"""The daemon's HTTP endpoint (``[metrics] listen``): ``/metrics`` in Prometheus' text
format, ``/livez`` and ``/readyz``.

Anyone who can reach the address may ask, so the endpoint can cost the submit path
nothing it does not bound:

* it has its own listener and threads; with ``[daemon] privileged_socket`` set it runs in
  the users' process (niceness 19), never in the one slurmctld talks to, and fetches that
  process's counters over the privileged socket (op ``metrics``, a copy of a few dozen
  numbers) at most once per ``cache_s``;
* at most :data:`MAX_CLIENTS` connections are served at once (more are answered 503 and
  closed), each has :data:`DEADLINE` seconds in all, however slowly it sends;
* the database is read at most once per ``[metrics] cache_s`` (scrapes in between get the
  same text) and by one scrape at a time; a readiness check waits at most
  :data:`CHECK_TIMEOUT` for the database;
* nothing per user is exposed, and per account only with ``[metrics] per_account``.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from .. import db
from ..config import parse_listen
from ..errors import ConfigError, LedgerError
from .dbmetrics import LedgerFigures
from .instruments import Instruments, families, merge

MAX_CLIENTS = 4
DEADLINE = 5.0  # s a client has for its whole request
CHECK_TIMEOUT = 2.0  # s the readiness check waits for the database / the other process
MAX_REQUEST = 8192  # bytes of request line and headers


def bind(listen: str) -> socket.socket:
    """A listening TCP socket on ``[metrics] listen`` (ConfigError when it cannot be)."""
    host, port = parse_listen(listen)
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                  flags=socket.AI_PASSIVE | socket.AI_NUMERICSERV)[0]
        sock = socket.socket(info[0], socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(info[4])
        sock.listen(16)
    except OSError as exc:
        raise ConfigError(f"[metrics] listen {listen}: cannot listen there "
                          f"({exc.strerror or exc})") from None
    return sock


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("gpuledger")
    except Exception:  # noqa: BLE001 - not installed as a distribution
        return "unknown"


class Exposition:
    """The text of ``/metrics`` and the answer of ``/readyz``.

    ``peer``: a callable returning the other process's snapshot (:meth:`Instruments.snapshot`)
    and ``peer_name`` its ``process`` label; ``peer_ping`` tells whether it answers."""

    def __init__(self, figures: LedgerFigures, instruments: Instruments, process: str, *,
                 cache_s: float = 10.0, peer: Callable[[], list] | None = None,
                 peer_name: str = "privileged", peer_ping: Callable[[], None] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.figures = figures
        self.instruments = instruments
        self.process = process
        self.cache_s = cache_s
        self.peer = peer
        self.peer_name = peer_name
        self.peer_ping = peer_ping
        self.clock = clock
        self.version = _version()
        self._render_lock = threading.Lock()
        self._cached: tuple[float, bytes] | None = None
        self._check_lock = threading.Lock()
        self._check: threading.Thread | None = None
        self._check_result: list[str] | None = None

    # -- /metrics ---------------------------------------------------------------------------

    def metrics(self) -> bytes:
        """The exposition text: the cached one while fresh, else one scrape reads anew."""
        with self._render_lock:
            now = self.clock()
            if self._cached is not None and now - self._cached[0] < self.cache_s:
                return self._cached[1]
            body = self._render()
            self._cached = (self.clock(), body)
            return body

    def _collect(self) -> list[Metric]:
        out: list[Metric] = []
        info = GaugeMetricFamily("gpuledger_build_info", "The running gpuledger's version.",
                                 labels=["version"])
        info.add_metric([self.version], 1)
        out.append(info)
        started = time.perf_counter()
        try:
            out += self.figures.database()
            up = 1
        except LedgerError:
            up = 0
        out.append(GaugeMetricFamily("gpuledger_database_up", "1 when the last scrape could "
                                     "read the ledger database, else 0.", value=up))
        out.append(GaugeMetricFamily("gpuledger_database_read_seconds", "How long the last "
                                     "scrape's database reads took.",
                                     value=time.perf_counter() - started))
        out += self.figures.files()
        parts = [families(self.instruments.snapshot(), self.process)]
        processes = GaugeMetricFamily("gpuledger_process_up", "1 for each daemon process "
                                      "whose counters this scrape has.", labels=["process"])
        processes.add_metric([self.process], 1)
        if self.peer is not None:
            try:
                parts.append(families(self.peer(), self.peer_name))
                processes.add_metric([self.peer_name], 1)
            except (LedgerError, OSError, ValueError, KeyError, TypeError):
                processes.add_metric([self.peer_name], 0)
        out += merge(parts)
        out.append(processes)
        return out

    def _render(self) -> bytes:
        collected = self._collect()

        class _Once:
            def collect(self):
                return collected

        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Once())
        return generate_latest(registry)

    # -- /readyz ----------------------------------------------------------------------------

    def _run_checks(self) -> list[str]:
        problems = []
        try:
            with db.read(self.figures.ledger.engine) as conn:
                conn.execute(text("SELECT 1"))
        except LedgerError as exc:
            problems.append(f"database: {exc}")
        except Exception as exc:  # noqa: BLE001 - a driver's own failure: not ready, say why
            problems.append(f"database: {type(exc).__name__}: {exc}")
        if self.peer_ping is not None:
            try:
                self.peer_ping()
            except (LedgerError, OSError) as exc:
                problems.append(f"{self.peer_name} process: {exc}")
        return problems

    def ready(self) -> list[str]:
        """What keeps the daemon from serving submissions (empty: ready). One check runs at
        a time; a check still running after :data:`CHECK_TIMEOUT` counts as a failure."""
        with self._check_lock:
            if self._check is None or not self._check.is_alive():
                self._check_result = None
                thread = threading.Thread(target=self._check_into, daemon=True,
                                          name="gpuledger-readyz")
                self._check = thread
                thread.start()
            thread = self._check
        thread.join(CHECK_TIMEOUT)
        result = self._check_result
        if thread.is_alive() or result is None:
            return [f"database: no answer within {CHECK_TIMEOUT:g} s"]
        return result

    def _check_into(self) -> None:
        self._check_result = self._run_checks()


class Endpoint:
    """The HTTP listener: an accept thread and at most :data:`MAX_CLIENTS` handler threads."""

    def __init__(self, exposition: Exposition, listener: socket.socket, log=None):
        self.exposition = exposition
        self.listener = listener
        self.log = log
        self._slots = threading.BoundedSemaphore(MAX_CLIENTS)
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple:
        return self.listener.getsockname()

    def start(self) -> Endpoint:
        self._thread = threading.Thread(target=self._accept, daemon=True,
                                        name="gpuledger-metrics")
        self._thread.start()
        if self.log is not None:
            host, port = self.address[:2]
            self.log.event(event="metrics_listening", address=f"{host}:{port}")
        return self

    def stop(self) -> None:
        self._stopping.set()
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()
        if self._thread is not None:
            self._thread.join(2)

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, peer = self.listener.accept()
            except OSError:
                if self._stopping.is_set():
                    return
                time.sleep(0.05)  # EMFILE and the like: do not spin
                continue
            if not self._slots.acquire(blocking=False):
                self._busy(conn)
                continue
            try:
                threading.Thread(target=self._serve, args=(conn, peer), daemon=True).start()
            except RuntimeError:
                self._slots.release()
                self._busy(conn)

    @staticmethod
    def _busy(conn: socket.socket) -> None:
        try:
            conn.setblocking(False)
            conn.send(b"HTTP/1.0 503 Service Unavailable\r\nContent-Length: 5\r\n"
                      b"Connection: close\r\n\r\nbusy\n")
        except OSError:
            pass
        conn.close()

    def _serve(self, conn: socket.socket, peer) -> None:
        timer = threading.Timer(DEADLINE, _cut, (conn,))
        timer.daemon = True
        timer.start()
        try:
            conn.settimeout(DEADLINE)
            _Handler(conn, peer, self.exposition)
        except OSError:
            pass
        finally:
            timer.cancel()
            try:
                conn.close()
            except OSError:
                pass
            self._slots.release()


def _cut(conn: socket.socket) -> None:
    """A client past its deadline: end the connection (the handler's reads then fail)."""
    try:
        conn.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class _Handler(BaseHTTPRequestHandler):
    """GET or HEAD of /metrics, /livez, /readyz; anything else 404 or 405."""

    protocol_version = "HTTP/1.0"

    def version_string(self) -> str:
        return "gpuledger"

    def __init__(self, conn: socket.socket, peer, exposition: Exposition):
        self.exposition = exposition
        super().__init__(conn, peer, None)

    def log_message(self, format, *args) -> None:
        pass  # scrapes every few seconds would drown the request log

    def _send(self, code: int, body: bytes, ctype: str = "text/plain; charset=utf-8") -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._send(200, self.exposition.metrics(), CONTENT_TYPE_LATEST)
        elif path == "/livez":
            self._send(200, b"ok\n")
        elif path == "/readyz":
            problems = self.exposition.ready()
            if problems:
                self._send(503, ("not ready: " + "; ".join(problems) + "\n").encode())
            else:
                self._send(200, b"ok\n")
        else:
            self._send(404, b"not found: /metrics, /livez and /readyz are served here\n")

    do_HEAD = do_GET

    def send_error(self, code, message=None, explain=None) -> None:
        try:
            self._send(code, f"{message or code}\n".encode("latin-1", "replace"))
        except OSError:
            pass

    def handle_one_request(self) -> None:
        self.raw_requestline = self.rfile.readline(MAX_REQUEST + 1)
        if len(self.raw_requestline) > MAX_REQUEST:
            self.send_error(414)
            return
        if not self.raw_requestline or not self.parse_request():
            return
        if self.command not in ("GET", "HEAD"):
            self.send_error(405, "only GET and HEAD")
            return
        self.do_GET()
        self.wfile.flush()


# -- assembly, for `gpuledger serve` ----------------------------------------------------------

def bind_or_log(cfg, log) -> socket.socket | None:
    """The endpoint's listener, or None: off (``listen = ""``), or it cannot listen there —
    then one ``event=metrics_failed`` line, and the daemon serves on without metrics
    (a taken port must never stop the submit path; ``gpuledger status`` says so)."""
    if not cfg.metrics.listen:
        return None
    try:
        return bind(cfg.metrics.listen)
    except ConfigError as exc:
        log.event(event="metrics_failed", error=str(exc))
        return None


def start(cfg, ledger, instruments: Instruments, process: str, log,
          listener: socket.socket, *, peer_socket: str | None = None) -> Endpoint:
    """Serve the endpoint on ``listener`` from this process; with ``peer_socket`` (the
    privileged socket), that process's counters are fetched from it for each fresh scrape."""
    from .client import Client

    figures = LedgerFigures(ledger, keys_dir=cfg.keys_dir, spool=cfg.hooks.spool_dir,
                            per_account=cfg.metrics.per_account)
    peer = ping = None
    if peer_socket:
        def peer() -> list:
            with Client(peer_socket, timeout=CHECK_TIMEOUT) as c:
                return c.request("metrics")

        def ping() -> None:
            with Client(peer_socket, timeout=CHECK_TIMEOUT) as c:
                if c.call("ping").get("ok") != "1":
                    raise LedgerError("it did not answer ping")

    exposition = Exposition(figures, instruments, process, cache_s=cfg.metrics.cache_s,
                            peer=peer, peer_ping=ping)
    return Endpoint(exposition, listener, log).start()
