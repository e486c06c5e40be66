"""Fixtures for the report tests: a seeded month and a real SMTP server on loopback.

``seed_month`` drives the ledger's own service API through October and November
2026 (and a little of December) with a fixed clock, and returns the figures the
November report must show, worked out by hand from the operations below.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ledger.views import HoldRequest

H = 3600  # GPU-seconds in a GPU-hour


def at(month: int, day: int, hour: int = 12, year: int = 2026) -> datetime:
    return datetime(year, month, day, hour, tzinfo=UTC)


def gpus(*pairs, measured=True):
    """Per-GPU usage records (agent JobUsage shape): pairs of (held hours, busy hours)."""
    return {"gpus": [{"index": i, "uuid": f"GPU-{i}", "held_ms": int(h * 3_600_000),
                      "busy_ms": int(b * 3_600_000), "energy_mj": 0, "peak_mem_bytes": 0,
                      "measured": measured} for i, (h, b) in enumerate(pairs)]}


@dataclass
class Seeded:
    """What the November 2026 report of each account must say (GPU-seconds, ms)."""

    ledger: object
    tokens: dict[str, str] = field(default_factory=dict)  # name -> token string
    ids: dict[str, str] = field(default_factory=dict)  # name -> token id
    jobs: dict[str, str] = field(default_factory=dict)  # name -> hold id


def seed_month(lg, clock) -> Seeded:
    s = Seeded(lg)
    lg.set_report_to("physics", ["lead@physics.example", "pi@physics.example"])
    lg.set_report_to("chemistry", ["head@chem.example"])

    def mint(name, account, hours, expires):
        tok, view = lg.mint(account, hours * H, expires=expires)
        s.tokens[name], s.ids[name] = tok, view.id

    def job(name, token, account, user, gpu_type, n, hours, *, job_id):
        view = lg.reserve(s.tokens[token], HoldRequest(gpus=n, seconds=int(hours * H),
                                                       gpu_type=gpu_type, account=account,
                                                       user=user), job_id=job_id)
        s.jobs[name] = view.id
        return view.id

    # October: tokens, one settled job, and one job still running across the month boundary.
    clock.now = at(10, 20)
    mint("T1", "physics", 1000, at(6, 30, year=2027))
    mint("T0", "physics", 50, at(12, 20))  # expires soon after November
    mint("C1", "chemistry", 200, at(11, 20))  # expires inside November
    clock.now = at(10, 25)
    job("oct", "T1", "physics", "alice", "h100", 2, 4, job_id="900")
    lg.post(s.jobs["oct"], 6 * H, usage=gpus((3, 3), (3, 3)))
    clock.now = at(10, 31, 23)
    job("boundary", "T1", "physics", "bob", "h100", 1, 10, job_id="901")

    # November.
    clock.now = at(11, 1, 3)
    lg.post(s.jobs["boundary"], 5 * H, usage=gpus((5, 4)))  # 80 % busy
    clock.now = at(11, 2)
    tok, view = lg.split(s.tokens["T1"], 100 * H)  # internal split
    s.tokens["T2"], s.ids["T2"] = tok, view.id
    clock.now = at(11, 3)
    tok, view = lg.split(s.tokens["T1"], 50 * H, account="chemistry")  # to chemistry
    s.tokens["C2"], s.ids["C2"] = tok, view.id
    clock.now = at(11, 4)
    lg.transfer(s.tokens["T2"], s.tokens["C1"], 10 * H, reason="shared run")  # to chemistry
    clock.now = at(11, 5)
    job("a1", "T1", "physics", "alice", "h100", 2, 4, job_id="1001")
    clock.now = at(11, 5, 16)
    lg.post(s.jobs["a1"], 6 * H, usage=gpus((3, 0.3), (3, 0.3)))  # 10 % busy
    clock.now = at(11, 6)
    job("b1", "T1", "physics", "bob", "a100", 1, 10, job_id="1002")  # 6 GPU-h held
    clock.now = at(11, 6, 20)
    lg.post(s.jobs["b1"], 3 * H, usage=gpus((5, 4.5)))  # a100 rate 0.6: 5 h -> 3 GPU-h
    clock.now = at(11, 7)
    job("c1", "T1", "physics", "carol", None, 4, 2, job_id="1003")  # untyped: held at 1.0 (8 GPU-h), charged 4
    clock.now = at(11, 7, 14)
    lg.post(s.jobs["c1"], 4 * H, usage={"measured": False, "gpus": [
        {"index": i, "held_ms": 2 * 3_600_000, "busy_ms": 0, "measured": False}
        for i in range(4)]})
    clock.now = at(11, 8)
    job("v1", "T1", "physics", "alice", "h100", 1, 3, job_id="1004")
    lg.void(s.jobs["v1"], reason="cancelled")
    clock.now = at(11, 9)
    job("n1", "T1", "physics", "bob", "h100", 1, 2, job_id="1005")
    lg.post(s.jobs["n1"], 2 * H)  # no usage figures at all
    clock.now = at(11, 10)
    job("m1", "T1", "physics", "alice", "h100", 2, 5, job_id="1006")  # settled by two nodes
    clock.now = at(11, 10, 15)
    lg.post(s.jobs["m1"], 3 * H, usage=gpus((1.5, 0.15), (1.5, 0.15)), key="m1-node1",
            final=False, node="n1")
    lg.post(s.jobs["m1"], 2 * H, usage=gpus((1, 0.1), (1, 0.1)), key="m1-node2",
            final=True, node="n2")
    clock.now = at(11, 12)
    lg.refund(s.jobs["a1"], 1 * H, reason="node fault")
    clock.now = at(11, 14)
    job("ch1", "C1", "chemistry", "dave", "h100", 1, 8, job_id="2001")
    clock.now = at(11, 14, 8)
    lg.post(s.jobs["ch1"], 8 * H, usage=gpus((8, 7.2)))  # 90 %
    clock.now = at(11, 15)
    lg.revoke(s.tokens["T2"], reason="project ended")  # 90 h left -> physics pool
    clock.now = at(11, 18)
    job("ch2", "C1", "chemistry", "dave", "h100", 1, 5, job_id="2002")  # runs past expiry
    clock.now = at(11, 21)
    lg.post(s.jobs["ch2"], 2 * H, usage=gpus((2, 1)))  # remainder 3 h -> system:expired
    lg.expire()  # C1: 200 + 10 - 8 - 5 = 197 GPU-h expire
    clock.now = at(11, 28)
    job("pending", "T1", "physics", "alice", "h100", 1, 12, job_id="1007")  # held at end

    # December: must not show in November.
    clock.now = at(12, 2)
    lg.post(s.jobs["pending"], 7 * H, usage=gpus((7, 7)))
    clock.now = at(12, 5)
    return s


# Expected November figures (GPU-seconds), derived from the operations above.
PHYSICS = dict(
    opening=(1000 + 50 - 6 - 10) * H,  # 10 h of the boundary job still held at the start
    minted=0, received=0,
    sent=(50 + 10) * H,  # split to chemistry, transfer to chemistry
    expired=0,
    charged=(5 + 6 + 3 + 4 + 2 + 3 + 2) * H,
    refunded=1 * H,
    held_change=(12 - 10) * H,  # 12 h pending at the end, 10 h at the start
)
PHYSICS["closing"] = (PHYSICS["opening"] - PHYSICS["sent"] - PHYSICS["charged"]
                      + PHYSICS["refunded"] - PHYSICS["held_change"])
CHEMISTRY = dict(
    opening=200 * H, minted=0, received=(50 + 10) * H, sent=0,
    expired=(197 + 3) * H, charged=(8 + 2) * H, refunded=0, held_change=0,
)
CHEMISTRY["closing"] = (CHEMISTRY["opening"] + CHEMISTRY["received"] - CHEMISTRY["expired"]
                        - CHEMISTRY["charged"])


# -- SMTP ----------------------------------------------------------------------------------------


def self_signed(dir_: Path, host: str = "localhost") -> tuple[Path, Path]:
    """A throwaway certificate for 127.0.0.1/localhost; returns (cert, key) paths."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = datetime.now(UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName(host), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = dir_ / "smtp.crt", dir_ / "smtp.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    message: EmailMessage


