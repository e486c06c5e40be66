"""What one local user may take from the daemon, so that none can crowd out slurmctld.

Privileged peers (root, the SlurmUser) have connection slots of their own that ordinary
users never touch, and no request limits. Every other uid gets a share: a few connections,
a few requests in flight at once, and a deadline for each request to arrive whole. All
users together get a bounded pool of connections and of requests in flight, smaller than
the database's connection pool, so what they ask can never keep a reserve from running.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass

from .auth import Peer


@dataclass(frozen=True)
class Limits:
    privileged_connections: int = 64  # slots only root and the SlurmUser can take
    user_connections: int = 192  # shared by all other users
    connections_per_uid: int = 8
    user_in_flight: int = 2  # requests of all other users being answered at once
    in_flight_per_uid: int = 1
    request_deadline: float = 10.0  # s for a user's request line to arrive, from the last reply


class Admission:
    """Counts connections and requests in flight, per class of peer and per uid."""

    def __init__(self, limits: Limits):
        self.limits = limits
        self._cond = threading.Condition(threading.Lock())
        self._privileged = 0
        self._users = 0
        self._per_uid: Counter[int] = Counter()
        self._in_flight = 0
        self._in_flight_uid: Counter[int] = Counter()

    def connect(self, peer: Peer) -> str | None:
        """Take a connection slot; None when admitted, else why not (for the refusal)."""
        lim = self.limits
        with self._cond:
            if peer.privileged:
                if self._privileged >= lim.privileged_connections:
                    return "too many connections"
                self._privileged += 1
                return None
            if self._per_uid[peer.uid] >= lim.connections_per_uid:
                return f"user {peer.name} has {lim.connections_per_uid} connections open already"
            if self._users >= lim.user_connections:
                return "too many connections"
            self._users += 1
            self._per_uid[peer.uid] += 1
            return None

    def disconnect(self, peer: Peer) -> None:
        with self._cond:
            if peer.privileged:
                self._privileged -= 1
                return
            self._users -= 1
            self._per_uid[peer.uid] -= 1
            if self._per_uid[peer.uid] <= 0:
                del self._per_uid[peer.uid]

    def begin(self, peer: Peer, deadline: float) -> bool:
        """Wait (until ``deadline``, monotonic) for a request slot; privileged peers never wait."""
        if peer.privileged:
            return True
        lim = self.limits
        with self._cond:
            while (self._in_flight >= lim.user_in_flight
                   or self._in_flight_uid[peer.uid] >= lim.in_flight_per_uid):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            self._in_flight += 1
            self._in_flight_uid[peer.uid] += 1
            return True

    def end(self, peer: Peer) -> None:
        if peer.privileged:
            return
        with self._cond:
            self._in_flight -= 1
            self._in_flight_uid[peer.uid] -= 1
            if self._in_flight_uid[peer.uid] <= 0:
                del self._in_flight_uid[peer.uid]
            self._cond.notify_all()

    def counts(self) -> dict[str, int]:
        with self._cond:
            return {"privileged": self._privileged, "users": self._users,
                    "in_flight": self._in_flight}
