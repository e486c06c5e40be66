"""A TCP proxy in front of PostgreSQL that cuts a connection around its COMMIT, as a
failover does: the tests of ``ledger.dbretry`` and ``ledger.db.run_write`` use it to lose a
COMMIT's reply (the server committed, the client cannot know) or the COMMIT itself (the
server rolls back, the client cannot know either).

The client must not use TLS through it (``sslmode=disable``): the proxy reads the
protocol's bytes to find a COMMIT (a query string ``COMMIT`` ends with a NUL byte in the
simple and the extended protocol alike).
"""

from __future__ import annotations

import socket
import threading
import time

COMMIT = b"COMMIT\x00"
AFTER_COMMIT = "after_commit"  # COMMIT reaches the server; its reply never reaches the client
BEFORE_COMMIT = "before_commit"  # COMMIT never reaches the server


class FaultProxy:
    def __init__(self, host: str, port: int):
        self.target = (host, port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._armed: list[str] = []
        self.cuts: list[str] = []  # the modes of the cuts made, in order
        self._stopping = False
        self._open: set[socket.socket] = set()
        threading.Thread(target=self._accept, daemon=True).start()

    def arm(self, mode: str, times: int = 1) -> None:
        """Cut the next ``times`` COMMITs (of any connection) this way."""
        assert mode in (AFTER_COMMIT, BEFORE_COMMIT)
        with self._lock:
            self._armed += [mode] * times

    def close(self) -> None:
        self._stopping = True
        self._listener.close()
        with self._lock:
            for s in list(self._open):
                _shut(s)

    def _accept(self) -> None:
        while not self._stopping:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            withheld = threading.Event()
            with self._lock:
                self._open |= {client, server}
            threading.Thread(target=self._upstream, args=(client, server, withheld),
                             daemon=True).start()
            threading.Thread(target=self._downstream, args=(server, client, withheld),
                             daemon=True).start()

    def _take(self, chunk: bytes) -> str | None:
        if COMMIT not in chunk:
            return None
        with self._lock:
            if not self._armed:
                return None
            mode = self._armed.pop(0)
            self.cuts.append(mode)
            return mode

    def _upstream(self, client: socket.socket, server: socket.socket,
                  withheld: threading.Event) -> None:
        try:
            while chunk := client.recv(65536):
                mode = self._take(chunk)
                if mode == BEFORE_COMMIT:
                    break
                if mode == AFTER_COMMIT:
                    withheld.set()  # before the server can answer
                    server.sendall(chunk)
                    time.sleep(0.3)  # the server commits
                    break
                server.sendall(chunk)
        except OSError:
            pass
        self._end(client, server)

    def _downstream(self, server: socket.socket, client: socket.socket,
                    withheld: threading.Event) -> None:
        try:
            while chunk := server.recv(65536):
                if withheld.is_set():
                    continue
                client.sendall(chunk)
        except OSError:
            pass
        self._end(client, server)

    def _end(self, *socks: socket.socket) -> None:
        for s in socks:
            _shut(s)
            with self._lock:
                self._open.discard(s)


def _shut(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    s.close()
