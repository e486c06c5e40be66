"""The daemon's handlers in this process, as the Slurm user calls them, for benchmarks that
time hook code and the ledger's work without the socket hop (``submit_bench.py`` measures
the socket's round trip on its own)."""

from __future__ import annotations

from ledger.config import ChargeConfig
from ledger.daemon.auth import Peer, Policy
from ledger.daemon.client import response_error
from ledger.daemon.handlers import Handlers


class LocalDaemon:
    def __init__(self, ledger, charge: ChargeConfig | None = None):
        self.handlers = Handlers(ledger, Policy("slurm"), accounts=lambda u: frozenset(),
                                 charge=charge)
        self.peer = Peer(0, 0, 0, "root", True)

    def request(self, op: str, **fields) -> dict:
        resp = self.handlers.handle(self.peer, {"op": op, **{k: str(v) for k, v in
                                                             fields.items()}})
        if resp.get("ok") != 1:
            raise response_error({k: str(v) for k, v in resp.items() if v is not None})
        return resp

    def close(self) -> None:
        pass
