"""Two-phase holds: reserve (pending) → post (charge ≤ held, rest returned) or void.

After TigerBeetle's pending transfers: a reservation moves the job's maximum
cost from the token into ``system:escrow``; charges move from escrow to
``system:usage`` (one per node / array task / run, each under its own key);
closing the hold returns what is left to the token — or to the account pool
if the token was revoked meanwhile, or to ``system:expired`` if it expired.
"""

from __future__ import annotations

import secrets
from types import SimpleNamespace
from datetime import UTC, datetime

from sqlalchemy import Connection, bindparam, func, insert, select, update

from .amounts import check_amount, cost, fmt_hours
from .errors import IdempotencyConflict, InvalidInput, NotFound, Reason, Refusal, StateError
from .journal import FOR_UPDATE, Tx, raw_sql  # noqa: F401
from .models import Charge, Hold, Rate
from .service import DEFAULT_RATE, check_account_name
from .tokens import Claims, digest
from .views import HoldRequest, HoldView

HO, CH, R = Hold.__table__, Charge.__table__, Rate.__table__

# Hot-path statements, built once (see ledger.service): reserve, post and void run these.
_HOLD_PUT = insert(HO)
_HOLD_GET = select(HO).where(HO.c.id == bindparam("hid"))
_HOLD_GET_LOCKED = _HOLD_GET.with_for_update()
_HOLD_ADD_CHARGE = update(HO).where(HO.c.id == bindparam("hid")).values(
    charged=HO.c.charged + bindparam("add"))
_HOLD_CLOSE = update(HO).where(HO.c.id == bindparam("hid")).values(
    state=bindparam("new_state"), resolved_at=bindparam("at"))
_CHARGE_PUT = insert(CH)


def new_hold_id() -> str:
    return "hold_" + secrets.token_hex(10)


def hold_view(row) -> HoldView:
    return HoldView(
        id=row.id, token_id=row.token_id, account=row.account, user=row.user,
        gpu_type=row.gpu_type, gpus=row.gpus, seconds=row.seconds, tasks=row.tasks,
        rate_ppm=row.rate_ppm, amount=row.amount, charged=row.charged, refunded=row.refunded,
        state=row.state, job_id=row.job_id, created=row.created_at, resolved=row.resolved_at,
        partition=row.partition, cluster=row.cluster,
    )


def _scope_refusal(claims: Claims, req: HoldRequest, cluster: str | None) -> Refusal | None:
    """The first scope the request falls outside of, as a refusal."""
    s = claims.scopes
    checks = (
        (req.account is not None and req.account != claims.account, Reason.WRONG_ACCOUNT,
         f"token {claims.id} belongs to account {claims.account}, not {req.account}"),
        (bool(s.users) and req.user not in s.users, Reason.WRONG_USER,
         f"token {claims.id} is not valid for user {req.user} (only {', '.join(s.users)})"),
        (bool(s.gpu_types) and req.gpu_type not in s.gpu_types, Reason.WRONG_GPU_TYPE,
         f"token {claims.id} is not valid for GPU type {req.gpu_type or 'any'} "
         f"(only {', '.join(s.gpu_types)})"),
        (bool(s.partitions) and req.partition not in s.partitions, Reason.WRONG_PARTITION,
         f"token {claims.id} is not valid in partition {req.partition} "
         f"(only {', '.join(s.partitions)})"),
        (bool(s.clusters) and (req.cluster or cluster) not in s.clusters, Reason.WRONG_CLUSTER,
         f"token {claims.id} is not valid on cluster {req.cluster or cluster} "
         f"(only {', '.join(s.clusters)})"),
    )
    for failed, reason, message in checks:
        if failed:
            return Refusal(reason, message, token_id=claims.id)
    return None


