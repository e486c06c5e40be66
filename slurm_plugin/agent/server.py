"""Unix-socket server and sampling loop of the agent (asyncio, one thread)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
import struct
from collections.abc import Iterable

from ledger.config import AgentSection
from slurm_plugin.agent.core import Agent
from slurm_plugin.agent.protocol import MAX_LINE, encode, handle_line
from slurm_plugin.safefs import SafeDir

log = logging.getLogger("gpuledger.agent")

DEFAULT_SOCKET = AgentSection.socket  # [agent] socket (ledger.config)
IDLE_TIMEOUT_S = 10.0
MAX_CLIENTS = 64


def peer_uid(sock: socket.socket | None) -> int | None:
    if sock is None:
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    return struct.unpack("3i", raw)[1]


def _clear_stale(path: str) -> None:
    """Remove a leftover socket file; refuse if another agent still answers on it."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise RuntimeError(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)
        return
    finally:
        probe.close()
    raise RuntimeError(f"another agent is listening on {path}")


class AgentServer:
    """Serves the line protocol and calls `agent.tick()` every `interval_s`."""

    def __init__(
        self,
        agent: Agent,
        socket_path: str,
        interval_s: float,
        *,
        allowed_uids: Iterable[int] | None = None,
    ) -> None:
        self.agent = agent
        self.socket_path = socket_path
        self.interval_s = interval_s
        self.allowed = set(allowed_uids) if allowed_uids is not None else {0, os.geteuid()}
        self.stop_event = asyncio.Event()
        self.rounds = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def serve(self) -> None:
        """Run until `stop_event` is set; the socket is removed on the way out."""
        # the socket's directory: root's (or ours) and writable by nobody else, or refused
        # (safefs.UnsafePath) — the unlink, bind and chmod below go by path inside it
        SafeDir(os.path.dirname(os.path.abspath(self.socket_path)), create=True,
                mode=0o755).close()
        _clear_stale(self.socket_path)
        old = os.umask(0o177)
        try:
            server = await asyncio.start_unix_server(
                self._client, path=self.socket_path, limit=MAX_LINE
            )
        finally:
            os.umask(old)
        os.chmod(self.socket_path, 0o600)
        log.info("gpuledger-agent: listening on %s", self.socket_path)
        try:
            await self._sample_loop()
        finally:
            server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await server.wait_closed()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.socket_path)

    async def _sample_loop(self) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time()
        while not self.stop_event.is_set():
            try:
                self.agent.tick()
            except Exception:  # the loop must survive anything a round does
                log.exception("gpuledger-agent: sampling round failed")
            self.rounds += 1
            due += self.interval_s
            now = loop.time()
            if due < now:  # fell behind: skip missed rounds rather than bunching them
                due = now + self.interval_s
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.stop_event.wait(), due - now)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        uid = peer_uid(writer.get_extra_info("socket"))
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            if uid not in self.allowed:
                log.warning("gpuledger-agent: refused peer uid %s", uid)
                await self._send(writer, {"ok": False, "error": "permission denied"})
                return
            if len(self._tasks) > MAX_CLIENTS:
                await self._send(writer, {"ok": False, "error": "busy"})
                return
            await self._serve_lines(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except Exception:
            log.exception("gpuledger-agent: client handler failed")
        finally:
            if task is not None:
                self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _serve_lines(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                line = await asyncio.wait_for(reader.readline(), IDLE_TIMEOUT_S)
            except TimeoutError:
                return
            except ValueError:  # longer than MAX_LINE
                await self._send(writer, {"ok": False, "error": "bad request: line too long"})
                return
            if not line:
                return
            if not line.strip():
                continue
            await self._send(writer, handle_line(self.agent, line))

    @staticmethod
    async def _send(writer: asyncio.StreamWriter, reply: dict[str, object]) -> None:
        try:
            data = encode(reply)
        except ValueError:
            data = encode({"ok": False, "error": "reply too large"})
        writer.write(data)
        await writer.drain()
