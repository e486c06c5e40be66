"""Who is on the other end of the socket, and what they may do.

Peer credentials come from the kernel (SO_PEERCRED), never from the request. Root and
the SlurmUser are *privileged*: they reserve and resize holds for any user and may ask
about anyone. Every other local user may only ask about themselves (balance, quote, jobs).
"""

from __future__ import annotations

import pwd
import socket
import struct
import subprocess
import threading
import time
from dataclasses import dataclass

from ..errors import LedgerError

_UCRED = struct.Struct("3i")
NAME_TTL = 300.0


class Forbidden(LedgerError):
    """The peer may not perform this operation."""


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int
    name: str
    privileged: bool


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a Unix socket."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    return _UCRED.unpack(raw)


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def uid_of(name: str) -> int | None:
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        return None


class Policy:
    """Maps peer credentials to a :class:`Peer` and answers permission questions."""

    def __init__(self, slurm_user: str, privileged_uids: frozenset[int] | None = None):
        uids = {0}
        self.slurm_uid = slurm_uid = uid_of(slurm_user)
        if slurm_uid is not None:
            uids.add(slurm_uid)
        self.privileged_uids = frozenset(uids | set(privileged_uids or ()))
        self._names: dict[int, tuple[float, str]] = {}

    def peer(self, pid: int, uid: int, gid: int) -> Peer:
        return Peer(pid, uid, gid, self._name(uid), uid in self.privileged_uids)

    def _name(self, uid: int) -> str:
        """The user name of ``uid``, cached: the accept loop must not wait on NSS per connection."""
        now = time.monotonic()
        hit = self._names.get(uid)
        if hit is not None and now - hit[0] < NAME_TTL:
            return hit[1]
        name = user_name(uid)
        if len(self._names) >= 4096:
            self._names.clear()
        self._names[uid] = (now, name)
        return name

    @staticmethod
    def require_privileged(peer: Peer, op: str) -> None:
        if not peer.privileged:
            raise Forbidden(f"{op} is only for root and the Slurm user, not {peer.name}")

    @staticmethod
    def subject(peer: Peer, requested: str | None) -> str:
        """The user a question is about: anyone for privileged peers, else only oneself."""
        if not requested or requested == peer.name:
            return peer.name
        if peer.privileged:
            return requested
        raise Forbidden(f"user {peer.name} may only ask about themselves, not {requested}")


class SlurmAccounts:
    """A user's Slurm accounts (``sacctmgr show assoc``), cached for ``ttl`` seconds."""

    def __init__(self, ttl: float = 300.0, command: tuple[str, ...] = ("sacctmgr",),
                 timeout: float = 5.0):
        self.ttl = ttl
        self.command = command
        self.timeout = timeout
        self._cache: dict[str, tuple[float, frozenset[str]]] = {}
        self._lock = threading.Lock()

    def __call__(self, user: str) -> frozenset[str]:
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(user)
        if hit and now - hit[0] < self.ttl:
            return hit[1]
        accounts = self._query(user)
        with self._lock:
            self._cache[user] = (now, accounts)
        return accounts

    def _query(self, user: str) -> frozenset[str]:
        try:
            out = subprocess.run(
                [*self.command, "-nP", "show", "assoc", f"user={user}", "format=account"],
                capture_output=True, text=True, timeout=self.timeout, check=False,
            )
        except (OSError, subprocess.TimeoutExpired):
            return frozenset()  # no Slurm accounting here: only user-scoped tokens show
        if out.returncode != 0:
            return frozenset()
        return frozenset(line.strip() for line in out.stdout.splitlines() if line.strip())
