"""Two-phase holds: reserve (pending, ``ledger.reserve``) → post (charge ≤ held, rest
returned) or void; resize, refund and bind in between.

After TigerBeetle's pending transfers: a reservation moves the job's maximum
cost from the token into ``system:escrow``; charges move from escrow to
``system:usage`` (one per node / array task / run, each under its own key);
closing the hold returns what is left to the token — or to the account pool
if the token was revoked meanwhile, or to ``system:expired`` if it expired.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from types import SimpleNamespace

from sqlalchemy import Connection, or_, select, update

from .amounts import check_amount, fmt_hours, fmt_rate
from .charge_record import ChargeRecord
from .errors import (
    IdempotencyConflict,
    InvalidInput,
    NotFound,
    Reason,
    Refusal,
    StateError,
)
from .facts import HoldFacts, hold_facts, usage_digest
from .journal import Tx
from .liveness import Liveness, refuse_unless_live, token_liveness
from .models import Charge, Hold
from .pricing import hold_cost, unpriced
from .rawsql import FOR_UPDATE, JSONText, Raw
from .reserve import ReserveItem, ReserveOps, _scope_refusal, new_hold_id  # noqa: F401
from .tokens import Scopes
from .views import HoldRequest, HoldView, iso

HO, CH = Hold.__table__, Charge.__table__

# Reserve, post and void run their statements on the driver's cursor (ledger.rawsql).
_HOLD_GET = "SELECT * FROM holds WHERE id = ?"


def check_job_owner(hold, job_id: str, user: str | None, account: str | None) -> None:
    """A hold pays only for jobs of the user and account it was reserved for (as Slurm
    reports the job's: never a user's own --comment)."""
    if user is not None and hold.user is not None and hold.user != user:
        raise StateError(f"hold {hold.id} was reserved for user {hold.user}, "
                         f"not {user} (job {job_id})")
    if account is not None and hold.account != account:
        raise StateError(f"hold {hold.id} was reserved for account {hold.account}, "
                         f"not {account} (job {job_id})")


def check_job_cluster(hold, job_id: str, cluster: str | None) -> None:
    """A hold pays only for a job on the cluster it was reserved on: its token's cluster
    scope was checked there, and another cluster's job may have the same id."""
    if cluster and hold.cluster and hold.cluster != cluster:
        raise StateError(f"hold {hold.id} was reserved on cluster {hold.cluster}, not "
                         f"{cluster} (job {job_id})")


class _Keep:
    """``resize(gpu_type=KEEP)``: the hold's GPU type stays (``None`` means untyped)."""

    def __repr__(self) -> str:
        return "KEEP"


KEEP = _Keep()


def hold_view(row) -> HoldView:
    return HoldView(
        id=row.id, token_id=row.token_id, account=row.account, user=row.user,
        gpu_type=row.gpu_type, gpus=row.gpus, seconds=row.seconds, tasks=row.tasks,
        rate_ppm=row.rate_ppm, amount=row.amount, charged=row.charged, refunded=row.refunded,
        state=row.state, job_id=row.job_id, created=row.created_at, resolved=row.resolved_at,
        partition=row.partition, cluster=row.cluster, gres=row.gres, per_node=row.per_node,
        share=row.share, qos=row.qos, multiplier_ppm=row.multiplier_ppm,
    )