class HoldOps:
    """Mixin over LedgerBase and TokenOps: reserve, post, void, resize, refund, bind."""

    # -- pricing --------------------------------------------------------------------------------

    def _rate(self, conn: Connection, gpu_type: str | None) -> int | None:
        """The rate a hold is priced at: the type's own, else ``default``. A request that
        names no GPU type may land on any type, so it is held at the highest rate there is
        (the settlement charges the allocated type's rate and returns the rest)."""
        if gpu_type is None:
            return conn.execute(select(func.max(R.c.rate_ppm))).scalar()
        rates = dict(conn.execute(select(R.c.gpu_type, R.c.rate_ppm).where(
            R.c.gpu_type.in_([gpu_type or DEFAULT_RATE, DEFAULT_RATE]))).all())
        return rates.get(gpu_type or DEFAULT_RATE) or rates.get(DEFAULT_RATE)

    def price(self, request: HoldRequest) -> tuple[int, int]:
        """(amount, rate_ppm) a request would hold; Refusal for an unpriced GPU type."""
        with self._read() as conn:
            rate = self._rate(conn, request.gpu_type)
        if rate is None:
            raise Refusal(Reason.UNKNOWN_GPU_TYPE,
                          f"no rate for GPU type {request.gpu_type} and no default rate")
        return request.tasks * cost(request.gpus * request.seconds, rate), rate

    # -- checks ---------------------------------------------------------------------------------

    def check(self, token: str, request: HoldRequest) -> Claims:
        """Everything that can be decided from the token alone (signature, validity, scopes)."""
        claims = self.verifier().verify(token)
        now = self.clock()
        if now < claims.not_before:
            raise Refusal(Reason.NOT_YET_VALID, f"token {claims.id} is not valid before "
                          f"{claims.not_before.isoformat()}", token_id=claims.id)
        if now >= claims.expires:
            raise Refusal(Reason.EXPIRED, f"token {claims.id} expired on "
                          f"{claims.expires.date().isoformat()}", token_id=claims.id)
        refusal = _scope_refusal(claims, request, self.cluster)
        if refusal:
            raise refusal
        return claims

    # -- reserve --------------------------------------------------------------------------------

    def reserve(self, token: str, request: HoldRequest, key: str | None = None,
                *, job_id: str | None = None) -> HoldView:
        """Hold the request's maximum cost, or raise a Refusal saying why not (with numbers)."""
        claims = self.check(token, request)
        if request.account is not None:
            check_account_name(request.account)
        fields = {"token": claims.id, "request": request.to_dict(), "job_id": job_id}

        def run(tx: Tx) -> dict:
            fast = _fast_reserve_row(tx, claims.id, request.gpu_type, digest(token.strip()))
            if fast is not None:
                account, wallet_id, rate, available = fast
                amount = request.tasks * cost(request.gpus * request.seconds, rate)
                if amount <= available:
                    return self._reserve_insert(tx, claims, request, job_id, account, wallet_id,
                                                rate, amount)
            return self._reserve_checked(tx, claims, token, request, job_id)

        return HoldView.from_dict(self._idempotent("reserve", key, fields, run))

    def _reserve_checked(self, tx: Tx, claims: Claims, token: str, request: HoldRequest,
                         job_id: str | None) -> dict:
        """The full checks, each with its own refusal (the fast path declined)."""
        try:
            row = self._token_row(tx.conn, claims.id, lock=True)
        except NotFound:
            raise Refusal(Reason.UNKNOWN_TOKEN,
                          f"token {claims.id} is signed but unknown to this ledger",
                          token_id=claims.id) from None
        if row.digest != digest(token.strip()):
            raise Refusal(Reason.BAD_SIGNATURE,
                          f"token {claims.id} does not match the ledger's record of it",
                          token_id=claims.id)
        if row.status == "revoked":
            raise Refusal(Reason.REVOKED, f"token {claims.id} was revoked: "
                          f"{row.status_reason}", token_id=claims.id)
        if row.status == "expired" or row.expires <= tx.now:
            raise Refusal(Reason.EXPIRED, f"token {claims.id} expired on "
                          f"{row.expires.date().isoformat()}", token_id=claims.id)
        rate = self._rate(tx.conn, request.gpu_type)
        if rate is None:
            raise Refusal(Reason.UNKNOWN_GPU_TYPE,
                          f"no rate for GPU type {request.gpu_type} and no default rate",
                          token_id=claims.id)
        amount = request.tasks * cost(request.gpus * request.seconds, rate)
        available = row.balance
        if amount > available:
            held = self._held(tx.conn, claims.id)
            reason = Reason.EXHAUSTED if available == 0 and held == 0 else \
                Reason.INSUFFICIENT
            tail = "is exhausted" if reason is Reason.EXHAUSTED else \
                f"has {fmt_hours(available)} GPU-h left"
            raise Refusal(reason, f"needs {fmt_hours(amount)} GPU-h ({request.describe()}), "
                          f"token {claims.id} {tail}", token_id=claims.id, needed=amount,
                          available=available)
        return self._reserve_insert(tx, claims, request, job_id, row.account, row.wallet_id,
                                    rate, amount)

    def _reserve_insert(self, tx: Tx, claims: Claims, request: HoldRequest, job_id, account: str,
                        wallet_id: int, rate: int, amount: int) -> dict:
        hold_id = new_hold_id()
        tx.conn.execute(_HOLD_PUT, dict(
            id=hold_id, token_id=claims.id, account=account, user=request.user,
            partition=request.partition, cluster=request.cluster or self.cluster,
            gpu_type=request.gpu_type, gpus=request.gpus, seconds=request.seconds,
            tasks=request.tasks, rate_ppm=rate, amount=amount, charged=0, refunded=0,
            state="pending", job_id=job_id, created_at=tx.now, request=request.to_dict(),
        ))
        tx.move("reserve", wallet_id, tx.wallet_id("system:escrow"), amount,
                account=account, token_id=claims.id, hold_id=hold_id,
                data={"request": request.to_dict(), "rate_ppm": rate, "job_id": job_id})
        tx.flush()
        return HoldView(
            id=hold_id, token_id=claims.id, account=account, user=request.user,
            gpu_type=request.gpu_type, gpus=request.gpus, seconds=request.seconds,
            tasks=request.tasks, rate_ppm=rate, amount=amount, charged=0, refunded=0,
            state="pending", job_id=job_id, created=tx.now, resolved=None,
            partition=request.partition, cluster=request.cluster or self.cluster,
        ).to_dict()

    # -- settle ---------------------------------------------------------------------------------

    def _hold_row(self, conn: Connection, hold_id: str, lock: bool = False):
        row = conn.execute(_HOLD_GET_LOCKED if lock else _HOLD_GET, {"hid": hold_id}).one_or_none()
        if row is None:
            raise NotFound(f"unknown hold {hold_id}")
        return row

    def _return_to(self, tx: Tx, token_row) -> int:
        """Where a hold's unused remainder goes: token, account pool, or system:expired."""
        if token_row.status == "revoked":
            return token_row.pool_wallet_id
        if token_row.status == "expired" or token_row.expires <= tx.now:
            return tx.wallet_id("system:expired")
        return token_row.wallet_id

    def _close(self, tx: Tx, hold, token_row, state: str, kind: str, reason: str | None = None):
        remainder = hold.amount - hold.charged
        tx.conn.execute(_HOLD_CLOSE, {"hid": hold.id, "new_state": state, "at": tx.now})
        tx.move(kind, tx.wallet_id("system:escrow"), self._return_to(tx, token_row), remainder,
                account=hold.account, token_id=hold.token_id, hold_id=hold.id, reason=reason,
                data={"charged": hold.charged, "held": hold.amount})

    def post(self, hold_id: str, amount: int, *, usage: dict | None = None,
             key: str | None = None, final: bool = True, cap: bool = False,
             job_id: str | None = None, node: str | None = None,
             restart: int | None = None) -> HoldView:
        """Charge ``amount`` (≤ what is still held) and, when ``final``, return the rest.

        Non-final posts let several nodes, array tasks or requeued runs each charge once
        under their own key; ``cap`` charges at most what is left instead of refusing.
        """
        check_amount(amount, allow_zero=True, what="charge")
        fields = {"hold": hold_id, "amount": amount, "final": final, "cap": cap}

        def run(tx: Tx) -> dict:
            hold = self._hold_row(tx.conn, hold_id, lock=True)
            if hold.state != "pending":
                raise StateError(f"hold {hold_id} is already {hold.state}")
            token_row = self._token_row(tx.conn, hold.token_id, lock=True)
            left = hold.amount - hold.charged
            charge = amount
            if amount > left:
                if not cap:
                    raise InvalidInput(f"charge {fmt_hours(amount)} GPU-h exceeds what hold "
                                       f"{hold_id} still holds ({fmt_hours(left)} GPU-h)")
                charge = left
            record = dict(usage or {})
            if charge != amount:
                record["uncapped_amount"] = amount
            tx.conn.execute(_CHARGE_PUT, dict(
                hold_id=hold_id, key=key or f"post:{hold_id}", amount=charge,
                job_id=job_id or hold.job_id, node=node, restart=restart, usage=record,
                created_at=tx.now))
            tx.conn.execute(_HOLD_ADD_CHARGE, {"hid": hold_id, "add": charge})
            tx.move("charge", tx.wallet_id("system:escrow"), tx.wallet_id("system:usage"),
                    charge, account=hold.account, token_id=hold.token_id, hold_id=hold_id,
                    data={"key": key or f"post:{hold_id}", "job_id": job_id or hold.job_id, "node": node,
                          "restart": restart})
            after = SimpleNamespace(**{**hold._mapping, "charged": hold.charged + charge})
            if final:
                self._close(tx, after, token_row, "posted", "release")
                after.state, after.resolved_at = "posted", tx.now
            tx.flush()
            return hold_view(after).to_dict()

        return self._resolve_once("post", hold_id, key, fields, run)

    def void(self, hold_id: str, *, key: str | None = None, reason: str | None = None) -> HoldView:
        """Close a pending hold, returning everything not yet charged."""

        def run(tx: Tx) -> dict:
            hold = self._hold_row(tx.conn, hold_id, lock=True)
            if hold.state != "pending":
                raise StateError(f"hold {hold_id} is already {hold.state}")
            token_row = self._token_row(tx.conn, hold.token_id, lock=True)
            state = "posted" if hold.charged else "voided"
            self._close(tx, hold, token_row, state, "void", reason)
            tx.flush()
            return hold_view(self._hold_row(tx.conn, hold_id)).to_dict()

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
               tasks: int | None = None, key: str | None = None) -> HoldView:
        """Re-price a pending hold for a new time limit / GPU count (at the hold's own rate)."""
        fields = {"hold": hold_id, "seconds": seconds, "gpus": gpus, "tasks": tasks}

        def run(tx: Tx) -> dict:
            hold = self._hold_row(tx.conn, hold_id, lock=True)
            if hold.state != "pending":
                raise StateError(f"hold {hold_id} is already {hold.state}")
            token_row = self._token_row(tx.conn, hold.token_id, lock=True)
            req = HoldRequest(gpus=gpus or hold.gpus, seconds=seconds or hold.seconds,
                              tasks=tasks or hold.tasks, gpu_type=hold.gpu_type)
            new_amount = req.tasks * cost(req.gpus * req.seconds, hold.rate_ppm)
            if new_amount < hold.charged:
                raise InvalidInput(f"hold {hold_id} has already charged "
                                   f"{fmt_hours(hold.charged)} GPU-h")
            delta = new_amount - hold.amount
            escrow = tx.wallet_id("system:escrow")
            if delta > 0:
                if token_row.status == "revoked":
                    raise Refusal(Reason.REVOKED, f"token {hold.token_id} was revoked: "
                                  f"{token_row.status_reason}", token_id=hold.token_id)
                if token_row.status == "expired" or token_row.expires <= tx.now:
                    raise Refusal(Reason.EXPIRED, f"token {hold.token_id} expired on "
                                  f"{token_row.expires.date().isoformat()}",
                                  token_id=hold.token_id)
                available = self._balance(tx.conn, token_row.wallet_id)
                if delta > available:
                    raise Refusal(Reason.INSUFFICIENT,
                                  f"needs {fmt_hours(delta)} GPU-h more ({req.describe()}), "
                                  f"token {hold.token_id} has {fmt_hours(available)} GPU-h left",
                                  token_id=hold.token_id, needed=delta, available=available)
                tx.move("resize", token_row.wallet_id, escrow, delta, account=hold.account,
                        token_id=hold.token_id, hold_id=hold_id, data=fields)
            elif delta < 0:
                tx.move("resize", escrow, self._return_to(tx, token_row), -delta,
                        account=hold.account, token_id=hold.token_id, hold_id=hold_id,
                        data=fields)
            else:
                tx.event("resize", account=hold.account, token_id=hold.token_id,
                         hold_id=hold_id, data=fields)
            tx.conn.execute(update(HO).where(HO.c.id == hold_id).values(
                amount=new_amount, gpus=req.gpus, seconds=req.seconds, tasks=req.tasks))
            tx.flush()
            return hold_view(self._hold_row(tx.conn, hold_id)).to_dict()

        return HoldView.from_dict(self._idempotent("resize", key, fields, run))

    def refund(self, hold_id: str, amount: int, reason: str, *, key: str | None = None
               ) -> HoldView:
        """Give back part of what a hold charged (an adjustment; always has a reason)."""
        check_amount(amount, what="refund")
        if not (reason or "").strip():
            raise InvalidInput("a refund needs a reason")
        fields = {"hold": hold_id, "amount": amount, "reason": reason}

        def run(tx: Tx) -> dict:
            hold = self._hold_row(tx.conn, hold_id, lock=True)
            token_row = self._token_row(tx.conn, hold.token_id, lock=True)
            refundable = hold.charged - hold.refunded
            if amount > refundable:
                raise InvalidInput(f"hold {hold_id} has {fmt_hours(refundable)} GPU-h "
                                   f"refundable, cannot refund {fmt_hours(amount)}")
            tx.conn.execute(update(HO).where(HO.c.id == hold_id).values(
                refunded=HO.c.refunded + amount))
            tx.move("refund", tx.wallet_id("system:usage"), self._return_to(tx, token_row),
                    amount, account=hold.account, token_id=hold.token_id, hold_id=hold_id,
                    reason=reason)
            tx.flush()
            return hold_view(self._hold_row(tx.conn, hold_id)).to_dict()

        return HoldView.from_dict(self._idempotent("refund", key, fields, run))

    def bind(self, hold_id: str, job_id: str, *, user: str | None = None,
             account: str | None = None) -> HoldView:
        """Record the Slurm job id of a hold (PrologSlurmctld does this); the same id again is a
        no-op. ``user``/``account`` are the job's, as Slurm reports them: a hold binds only to
        a job of the user and account it was reserved for, and only to one job."""
        def run(tx: Tx) -> dict:
            hold = self._hold_row(tx.conn, hold_id, lock=True)
            if hold.job_id not in (None, job_id):
                raise StateError(f"hold {hold_id} belongs to job {hold.job_id}, not {job_id}")
            if user is not None and hold.user is not None and hold.user != user:
                raise StateError(f"hold {hold_id} was reserved for user {hold.user}, "
                                 f"not {user} (job {job_id})")
            if account is not None and hold.account != account:
                raise StateError(f"hold {hold_id} was reserved for account {hold.account}, "
                                 f"not {account} (job {job_id})")
            if hold.job_id is None:
                tx.conn.execute(update(HO).where(HO.c.id == hold_id).values(job_id=job_id))
                tx.event("bind", account=hold.account, token_id=hold.token_id, hold_id=hold_id,
                         data={"job_id": job_id})
                tx.flush()
            return hold_view(self._hold_row(tx.conn, hold_id)).to_dict()

        return HoldView.from_dict(self._write(run))

    # -- reading --------------------------------------------------------------------------------

    def hold(self, hold_id: str) -> HoldView:
        with self._read() as conn:
            return hold_view(self._hold_row(conn, hold_id))

    def holds(self, *, state: str | None = None, token_id: str | None = None,
              job_id: str | None = None, user: str | None = None,
              since: datetime | None = None) -> list[HoldView]:
        q = select(HO).order_by(HO.c.created_at, HO.c.id)
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
                 "restart": r.restart, "usage": r.usage, "created": r.created_at.isoformat()}
                for r in rows]