class Handler:
    """Stores every accepted message; can refuse recipients or fail after N messages."""

    def __init__(self):
        self.received: list[Received] = []
        self.refuse: set[str] = set()
        self.fail_after: int | None = None  # messages accepted before DATA starts failing
        self.lock = threading.Lock()

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address in self.refuse:
            return "550 5.1.1 mailbox unavailable"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        with self.lock:
            if self.fail_after is not None and len(self.received) >= self.fail_after:
                return "451 4.3.0 simulated failure"
            msg = message_from_bytes(envelope.original_content or envelope.content,
                                     policy=policy.default)
            self.received.append(Received(envelope.mail_from, list(envelope.rcpt_tos), msg))
        return "250 OK queued"

    def to(self, address: str) -> list[EmailMessage]:
        return [r.message for r in self.received if address in r.rcpt_tos]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SmtpServer:
    """aiosmtpd on 127.0.0.1 with STARTTLS (required for AUTH) and a single user."""

    def __init__(self, tmp: Path, user: str = "mailer", password: str = "s3cret",
                 implicit_tls: bool = False):
        self.handler = Handler()
        self.user, self.password = user, password
        self.cert, self.key = self_signed(tmp)
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.cert, self.key)

        def authenticator(server, session, envelope, mechanism, auth_data):
            ok = (isinstance(auth_data, LoginPassword) and auth_data.login == user.encode()
                  and auth_data.password == password.encode())
            return AuthResult(success=ok, handled=False)

        kw = dict(hostname="127.0.0.1", port=free_port(), authenticator=authenticator,
                  auth_required=True, auth_require_tls=True)
        if implicit_tls:
            # aiosmtpd only counts STARTTLS as TLS for AUTH; the whole session is TLS here
            kw["ssl_context"] = ctx
            kw["auth_require_tls"] = False
        else:
            kw["tls_context"] = ctx
            kw["require_starttls"] = True
        self.controller = Controller(self.handler, **kw)

    def __enter__(self) -> SmtpServer:
        self.controller.start()
        return self

    def __exit__(self, *exc) -> None:
        self.controller.stop()

    @property
    def port(self) -> int:
        return self.controller.port

    def settings(self, tmp: Path, **over) -> dict:
        pw = tmp / "smtp.password"
        pw.write_text(self.password + "\n")
        base = {"host": "127.0.0.1", "port": self.port, "security": "starttls",
                "user": self.user, "password_file": str(pw), "from": "gpuledger@hpc.example",
                "ca_file": str(self.cert), "timeout": 10}
        base.update(over)
        return base