class HoldOps(ReserveOps):
    """Mixin over LedgerBase and TokenOps: reserve (``ReserveOps``), post, void, resize,
    refund, bind."""

    # -- settle ---------------------------------------------------------------------------------

    def _hold_row(self, conn: Connection, hold_id: str, lock: bool = False):
        with Raw(conn) as raw:
            row = raw.record(HO, _HOLD_GET + (FOR_UPDATE if lock else ""), (hold_id,))
        if row is None:
            raise NotFound(f"unknown hold {hold_id}")
        return row

    def _return_to(self, tx: Tx, token_row) -> int:
        """Where a hold's unused remainder goes: token, account pool, or system:expired.

        The pool is that of the account the journal says the token was minted to."""
        state = token_liveness(token_row, tx.now)
        if state is Liveness.REVOKED:
            return self._pool_wallet(tx.conn, token_row)
        if state is Liveness.EXPIRED:
            return tx.wallet_id("system:expired")
        return token_row.wallet_id

    def _locked(self, tx: Tx, hold_id: str, pending: bool = True):
        """(hold row, its journal facts, its token row), hold then token locked.

        The token is the one the journal's reserve row names, not the editable column."""
        hold = self._hold_row(tx.conn, hold_id, lock=True)
        if pending and hold.state != "pending":
            raise StateError(f"hold {hold_id} is already {hold.state}")
        facts = hold_facts(tx, hold_id)
        if pending and facts.closed is not None:
            raise StateError(f"hold {hold_id} is already {facts.state}")
        token_row = self._token_row(tx.conn, facts.token_id or hold.token_id, lock=True)
        return hold, facts, token_row

    def _close(self, tx: Tx, hold_id: str, facts: HoldFacts, token_row, state: str, kind: str,
               reason: str | None = None, charged: int = 0) -> None:
        """Return what the journal says is still escrowed for the hold (not its columns);
        ``facts`` are the hold's journal facts including this transaction's postings, and
        ``charged`` what this transaction charged (added to the column in the same
        statement)."""
        tx.raw.run("UPDATE holds SET charged = charged + ?, state = ?, resolved_at = ? "
                   "WHERE id = ?", (charged, state, tx.raw.time(tx.now), hold_id))
        tx.move(kind, tx.wallet_id("system:escrow"), self._return_to(tx, token_row),
                facts.remaining, account=facts.account, token_id=facts.token_id,
                hold_id=hold_id, reason=reason,
                data={"charged": facts.charged, "held": facts.held})

    def post(self, hold_id: str, amount: int, *, usage: ChargeRecord | dict | None = None,
             key: str | None = None, final: bool = True, cap: bool = False,
             job_id: str | None = None, node: str | None = None,
             restart: int | None = None) -> HoldView:
        """Charge ``amount`` (≤ what is still held) and, when ``final``, return the rest.

        Non-final posts let several nodes, array tasks or requeued runs each charge once
        under their own key; ``cap`` charges at most what is left instead of refusing, and
        what it could not charge is a journaled ``debt`` in the same transaction (never
        dropped silently: ``reports.alerts`` raises it once to the account)."""
        check_amount(amount, allow_zero=True, what="charge")
        fields = {"hold": hold_id, "amount": amount, "final": final, "cap": cap}

        def run(tx: Tx) -> dict:
            hold, facts, token_row = self._locked(tx, hold_id)
            left = facts.remaining
            charge = amount
            if amount > left:
                if not cap:
                    raise InvalidInput(f"charge {fmt_hours(amount)} GPU-h exceeds what hold "
                                       f"{hold_id} still holds ({fmt_hours(left)} GPU-h)")
                charge = left
            record = JSONText.of(_usage_row(usage, None if charge == amount else amount))
            tx.raw.insert(CH, dict(
                hold_id=hold_id, key=key or f"post:{hold_id}", amount=charge,
                job_id=job_id or hold.job_id, node=node, restart=restart, usage=record,
                created_at=tx.now))
            escrow, sink = tx.wallet_id("system:escrow"), tx.wallet_id("system:usage")
            tx.move("charge", escrow, sink, charge, account=facts.account,
                    token_id=facts.token_id, hold_id=hold_id,
                    data={"key": key or f"post:{hold_id}", "job_id": job_id or hold.job_id,
                          "node": node, "restart": restart,
                          "usage_sha256": usage_digest(record)})
            facts.add("charge", escrow, sink, charge, escrow)
            if charge < amount:  # ran beyond its hold: owed, journaled, alerted
                tx.event("debt", account=facts.account, token_id=facts.token_id,
                         hold_id=hold_id, data={
                             "job_id": job_id or hold.job_id, "owed": amount - charge,
                             "key": key or f"post:{hold_id}", "node": node,
                             "restart": restart, "reason": "ran beyond its hold"})
            after = SimpleNamespace(**{**hold._mapping, "amount": facts.held,
                                       "charged": facts.charged})
            if final:
                self._close(tx, hold_id, facts, token_row, "posted", "release", charged=charge)
                after.state, after.resolved_at = "posted", tx.now
            else:
                tx.raw.run("UPDATE holds SET charged = charged + ? WHERE id = ?",
                           (charge, hold_id))
            tx.flush()
            return hold_view(after).to_dict()

        return self._resolve_once("post", hold_id, key, fields, run)

    def void(self, hold_id: str, *, key: str | None = None, reason: str | None = None) -> HoldView:
        """Close a pending hold, returning everything not yet charged."""

        def run(tx: Tx) -> dict:
            hold, facts, token_row = self._locked(tx, hold_id)
            state = "posted" if facts.charged else "voided"
            self._close(tx, hold_id, facts, token_row, state, "void", reason)
            tx.flush()
            return hold_view(SimpleNamespace(**{
                **hold._mapping, "amount": facts.held, "charged": facts.charged,
                "state": state, "resolved_at": tx.now})).to_dict()

        return self._resolve_once("void", hold_id, key, {"hold": hold_id}, run)

    def _resolve_once(self, op: str, hold_id: str, key: str | None, fields: dict, run
                      ) -> HoldView:
        """Post/void under the caller's key, or ``<op>:<hold>`` so a plain replay is harmless."""
        try:
            return HoldView.from_dict(self._idempotent(op, key or f"{op}:{hold_id}", fields, run))
        except IdempotencyConflict:
            if key:
                raise
            raise StateError(f"hold {hold_id} was already {op}ed with other figures") from None

    def resize(self, hold_id: str, *, seconds: int | None = None, gpus: int | None = None,
               tasks: int | None = None, gpu_type: str | None | _Keep = KEEP,
               partition: str | None = None, account: str | None = None,
               key: str | None = None, gres: str | None = None,
               per_node: int | None = None) -> HoldView:
        """Re-price a pending hold for what the job now asks for (``scontrol update``).

        A new time limit, GPU count or task count keeps the hold's rate; a new GPU type
        (``None``: untyped, held at the highest rate) is priced at that type's rate. A new
        count of shares (``gres``/``per_node``: shard or mps) is priced at the shares per GPU
        of the candidate GPUs again (``ledger.shares``). The
        token's scopes are checked again against the job as changed (GPU type, every
        candidate partition, account), so an update cannot move a job where its token is
        not valid."""
        fields = {"hold": hold_id, "seconds": seconds, "gpus": gpus, "tasks": tasks,
                  **({} if gpu_type is KEEP else {"gpu_type": gpu_type}),
                  **({"partition": partition} if partition else {}),
                  **({"account": account} if account else {}),
                  **({"gres": gres, "per_node": per_node} if gres else {})}

        def run(tx: Tx) -> dict:
            hold, facts, token_row = self._locked(tx, hold_id)
            new_type = hold.gpu_type if gpu_type is KEEP else gpu_type
            new_gres = gres or hold.gres
            new_per = (per_node if gres else None) or (
                hold.per_node if new_gres == hold.gres and not gpus else None)
            req = HoldRequest(gpus=gpus or hold.gpus, seconds=seconds or hold.seconds,
                              tasks=tasks or hold.tasks, gpu_type=new_type,
                              partition=partition or hold.partition,
                              account=account or hold.account, user=hold.user,
                              cluster=hold.cluster, gres=new_gres, per_node=new_per,
                              qos=hold.qos)
            refusal = _scope_refusal(hold.token_id, token_row.account,
                                     Scopes.from_dict(token_row.scopes or {}), req, self.cluster)
            if refusal:
                raise refusal
            rate = hold.rate_ppm
            if gpu_type is not KEEP and new_type != hold.gpu_type:
                rate = self._rate(tx.conn, new_type)
                if rate is None:
                    raise unpriced(new_type, hold.token_id)
            share = hold.share
            if (req.gres, req.per_node, req.gpu_type) != (hold.gres, hold.per_node,
                                                          hold.gpu_type):
                share = self.hold_share(req)
            multiplier = hold.multiplier_ppm
            if req.partition != hold.partition:
                multiplier = self.tiers(tx.conn).hold_ppm(req.partitions, hold.qos)
            new_amount = hold_cost(req.gpus, req.seconds, req.tasks, rate, share, multiplier)
            if new_amount < facts.charged:
                raise InvalidInput(f"hold {hold_id} has already charged "
                                   f"{fmt_hours(facts.charged)} GPU-h")
            delta = new_amount - facts.held
            cols = {"gpus": req.gpus, "seconds": req.seconds, "tasks": req.tasks,
                    "gpu_type": req.gpu_type, "rate_ppm": rate, "partition": req.partition,
                    "gres": req.gres, "per_node": req.per_node, "share": share,
                    "multiplier_ppm": multiplier}  # the columns, and the journal's record
            self._rehold(tx, hold_id, facts, token_row, delta, {**fields, "cols": cols},
                         needs=f"needs {fmt_hours(delta)} GPU-h more ({req.describe()})")
            tx.conn.execute(update(HO).where(HO.c.id == hold_id).values(
                amount=HO.c.amount + delta, **cols))
            tx.flush()
            return hold_view(self._hold_row(tx.conn, hold_id)).to_dict()

        # Without a key a replay is still harmless: the figures are absolute, and a second
        # run re-prices the hold to what it already holds (a zero resize row).
        return HoldView.from_dict(self._idempotent("resize", key, fields, run,
                                                   replay_safe=True))

    def refund(self, hold_id: str, amount: int, reason: str, *, key: str | None = None,
               cap: bool = False, also: Callable[[Connection, int], None] | None = None
               ) -> HoldView:
        """Give back part of what a hold charged (an adjustment; always has a reason).

        With ``cap``, more than the hold has refundable refunds what it has (possibly
        nothing) instead of failing. ``also(conn, refunded)`` runs in the same transaction,
        so a caller's own record of the refund commits with it or not at all."""
        check_amount(amount, what="refund")
        if not (reason or "").strip():
            raise InvalidInput("a refund needs a reason")
        fields = {"hold": hold_id, "amount": amount, "reason": reason}
        if cap:  # keys of refunds from before the option keep their fingerprint
            fields["cap"] = True

        def run(tx: Tx) -> dict:
            hold, facts, token_row = self._locked(tx, hold_id, pending=False)
            refundable = facts.charged - facts.refunded
            given = min(amount, refundable) if cap else amount
            if given > refundable:
                raise InvalidInput(f"hold {hold_id} has {fmt_hours(refundable)} GPU-h "
                                   f"refundable, cannot refund {fmt_hours(amount)}")
            if given > 0:
                tx.conn.execute(update(HO).where(HO.c.id == hold_id).values(
                    refunded=HO.c.refunded + given))
                tx.move("refund", tx.wallet_id("system:usage"),
                        self._return_to(tx, token_row), given, account=facts.account,
                        token_id=facts.token_id, hold_id=hold_id, reason=reason)
            if also is not None:
                also(tx.conn, given)
            tx.flush()
            return hold_view(self._hold_row(tx.conn, hold_id)).to_dict()

        return HoldView.from_dict(self._idempotent("refund", key, fields, run))

    def bind(self, hold_id: str, job_id: str, *, user: str | None = None,
             account: str | None = None, qos: str | None = None,
             partition: str | None = None, cluster: str | None = None) -> HoldView:
        """Record the Slurm job id of a hold (PrologSlurmctld does this); the same id again is a
        no-op. ``user``/``account`` are the job's, as Slurm reports them: a hold binds only to
        a job of the user and account it was reserved for, only on the ``cluster`` it was
        reserved on, and only to one job.

        ``qos`` and ``partition`` are what Slurm runs the job in. job_submit cannot see an
        association's default QOS or the default partition, ``scontrol update`` may change
        either while the job waits, and ``-p a,b`` was held at the dearest candidate: a
        pending hold is re-priced to the QOS and — unless it pays for several array tasks,
        which may run in other partitions — to the one partition (see :meth:`_requalify`);
        a token that cannot pay the difference refuses the bind."""
        def run(tx: Tx) -> dict:
            hold = self._hold_row(tx.conn, hold_id, lock=True)
            if hold.job_id not in (None, job_id):
                raise StateError(f"hold {hold_id} belongs to job {hold.job_id}, not {job_id}")
            check_job_owner(hold, job_id, user, account)
            check_job_cluster(hold, job_id, cluster)
            data: dict = {}
            if hold.job_id is None:
                tx.conn.execute(update(HO).where(HO.c.id == hold_id).values(job_id=job_id))
                data["job_id"] = job_id
            requalify = None
            if hold.state == "pending":
                new_qos = qos or hold.qos
                new_part = partition if (partition and hold.tasks == 1
                                         and "," not in partition) else hold.partition
                if (new_qos or "") != (hold.qos or "") or new_part != hold.partition:
                    parts = [p for p in (new_part or "").split(",") if p]
                    multiplier = self.tiers(tx.conn).hold_ppm(parts, new_qos)
                    if multiplier == hold.multiplier_ppm:  # the same price: say where it runs
                        data["cols"] = {"qos": new_qos, "partition": new_part}
                        tx.conn.execute(update(HO).where(HO.c.id == hold_id).values(
                            **data["cols"]))
                    else:
                        requalify = (new_qos, new_part, multiplier)
            if data:
                tx.event("bind", account=hold.account, token_id=hold.token_id, hold_id=hold_id,
                         data=data)
            if requalify is not None:
                self._requalify(tx, hold_id, *requalify)
            return hold_view(self._hold_row(tx.conn, hold_id)).to_dict()

        # A replay finds the job bound and the hold priced for it: it changes nothing.
        return HoldView.from_dict(self._write(run, replay_safe=True))

    def _rehold(self, tx: Tx, hold_id: str, facts: HoldFacts, token_row, delta: int,
                data: dict, needs: str) -> None:
        """A pending hold's escrow changes by ``delta``: taken from its live token (a
        Refusal — ``needs``, and what the token has — when it cannot pay) or returned to
        where its remainder goes; one journaled ``resize`` either way."""
        escrow = tx.wallet_id("system:escrow")
        refs = dict(account=facts.account, token_id=facts.token_id, hold_id=hold_id, data=data)
        if delta > 0:
            refuse_unless_live(token_row, tx.now)
            available = self._balance(tx.conn, token_row.wallet_id)
            if delta > available:
                raise Refusal(Reason.INSUFFICIENT, f"{needs}, token {facts.token_id} has "
                              f"{fmt_hours(available)} GPU-h left", token_id=facts.token_id,
                              needed=delta, available=available)
            tx.move("resize", token_row.wallet_id, escrow, delta, **refs)
        elif delta < 0:
            tx.move("resize", escrow, self._return_to(tx, token_row), -delta, **refs)
        else:
            tx.event("resize", **refs)

    def _requalify(self, tx: Tx, hold_id: str, qos: str | None, partition: str | None,
                   multiplier: int) -> None:
        """Re-price a pending hold for the QOS and partition its job runs in: the same
        request at that ``multiplier`` (time of use as before). The difference is escrowed
        from the token (refused when it cannot pay) or returned to it; never below what the
        hold has charged already."""
        hold, facts, token_row = self._locked(tx, hold_id)
        cols = {"qos": qos, "partition": partition, "multiplier_ppm": multiplier}
        data = {**cols, "was_qos": hold.qos, "was_partition": hold.partition,
                "was_multiplier_ppm": hold.multiplier_ppm, "cols": cols}
        amount = hold_cost(hold.gpus, hold.seconds, hold.tasks, hold.rate_ppm,
                           hold.share or 1, multiplier)
        delta = max(amount, facts.charged) - facts.held
        where = ", ".join(w for w in (
            f"partition {partition}" if partition != hold.partition else "",
            f"QOS {qos}" if (qos or "") != (hold.qos or "") else "") if w)
        self._rehold(tx, hold_id, facts, token_row, delta, data,
                     needs=f"the job runs in {where} ({fmt_rate(multiplier)}x): needs "
                           f"{fmt_hours(delta)} GPU-h more")
        tx.conn.execute(update(HO).where(HO.c.id == hold_id).values(
            amount=HO.c.amount + delta, **cols))
        tx.flush()

    # -- reading --------------------------------------------------------------------------------

    def hold(self, hold_id: str) -> HoldView:
        with self._read() as conn:
            return hold_view(self._hold_row(conn, hold_id))

    def holds(self, *, state: str | None = None, token_id: str | None = None,
              job_id: str | None = None, user: str | None = None,
              since: datetime | None = None, cluster: str | None = None) -> list[HoldView]:
        """Holds, oldest first; ``cluster``: those reserved on it or on no named cluster
        (job ids of several clusters overlap: a job id is looked up with its cluster)."""
        q = select(HO).order_by(HO.c.created_at, HO.c.id)
        if cluster:
            q = q.where(or_(HO.c.cluster == cluster, HO.c.cluster.is_(None)))
        if state:
            q = q.where(HO.c.state == state)
        if token_id:
            q = q.where(HO.c.token_id == token_id)
        if job_id:
            q = q.where(HO.c.job_id == job_id)
        if user:
            q = q.where(HO.c.user == user)
        if since:
            q = q.where(HO.c.created_at >= since)
        with self._read() as conn:
            return [hold_view(r) for r in conn.execute(q).all()]

    def charges(self, hold_id: str) -> list[dict]:
        with self._read() as conn:
            rows = conn.execute(select(CH).where(CH.c.hold_id == hold_id).order_by(CH.c.id)).all()
        return [{"key": r.key, "amount": r.amount, "job_id": r.job_id, "node": r.node,
                 "restart": r.restart, "usage": r.usage, "created": iso(r.created_at)}
                for r in rows]


def _usage_row(usage: ChargeRecord | dict | None, uncapped: int | None) -> dict:
    """What ``charges.usage`` stores: the charge record (``ledger.charge_record``)."""
    if isinstance(usage, ChargeRecord):
        return (usage.capped(uncapped) if uncapped is not None else usage).to_dict()
    record = dict(usage or {})
    if uncapped is not None:
        record["uncapped_amount"] = uncapped
    return record


