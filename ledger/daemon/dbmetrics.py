"""The figures read from the ledger database (and the files beside it) at scrape time.

Counters here are counts and sums of rows the ledger never deletes (holds, charges), so
they only grow, whichever process or host wrote them, and survive restarts of the daemon;
gauges are balances of the system wallets and the journal's head. Nothing is per user.
Per-account figures are only read with ``[metrics] per_account = true``.

Amounts are GPU-seconds at the reference rate (the ledger's unit, ``ledger.amounts``).
"""

from __future__ import annotations

from pathlib import Path

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from sqlalchemy import func, select

from .. import db, verifyrecord
from ..models import Account, ChainHead, Charge, Hold, JournalEntry, JournalPending, Token, Wallet
from ..spoolcount import spool_backlog

H, C, W, J, JP, CH, T, A = (m.__table__ for m in (Hold, Charge, Wallet, JournalEntry,
                                                   JournalPending, ChainHead, Token, Account))
OUTCOMES = ("posted", "voided")  # a hold's end: charged and closed, or released whole


def _label(value: object) -> str:
    return "" if value is None else str(value)


class LedgerFigures:
    """Reads the database's figures as metric families."""

    def __init__(self, ledger, *, keys_dir: Path | None = None, spool: str | None = None,
                 per_account: bool = False):
        self.ledger = ledger
        self.keys_dir = keys_dir if keys_dir is not None else getattr(ledger, "keys_dir", None)
        self.spool = spool
        self.per_account = per_account

    def database(self) -> list[Metric]:
        """The database's figures (raises :class:`ledger.errors.StorageError` when it
        cannot be read)."""
        out: list[Metric] = []
        with db.read(self.ledger.engine) as conn:
            states = dict(conn.execute(select(H.c.state, func.count()).group_by(H.c.state))
                          .all())
            settled = CounterMetricFamily(
                "gpuledger_settlements", "Holds resolved, by outcome: posted (charged and "
                "closed) or voided (released whole).", labels=["outcome"])
            for outcome in OUTCOMES:
                settled.add_metric([outcome], int(states.get(outcome, 0)))
            out.append(settled)
            out.append(GaugeMetricFamily("gpuledger_holds_pending",
                                         "Holds waiting for their jobs to end.",
                                         value=int(states.get("pending", 0))))
            charged = CounterMetricFamily(
                "gpuledger_charged_gpu_seconds", "GPU-seconds charged to jobs (at the "
                "reference rate), by cluster, partition, GPU type and tier (the job's QOS).",
                labels=["cluster", "partition", "gpu_type", "tier"])
            charges = CounterMetricFamily(
                "gpuledger_charges", "Charges posted (one per node and run of a job), by "
                "cluster, partition, GPU type and tier.",
                labels=["cluster", "partition", "gpu_type", "tier"])
            rows = conn.execute(
                select(H.c.cluster, H.c.partition, H.c.gpu_type, H.c.qos,
                       func.coalesce(func.sum(C.c.amount), 0), func.count(C.c.id))
                .select_from(C.join(H, H.c.id == C.c.hold_id))
                .group_by(H.c.cluster, H.c.partition, H.c.gpu_type, H.c.qos))
            for cluster, partition, gpu_type, qos, amount, count in rows:
                labels = [_label(cluster), _label(partition), _label(gpu_type), _label(qos)]
                charged.add_metric(labels, int(amount))
                charges.add_metric(labels, int(count))
            out += [charged, charges]
            balances = dict(conn.execute(select(W.c.code, W.c.balance).where(
                W.c.code.in_(("system:escrow", "system:usage")))).all())
            out.append(GaugeMetricFamily(
                "gpuledger_escrow_held_gpu_seconds", "GPU-seconds held for pending jobs "
                "(the escrow wallet).", value=int(balances.get("system:escrow", 0))))
            out.append(GaugeMetricFamily(
                "gpuledger_usage_gpu_seconds", "GPU-seconds charged less refunded, all time "
                "(the usage wallet).", value=int(balances.get("system:usage", 0))))
            head = conn.execute(select(CH.c.seq)).scalar()
            head_ts = None if not head else conn.execute(
                select(J.c.ts).where(J.c.seq == head)).scalar()
            unchained = conn.execute(select(func.count()).select_from(JP)).scalar() or 0
            out.append(GaugeMetricFamily("gpuledger_journal_head_sequence",
                                         "Sequence number of the journal's last chained row.",
                                         value=int(head or 0)))
            out.append(GaugeMetricFamily(
                "gpuledger_journal_head_timestamp_seconds", "When the journal's last chained "
                "row was written (0: empty journal).",
                value=(head_ts or 0) / 1e6))
            out.append(GaugeMetricFamily("gpuledger_journal_unchained_rows",
                                         "Journal rows committed but not chained yet.",
                                         value=int(unchained)))
            if self.per_account:
                out += self._accounts(conn)
        return out

    def _accounts(self, conn) -> list[Metric]:
        held = GaugeMetricFamily("gpuledger_account_escrow_held_gpu_seconds",
                                 "GPU-seconds held for the account's pending jobs.",
                                 labels=["account"])
        for account, amount in conn.execute(
                select(H.c.account, func.sum(H.c.amount - H.c.charged))
                .where(H.c.state == "pending").group_by(H.c.account)):
            held.add_metric([account], int(amount or 0))
        balance = GaugeMetricFamily("gpuledger_account_tokens_balance_gpu_seconds",
                                    "GPU-seconds left on the account's active tokens.",
                                    labels=["account"])
        for account, amount in conn.execute(
                select(A.c.name, func.sum(W.c.balance))
                .select_from(T.join(W, W.c.id == T.c.wallet_id).join(A, A.c.id == T.c.account_id))
                .where(T.c.status == "active").group_by(A.c.name)):
            balance.add_metric([account], int(amount or 0))
        charged = CounterMetricFamily("gpuledger_account_charged_gpu_seconds",
                                      "GPU-seconds charged to the account's jobs.",
                                      labels=["account"])
        for account, amount in conn.execute(
                select(H.c.account, func.sum(C.c.amount))
                .select_from(C.join(H, H.c.id == C.c.hold_id)).group_by(H.c.account)):
            charged.add_metric([account], int(amount or 0))
        return [held, balance, charged]

    def files(self) -> list[Metric]:
        """Figures from files: the last verify, the spool's backlog."""
        out: list[Metric] = []
        last = verifyrecord.last(self.keys_dir)
        out.append(GaugeMetricFamily(
            "gpuledger_verify_last_timestamp_seconds", "When `gpuledger verify` last ran "
            "(0: never recorded).", value=last.at if last else 0))
        out.append(GaugeMetricFamily(
            "gpuledger_verify_last_success", "1 when the last `gpuledger verify` found the "
            "ledger sound, else 0.", value=1 if last and last.ok else 0))
        out.append(GaugeMetricFamily(
            "gpuledger_verify_last_head_sequence", "The journal head the last verify checked.",
            value=last.head_seq if last else 0))
        if self.spool:
            backlog = spool_backlog(self.spool)
            if backlog is not None:
                out.append(GaugeMetricFamily(
                    "gpuledger_spool_backlog_records", "Charge records waiting in this "
                    "host's spool ([hooks] spool_dir) to be delivered to the daemon.",
                    value=backlog))
        return out
