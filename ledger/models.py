"""The ledger schema: SQLAlchemy 2 typed models under one MetaData naming convention.

Money columns are BigInteger GPU-seconds at the reference rate. Text compares as
bytes on every database — identifiers, keys, names: ``Job-Key-1``, ``job-key-1`` and
``job-key-1 `` are three keys — which on MariaDB takes a NO PAD binary collation
(PostgreSQL and SQLite compare bytes by default). ``wallets`` are
the double-entry accounts (system, per Slurm account, per token); ``journal``
is the append-only, hash-chained list of every movement and state change.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
)
from sqlalchemy.dialects import mysql
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(TypeDecorator):
    """Aware UTC datetimes in, aware UTC datetimes out; stored naive UTC with microseconds."""

    impl = DateTime
    cache_ok = True

    def load_dialect_impl(self, dialect):
        if dialect.name in ("mysql", "mariadb"):
            return dialect.type_descriptor(mysql.DATETIME(fsp=6))
        return dialect.type_descriptor(DateTime())

    def process_bind_param(self, value, dialect):
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the ledger")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value, dialect):
        if value is None:
            return None
        if isinstance(value, str):  # SQLite through raw SQL
            value = datetime.fromisoformat(value)
        return value.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


# MariaDB's utf8mb4_bin is PAD SPACE ('a ' = 'a'); the default collations also ignore case.
BINARY_COLLATION = "utf8mb4_nopad_bin"
BINARY_TEXT = {"mysql_charset": "utf8mb4", "mysql_collate": BINARY_COLLATION}


Amount = BigInteger


class Wallet(Base):
    """A double-entry account. Only wallets flagged ``allow_negative`` (issuance) go below 0."""

    __tablename__ = "wallets"
    __table_args__ = (
        CheckConstraint("allow_negative OR balance >= 0", name="balance_not_negative"),
        BINARY_TEXT,
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    code: Mapped[str] = mapped_column(String(80), unique=True)
    kind: Mapped[str] = mapped_column(String(16))  # system | account | token
    balance: Mapped[int] = mapped_column(Amount, default=0)
    allow_negative: Mapped[bool] = mapped_column(Boolean, default=False)


class Account(Base):
    """A Slurm account (project). Its pool wallet receives revoked remainders."""

    __tablename__ = "accounts"
    __table_args__ = BINARY_TEXT

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    wallet_id: Mapped[int] = mapped_column(ForeignKey("wallets.id"))
    report_to: Mapped[list] = mapped_column(JSON, default=list)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class SigningKey(Base):
    """An Ed25519 public key; its private half stays in the keys directory of the minting host."""

    __tablename__ = "signing_keys"
    __table_args__ = BINARY_TEXT

    kid: Mapped[str] = mapped_column(String(64), primary_key=True)
    public_key: Mapped[str] = mapped_column(String(64))  # base64url of the 32 raw bytes
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    retired_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class Token(Base):
    """Ledger state of a signed token; the token's value lives in its wallet."""

    __tablename__ = "tokens"
    __table_args__ = (Index(None, "account_id"), BINARY_TEXT)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    kid: Mapped[str] = mapped_column(ForeignKey("signing_keys.kid"))
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"))
    wallet_id: Mapped[int] = mapped_column(ForeignKey("wallets.id"), unique=True)
    parent_id: Mapped[str | None] = mapped_column(ForeignKey("tokens.id"), nullable=True)
    face: Mapped[int] = mapped_column(Amount)
    not_before: Mapped[datetime] = mapped_column(UTCDateTime)
    expires: Mapped[datetime] = mapped_column(UTCDateTime)
    scopes: Mapped[dict] = mapped_column(JSON)
    digest: Mapped[str] = mapped_column(String(64))  # sha256 of the signed payload
    status: Mapped[str] = mapped_column(String(16), default="active")  # active|revoked|expired
    status_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    closed_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class Rate(Base):
    """Charge rate of a GPU type in parts per million of the reference GPU."""

    __tablename__ = "rates"
    __table_args__ = BINARY_TEXT

    gpu_type: Mapped[str] = mapped_column(String(64), primary_key=True)
    rate_ppm: Mapped[int] = mapped_column(BigInteger)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)


class Multiplier(Base):
    """A tier: a rate multiplier (ppm) by partition, by QOS or for an off-peak window."""

    __tablename__ = "multipliers"
    __table_args__ = BINARY_TEXT

    kind: Mapped[str] = mapped_column(String(16), primary_key=True)  # partition|qos|offpeak
    name: Mapped[str] = mapped_column(String(64), primary_key=True)  # or HH:MM-HH:MM
    multiplier_ppm: Mapped[int] = mapped_column(BigInteger)
    zone: Mapped[str | None] = mapped_column(String(64), nullable=True)  # off-peak windows
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)


