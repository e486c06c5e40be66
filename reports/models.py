"""Tables owned by reports: the send log, alerts and their deliveries, idle notices.

They live on their own metadata (:class:`ReportBase`) with their own migration branch
(``reports/migrations``, see ``reports.schema``); the ledger's schema knows nothing of them.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, ForeignKey, Index, Integer, MetaData, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from ledger.models import BINARY_TEXT, NAMING_CONVENTION, Amount, UTCDateTime


class ReportBase(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


SITE = "*site*"  # the scope of the site summary in the send log


class ReportSend(ReportBase):
    """One message for one recipient: a monthly report (scope = account) or the site summary.

    A row with status ``sent`` means the SMTP server accepted the message for that
    recipient; a re-run sends only to recipients without one.
    """

    __tablename__ = "report_sends"
    __table_args__ = (UniqueConstraint("kind", "scope", "period", "recipient"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(16))  # report | site
    scope: Mapped[str] = mapped_column(String(64))  # account name, or SITE
    period: Mapped[str] = mapped_column(String(16))  # YYYY-MM
    recipient: Mapped[str] = mapped_column(String(254))
    status: Mapped[str] = mapped_column(String(16))  # sent | failed
    message_id: Mapped[str | None] = mapped_column(String(254), nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)


class Alert(ReportBase):
    """A threshold an account or a token crossed; raised once per (subject, kind, threshold)."""

    __tablename__ = "alerts"
    __table_args__ = (
        UniqueConstraint("account", "subject", "kind", "threshold"),
        Index(None, "account"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    account: Mapped[str] = mapped_column(String(64))
    subject: Mapped[str] = mapped_column(String(64))  # "account" or a token id
    kind: Mapped[str] = mapped_column(String(16))  # used | expiry
    threshold: Mapped[int] = mapped_column(Integer)  # percent used, or days before expiry
    figures: Mapped[dict] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    # set once every recipient the account had then has it (or it had none)
    closed_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class AlertDelivery(ReportBase):
    """An alert accepted by the SMTP server for one recipient (so it never goes twice)."""

    __tablename__ = "alert_deliveries"
    __table_args__ = (UniqueConstraint("alert_id", "recipient"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    alert_id: Mapped[int] = mapped_column(ForeignKey("alerts.id"))
    recipient: Mapped[str] = mapped_column(String(254))
    message_id: Mapped[str | None] = mapped_column(String(254), nullable=True)
    sent_at: Mapped[datetime] = mapped_column(UTCDateTime)


class IdleNotice(ReportBase):
    """A settlement flagged for idle GPUs (``ledger.idle``): what idle cost, the refund it
    got (journaled on its hold under ``idle:charge:<id>``) and the digest that told the
    owner. One row per charge, so a re-run refunds and mails nothing twice."""

    __tablename__ = "idle_notices"
    __table_args__ = (Index(None, "owner", "mailed_at"), BINARY_TEXT)

    charge_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    hold_id: Mapped[str] = mapped_column(String(64))
    account: Mapped[str] = mapped_column(String(64))
    user: Mapped[str | None] = mapped_column(String(64), nullable=True)
    job_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    node: Mapped[str | None] = mapped_column(String(64), nullable=True)
    owner: Mapped[str] = mapped_column(String(80))  # "user:<name>" or "account:<name>"
    held_ms: Mapped[int] = mapped_column(Amount)
    idle_ms: Mapped[int] = mapped_column(Amount)
    idle_max_ms: Mapped[int] = mapped_column(Amount)
    idle_cost: Mapped[int] = mapped_column(Amount)
    refund: Mapped[int] = mapped_column(Amount)
    charged_at: Mapped[datetime] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    mailed_to: Mapped[list | None] = mapped_column(JSON, nullable=True)
    mailed_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