def _fast_reserve_row(tx: Tx, token_id: str, gpu_type: str | None, token_digest: str):
    """One locked read for the common case: (account, wallet id, rate, balance) of an active,
    unexpired token whose stored digest matches and whose GPU type has a rate; else None."""
    conn = tx.conn
    name = conn.dialect.name
    now = tx.now.astimezone(UTC).replace(tzinfo=None)
    lock = " FOR UPDATE OF t" if name == "postgresql" else " FOR UPDATE"
    # the rate rule of LedgerBase._rate, in SQL: untyped requests pay the highest rate
    typed = "(SELECT rate_ppm FROM rates WHERE gpu_type = ?), " if gpu_type else \
        "(SELECT MAX(rate_ppm) FROM rates), "
    sql = raw_sql(conn)(
        "SELECT a.name, t.wallet_id, w.balance, t.digest, " + typed +
        "(SELECT rate_ppm FROM rates WHERE gpu_type = 'default') "
        "FROM tokens t JOIN accounts a ON a.id = t.account_id "
        "JOIN wallets w ON w.id = t.wallet_id "
        "WHERE t.id = ? AND t.status = 'active' AND t.expires > ?" + lock)
    when = now.strftime("%Y-%m-%d %H:%M:%S.%f") if name == "sqlite" else now
    cur = conn.connection.driver_connection.cursor()
    try:
        cur.execute(sql, ((gpu_type,) if gpu_type else ()) + (token_id, when))
        row = cur.fetchone()
    finally:
        cur.close()
    if row is None or row[3] != token_digest:
        return None
    rate = row[4] or row[5]
    if rate is None:
        return None
    return row[0], row[1], rate, row[2]