class Hold(Base):
    """Escrow for one job (or one job array): pending → posted | voided, exactly once."""

    __tablename__ = "holds"
    __table_args__ = (
        Index(None, "state"),
        Index(None, "token_id"),
        Index(None, "job_id"),
        Index(None, "account", "created_at"),
        CheckConstraint("charged <= amount", name="charged_within_hold"),
        CheckConstraint("charged >= 0", name="charged_not_negative"),
        BINARY_TEXT,
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    token_id: Mapped[str] = mapped_column(ForeignKey("tokens.id"))
    account: Mapped[str] = mapped_column(String(64))
    user: Mapped[str | None] = mapped_column(String(64), nullable=True)
    partition: Mapped[str | None] = mapped_column(String(64), nullable=True)
    cluster: Mapped[str | None] = mapped_column(String(64), nullable=True)
    gpu_type: Mapped[str | None] = mapped_column(String(64), nullable=True)
    gpus: Mapped[int] = mapped_column(Integer)
    seconds: Mapped[int] = mapped_column(Integer)
    tasks: Mapped[int] = mapped_column(Integer, default=1)
    rate_ppm: Mapped[int] = mapped_column(BigInteger)
    amount: Mapped[int] = mapped_column(Amount)  # currently held (after resizes)
    charged: Mapped[int] = mapped_column(Amount, default=0)
    refunded: Mapped[int] = mapped_column(Amount, default=0)
    state: Mapped[str] = mapped_column(String(16), default="pending")
    job_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    resolved_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    request: Mapped[dict] = mapped_column(JSON)
    # what the hold pays for: whole GPUs (gres "gpu", share 1) or shares of GPUs
    # (shard/mps: per_node shares on each node, priced at `share` shares per GPU)
    gres: Mapped[str] = mapped_column(String(8), server_default="gpu")
    per_node: Mapped[int | None] = mapped_column(Integer, nullable=True)
    share: Mapped[int] = mapped_column(Integer, server_default="1")
    # the job's QOS and the tier multiplier the hold was priced at (ledger.tiers)
    qos: Mapped[str | None] = mapped_column(String(64), nullable=True)
    multiplier_ppm: Mapped[int] = mapped_column(BigInteger, server_default="1000000")


class Charge(Base):
    """One settlement against a hold (a node, an array task or a run of a requeued job)."""

    __tablename__ = "charges"
    __table_args__ = (Index(None, "hold_id"), Index(None, "created_at"), BINARY_TEXT)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    hold_id: Mapped[str] = mapped_column(ForeignKey("holds.id"))
    key: Mapped[str] = mapped_column(String(200), unique=True)
    amount: Mapped[int] = mapped_column(Amount)
    job_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    node: Mapped[str | None] = mapped_column(String(64), nullable=True)
    restart: Mapped[int | None] = mapped_column(Integer, nullable=True)
    usage: Mapped[dict] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class JournalEntry(Base):
    """One append-only, hash-chained row: a transfer (amount > 0) or a state change (0)."""

    __tablename__ = "journal"
    __table_args__ = (
        Index(None, "ts"),
        Index(None, "token_id"),
        Index(None, "hold_id"),
        # a set of wallets' movements up to a time (balances as of a date; reports)
        Index("ix_journal_debit_wallet_id_ts", "debit_wallet_id", "ts"),
        Index("ix_journal_credit_wallet_id_ts", "credit_wallet_id", "ts"),
        CheckConstraint("amount >= 0", name="amount_not_negative"),
        BINARY_TEXT,
    )

    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    ts: Mapped[int] = mapped_column(BigInteger)  # microseconds since the epoch, UTC
    kind: Mapped[str] = mapped_column(String(24))
    debit_wallet_id: Mapped[int | None] = mapped_column(ForeignKey("wallets.id"), nullable=True)
    credit_wallet_id: Mapped[int | None] = mapped_column(ForeignKey("wallets.id"), nullable=True)
    amount: Mapped[int] = mapped_column(Amount, default=0)
    account: Mapped[str | None] = mapped_column(String(64), nullable=True)
    token_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    hold_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    data: Mapped[str] = mapped_column(Text, default="{}")  # canonical JSON
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))


class JournalPending(Base):
    """Journal rows committed but not chained yet (server databases only). A writer that
    finds the chain head taken by another leaves its rows here instead of waiting; the next
    writer to take the head chains them, in ``id`` order, before its own (``ledger.journal``).
    The system wallets' balances include a row once it is chained."""

    __tablename__ = "journal_pending"
    __table_args__ = (Index(None, "hold_id"), Index(None, "token_id"), BINARY_TEXT)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"),
                                    primary_key=True, autoincrement=True)
    ts: Mapped[int] = mapped_column(BigInteger)
    kind: Mapped[str] = mapped_column(String(24))
    debit_wallet_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    credit_wallet_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    amount: Mapped[int] = mapped_column(Amount)
    account: Mapped[str | None] = mapped_column(String(64), nullable=True)
    token_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    hold_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    data: Mapped[str] = mapped_column(Text)


class ChainHead(Base):
    """The single row every writer locks last: the journal's tip (seq, hash)."""

    __tablename__ = "chain_head"
    __table_args__ = BINARY_TEXT

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    seq: Mapped[int] = mapped_column(BigInteger)
    hash: Mapped[str] = mapped_column(String(64))


class IdempotencyRecord(Base):
    """First result of an operation under a caller's key; replays return it unchanged."""

    __tablename__ = "idempotency"
    __table_args__ = BINARY_TEXT

    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    op: Mapped[str] = mapped_column(String(24))
    fingerprint: Mapped[str] = mapped_column(String(64))
    result: Mapped[dict] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


GENESIS_HASH = "0" * 64
