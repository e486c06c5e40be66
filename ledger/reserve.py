"""Reserve: a job's maximum cost moved from its token into ``system:escrow``, or a refusal
that says why not, with numbers.

The checks that need only the token (signature, validity, scopes) come first and touch no
database; then one of two ways decides, under the token's row lock: the common case in
two statements (:func:`_fast_reserve_row`), else the full checks, each with its own
refusal. :meth:`ReserveOps.reserve_many` writes several reserves in one transaction — the
daemon's holds answered from memory (``ledger.daemon.fastpath``). Settling a hold is
``ledger.holds``.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import Connection

from .advice import partition_hint, shortfall
from .amounts import PPM, fmt_hours
from .errors import LedgerError, NotFound, Reason, Refusal
from .facts import DATA_VERSION
from .journal import Tx
from .liveness import Liveness, liveness, refusal, refuse_unless_live
from .models import Hold
from .names import check_account_name
from .pricing import RateCandidates, hold_cost, hold_rate, is_untyped, rate_candidates, unpriced
from .rawsql import FOR_UPDATE, load_time
from .shares import GPU
from .tiers import Tiers
from .tokens import Claims, Scopes, digest
from .views import HoldRequest, HoldView

HO = Hold.__table__


def new_hold_id() -> str:
    return "hold_" + secrets.token_hex(10)


def hold_key(hold_id: str) -> str:
    """The idempotency key of a reserve that names its hold id and has no key of its own
    (the daemon's answered holds): the id is new, so is the key."""
    return f"hold:{hold_id}"


@dataclass(frozen=True)
class ReserveItem:
    """One reserve of :meth:`ReserveOps.reserve_many`."""

    hold_id: str
    token: str
    request: HoldRequest
    key: str | None = None
    job_id: str | None = None



def _scope_refusal(token_id: str, account: str, s: Scopes, req: HoldRequest,
                   cluster: str | None) -> Refusal | None:
    """The first scope the request falls outside of, as a refusal.

    A job that lists several partitions (``-p a,b``) may start in any of them, so every
    candidate must be inside the token's partitions."""
    outside = [p for p in req.partitions if p not in s.partitions] or \
        ([] if req.partitions else ["(none given)"])
    checks = (
        (req.account is not None and req.account != account, Reason.WRONG_ACCOUNT,
         f"token {token_id} belongs to account {account}, not {req.account}"),
        (bool(s.users) and req.user not in s.users, Reason.WRONG_USER,
         f"token {token_id} is not valid for user {req.user} (only {', '.join(s.users)})"),
        (bool(s.gpu_types) and req.gpu_type not in s.gpu_types, Reason.WRONG_GPU_TYPE,
         f"token {token_id} is not valid for GPU type {req.gpu_type or 'any'} "
         f"(only {', '.join(s.gpu_types)})"),
        (bool(s.partitions) and bool(outside), Reason.WRONG_PARTITION,
         (f"token {token_id} is not valid in partition {', '.join(outside)}"
          if req.partitions else f"token {token_id} is not valid without a partition")
         + f" (only {', '.join(s.partitions)}): {partition_hint(s.partitions)}"),
        (bool(s.clusters) and (req.cluster or cluster) not in s.clusters, Reason.WRONG_CLUSTER,
         f"token {token_id} is not valid on cluster {req.cluster or cluster} "
         f"(only {', '.join(s.clusters)})"),
    )
    for failed, reason, message in checks:
        if failed:
            return Refusal(reason, message, token_id=token_id)
    return None



class ReserveOps:
    """Mixin over LedgerBase and TokenOps: pricing, the token checks and reserve."""

    # -- pricing --------------------------------------------------------------------------------

    def _rate(self, conn: Connection, gpu_type: str | None) -> int | None:
        """The rate a hold is priced at (``ledger.pricing.hold_rate``), from the rates table."""
        return hold_rate(gpu_type, rate_candidates(conn, gpu_type))

    def hold_share(self, request: HoldRequest) -> int:
        """Shares per GPU the request is held at (``ledger.shares``; 1 for whole GPUs):
        decided from gres.conf in memory, no database round trip."""
        if request.gres == GPU:
            return 1
        return self.gres.inventory().hold_share(request.gres, request.gpu_type,
                                                request.per_node or request.gpus)

    def price(self, request: HoldRequest) -> tuple[int, int]:
        """(amount, rate_ppm) a request would hold; Refusal for an unpriced GPU type."""
        return self.price_share(request)[:2]

    def price_share(self, request: HoldRequest) -> tuple[int, int, int]:
        """(amount, rate_ppm, share) a request would hold."""
        amount, rate, share, _ = self.price_tiered(request)
        return amount, rate, share

    def price_tiered(self, request: HoldRequest) -> tuple[int, int, int, int]:
        """(amount, rate_ppm, share, multiplier_ppm) a request would hold."""
        share = self.hold_share(request)
        with self._read() as conn:
            rate = self._rate(conn, request.gpu_type)
            multiplier = self.tiers(conn).hold_ppm(request.partitions, request.qos)
        if rate is None:
            raise unpriced(request.gpu_type)
        return (hold_cost(request.gpus, request.seconds, request.tasks, rate, share, multiplier),
                rate, share, multiplier)

    # -- checks ---------------------------------------------------------------------------------

    def check(self, token: str, request: HoldRequest) -> Claims:
        """Everything that can be decided from the token alone (signature, validity, scopes)."""
        claims = self.verifier().verify(token)
        found = refusal(liveness("active", claims.not_before, claims.expires, self.clock()),
                        claims.id, expires=claims.expires, not_before=claims.not_before)
        if found:
            raise found
        found = _scope_refusal(claims.id, claims.account, claims.scopes, request, self.cluster)
        if found:
            raise found
        return claims

    # -- reserve --------------------------------------------------------------------------------

    def reserve(self, token: str, request: HoldRequest, key: str | None = None,
                *, job_id: str | None = None, hold_id: str | None = None) -> HoldView:
        """Hold the request's maximum cost, or raise a Refusal saying why not (with numbers).
        ``hold_id``: the id to give the hold (one the daemon already answered), else a new
        one. Without ``key`` a connection lost during COMMIT is an :class:`OutcomeUnknown`
        (the hold may exist); with one, the reserve runs again and finds its result."""
        claims, fields, run = self._reserve_fn(token, request, job_id, hold_id)
        if key is None and hold_id is not None:
            key = hold_key(hold_id)
        return HoldView.from_dict(self._idempotent("reserve", key, fields, run))

    def _reserve_fn(self, token: str, request: HoldRequest, job_id: str | None,
                    hold_id: str | None):
        """(claims, idempotency fields, the transaction body) of one reserve. Everything
        that can refuse it does so before the body writes anything."""
        claims = self.check(token, request)
        if request.account is not None:
            check_account_name(request.account)
        fields = {"token": claims.id, "request": request.to_dict(), "job_id": job_id}
        share = self.hold_share(request)

        def run(tx: Tx) -> dict:
            fast = _fast_reserve_row(tx, claims.id, request, digest(token.strip()))
            if fast is not None:
                account, wallet_id, rate, available, multiplier = fast
                amount = hold_cost(request.gpus, request.seconds, request.tasks, rate, share,
                                   multiplier)
                if amount <= available:
                    return self._reserve_insert(tx, claims, request, job_id, account, wallet_id,
                                                rate, amount, share, multiplier, hold_id)
            return self._reserve_checked(tx, claims, token, request, job_id, share, hold_id)

        return claims, fields, run

    def reserve_many(self, items: Sequence[ReserveItem]) -> list[HoldView | LedgerError]:
        """Several reserves in one transaction — the daemon writes the holds it answered
        from memory this way (``ledger.daemon.fastpath``) — each as :meth:`reserve` with
        its own hold id and key. An item that cannot be reserved now (its token spent,
        revoked or expired since the answer) gets its error in the list and the others go
        in: every check that refuses an item does so before it writes anything. Each item
        is stored under its key, or its hold id's (:func:`hold_key`), so the batch may run
        again after a COMMIT whose outcome is unknown."""
        def run(tx: Tx) -> list:
            out: list = []
            for item in items:
                try:
                    _claims, fields, body = self._reserve_fn(item.token, item.request,
                                                             item.job_id, item.hold_id)
                    result = self._once(tx, "reserve", item.key or hold_key(item.hold_id),
                                        fields, body)
                    out.append(HoldView.from_dict(result))
                except LedgerError as exc:
                    out.append(exc)
            return out

        return self._write(run, replay_safe=True)

    def _reserve_checked(self, tx: Tx, claims: Claims, token: str, request: HoldRequest,
                         job_id: str | None, share: int, hold_id: str | None = None) -> dict:
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
        refuse_unless_live(row, tx.now)
        rate = self._rate(tx.conn, request.gpu_type)
        if rate is None:
            raise unpriced(request.gpu_type, claims.id)
        tiers = self.tiers(tx.conn)
        multiplier = tiers.hold_ppm(request.partitions, request.qos)
        amount = hold_cost(request.gpus, request.seconds, request.tasks, rate, share, multiplier)
        available = row.balance
        if amount > available:
            raise short_refusal(claims, request, amount, available,
                                self._held(tx.conn, claims.id), rate, share, multiplier, tiers)
        return self._reserve_insert(tx, claims, request, job_id, row.account, row.wallet_id,
                                    rate, amount, share, multiplier, hold_id)

    def covers(self, token: str, request: HoldRequest):
        """Whether ``token`` would pay for ``request`` now: (view, None) or (view, the
        Refusal a reserve would raise: revoked with its reason, short by how much and what
        would fit). Signature, validity and scope refusals are raised (``check``)."""
        claims = self.check(token, request)
        view = self.inspect(token)
        if view.status in ("revoked", "expired"):
            return view, refusal(Liveness(view.status), claims.id, expires=view.expires,
                                 reason=view.status_reason)
        amount, rate, share, multiplier = self.price_tiered(request)
        if amount <= view.remaining:
            return view, None
        return view, short_refusal(claims, request, amount, view.remaining, view.held, rate,
                                   share, multiplier, self.tiers())

    def _reserve_insert(self, tx: Tx, claims: Claims, request: HoldRequest, job_id, account: str,
                        wallet_id: int, rate: int, amount: int, share: int,
                        multiplier: int, hold_id: str | None = None) -> dict:
        hold_id = hold_id or new_hold_id()
        cluster, asked = request.cluster or self.cluster, request.to_dict()
        tx.raw.insert(HO, dict(
            id=hold_id, token_id=claims.id, account=account, user=request.user,
            partition=request.partition, cluster=cluster,
            gpu_type=request.gpu_type, gpus=request.gpus, seconds=request.seconds,
            tasks=request.tasks, rate_ppm=rate, amount=amount, charged=0, refunded=0,
            state="pending", job_id=job_id, created_at=tx.now, request=asked,
            # whole GPUs leave gres/per_node/share to the columns' defaults (gpu, -, 1)
            **({"gres": request.gres, "per_node": request.per_node, "share": share}
               if request.gres != GPU else {}),
            **({"qos": request.qos} if request.qos else {}),
            **({"multiplier_ppm": multiplier} if multiplier != PPM else {}),
        ))
        tx.move("reserve", wallet_id, tx.wallet_id("system:escrow"), amount,
                account=account, token_id=claims.id, hold_id=hold_id,
                data={"v": DATA_VERSION, "request": asked, "rate_ppm": rate,
                      "job_id": job_id, "cluster": cluster,
                      **({"share": share} if request.gres != GPU else {}),
                      **({"multiplier_ppm": multiplier} if multiplier != PPM else {})})
        tx.flush()
        return HoldView(
            id=hold_id, token_id=claims.id, account=account, user=request.user,
            gpu_type=request.gpu_type, gpus=request.gpus, seconds=request.seconds,
            tasks=request.tasks, rate_ppm=rate, amount=amount, charged=0, refunded=0,
            state="pending", job_id=job_id, created=tx.now, resolved=None,
            partition=request.partition, cluster=cluster,
            gres=request.gres, per_node=request.per_node, share=share, qos=request.qos,
            multiplier_ppm=multiplier,
        ).to_dict()


def short_refusal(claims: Claims, request: HoldRequest, amount: int, available: int, held: int,
                  rate: int, share: int, multiplier: int, tiers: Tiers) -> Refusal:
    """The refusal of a token that has ``available`` of the ``amount`` a request needs:
    exhausted, or short by how much, with the ``-t`` or the tier that would fit."""
    reason = Reason.EXHAUSTED if available == 0 and held == 0 else Reason.INSUFFICIENT
    tail = "is exhausted" if reason is Reason.EXHAUSTED else \
        f"has {fmt_hours(available)} GPU-h left: " + shortfall(
            request, amount, available, rate, share, multiplier, tiers,
            claims.scopes.partitions)
    return Refusal(reason, f"needs {fmt_hours(amount)} GPU-h ({request.describe()}), "
                   f"token {claims.id} {tail}", token_id=claims.id, needed=amount,
                   available=available)


def _fast_reserve_row(tx: Tx, token_id: str, request: HoldRequest, token_digest: str):
    """The common case in two statements: (account, wallet id, rate, balance, multiplier) of
    a live token whose stored digest matches and whose GPU type is priced; else None. The
    tier multipliers the request can pay (its candidate partitions', its QOS's, the largest
    off-peak one) come in the second statement, decided by ``ledger.tiers``.

    Locks the token row and nothing else (wallets are locked by Tx.flush, in id order, the
    chain head by Tx.seal): not the account row its siblings share — MariaDB ignores
    ``FOR UPDATE OF`` and would lock every row of a join — and no read in the locking
    statement but the token's own, because a locking read mixed with a consistent read
    fails under MariaDB's ``innodb_snapshot_isolation`` whenever it waited for the lock.
    The second statement reads the rest after the lock, so it sees the latest balance.
    Liveness and the rate are decided by the same functions as every other path
    (ledger.liveness, .pricing).
    """
    raw = tx.raw
    gpu_type, partitions = request.gpu_type, request.partitions
    qoses = tuple(q for q in (request.qos or "").split(",") if q)
    typed = not is_untyped(gpu_type)
    tier_sql = ", (SELECT MAX(multiplier_ppm) FROM multipliers WHERE kind = 'offpeak')" + \
        ", (SELECT multiplier_ppm FROM multipliers WHERE kind = 'qos' AND name = ?)" * \
        len(qoses) + \
        ", (SELECT multiplier_ppm FROM multipliers WHERE kind = 'partition' AND name = ?)" * \
        len(partitions)
    token = raw.one("SELECT wallet_id, account_id, digest, status, not_before, expires "
                    "FROM tokens WHERE id = ?" + FOR_UPDATE, (token_id,))
    if token is None or token[2] != token_digest:
        return None
    wallet_id, account_id, _, status, not_before, expires = token
    if liveness(status, load_time(not_before), load_time(expires), tx.now) \
            is not Liveness.ACTIVE:
        return None
    row = raw.one(
        "SELECT a.name, w.balance, "
        "(SELECT rate_ppm FROM rates WHERE gpu_type = 'default'), "
        "(SELECT MAX(rate_ppm) FROM rates)" +
        (", (SELECT rate_ppm FROM rates WHERE gpu_type = ?)" if typed else "") + tier_sql +
        " FROM accounts a JOIN wallets w ON w.id = ? WHERE a.id = ?",
        ((gpu_type,) if typed else ()) + qoses + tuple(partitions) + (wallet_id, account_id))
    if row is None:
        return None
    rate = hold_rate(gpu_type, RateCandidates(row[4] if typed else None, row[2], row[3]))
    if rate is None:
        return None
    at = 5 if typed else 4
    offpeak, rest = row[at], list(row[at + 1:])
    found_qos, found_part = rest[:len(qoses)], rest[len(qoses):]
    tiers = Tiers(partition={p: v for p, v in zip(partitions, found_part) if v is not None},
                  qos={q: v for q, v in zip(qoses, found_qos) if v is not None},
                  offpeak=(("*", offpeak),) if offpeak is not None else ())
    return row[0], wallet_id, rate, row[1], tiers.hold_ppm(partitions, request.qos)



