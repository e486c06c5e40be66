"""Token operations: mint, split, transfer, revoke, expire, inspect, list."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta

from sqlalchemy import Connection, func, insert, select, update

from . import keys
from .amounts import check_amount, fmt_hours
from .errors import InvalidInput, KeyError_, NotFound, Reason, Refusal, StateError
from .facts import token_birth
from .journal import Tx
from .liveness import Liveness, require_spendable, token_liveness
from .models import Account, Hold, SigningKey, Token, Wallet
from .rawsql import FOR_UPDATE, Raw
from .tokens import Claims, Scopes, digest, is_token_id, new_token_id, sign
from .views import TokenView

A, W, T, K, HO = (m.__table__ for m in (Account, Wallet, Token, SigningKey, Hold))

# A token with its account and balance (hot path of reserve/post/void: see ledger.rawsql).
_TOKEN_ROW = ("SELECT t.*, a.name AS account, a.wallet_id AS pool_wallet_id, w.balance "
              "FROM tokens t JOIN accounts a ON a.id = t.account_id "
              "JOIN wallets w ON w.id = t.wallet_id WHERE t.id = ?")
DEFAULT_VALIDITY = timedelta(days=365)  # a token minted without --expires (docs/tokens.md)
Publish = Callable[[str], None]  # puts a new token where it goes, inside its transaction


def token_status(row, balance: int, held: int, now: datetime) -> str:
    """active | revoked | expired | exhausted — the one place this is decided."""
    state = token_liveness(row, now)
    if state in (Liveness.REVOKED, Liveness.EXPIRED):
        return str(state)
    if balance == 0 and held == 0:
        return "exhausted"
    return "active"


def _check_scopes(scopes: Scopes) -> None:
    """Scopes enter the ledger here (mint, split): every name by its kind's rule."""
    if not isinstance(scopes, Scopes):
        raise InvalidInput("scopes must be a Scopes (Scopes.parse(users=..., ...))")
    scopes.check()


class TokenOps:
    """Mixin over LedgerBase: the token lifecycle."""

    # -- references ----------------------------------------------------------------------------

    def token_id_of(self, ref: str) -> str:
        """A token id, or a token string whose signature verifies → its id."""
        ref = (ref or "").strip()
        if is_token_id(ref):
            return ref
        return self.verifier().verify(ref).id

    def _token_row(self, conn: Connection, token_id: str, lock: bool = False):
        """The token's row with its account's name and pool wallet and its balance; with
        ``lock``, the token row is locked first (alone: MariaDB ignores ``FOR UPDATE OF``
        and would lock the account row every token of the account shares), then read."""
        with Raw(conn) as raw:
            if lock:
                raw.run("SELECT id FROM tokens WHERE id = ?" + FOR_UPDATE, (token_id,))
            row = raw.record(T, _TOKEN_ROW, (token_id,))
        if row is None:
            raise NotFound(f"unknown token {token_id}")
        return row

    def _minted_account(self, conn: Connection, token_row) -> str:
        """The account the journal says the token was minted (or split) to."""
        birth = token_birth(conn, token_row.id)
        return birth.account if birth is not None else token_row.account

    def _pool_wallet(self, conn: Connection, token_row) -> int:
        """The pool wallet of the token's account per the journal (``tokens.account_id`` is
        an editable column; revoked value must not follow an edit of it)."""
        return self._account_row(conn, self._minted_account(conn, token_row)).wallet_id

    def _balance(self, conn: Connection, wallet_id: int) -> int:
        return conn.execute(select(W.c.balance).where(W.c.id == wallet_id)).scalar()

    def _held(self, conn: Connection, token_id: str) -> int:
        return conn.execute(
            select(func.coalesce(func.sum(HO.c.amount - HO.c.charged), 0))
            .where(HO.c.token_id == token_id, HO.c.state == "pending")
        ).scalar()

    def _view(self, conn: Connection, row, now: datetime) -> TokenView:
        balance = self._balance(conn, row.wallet_id)
        held = self._held(conn, row.id)
        return TokenView(
            id=row.id, account=row.account, kid=row.kid, face=row.face, remaining=balance,
            held=held, status=token_status(row, balance, held, now), not_before=row.not_before,
            expires=row.expires, scopes=row.scopes, parent=row.parent_id, created=row.created_at,
            status_reason=row.status_reason,
        )

    def _require_spendable(self, row, now: datetime, what: str) -> None:
        require_spendable(row, now, what)

    # -- creation -------------------------------------------------------------------------------

    def _signing_key(self, conn: Connection, kid: str | None):
        if kid is None:
            kid = self.active_kid(conn)
        row = conn.execute(select(K).where(K.c.kid == kid)).one_or_none()
        if row is None:
            raise NotFound(f"unknown key {kid!r}")
        if row.retired_at is not None:
            raise KeyError_(f"key {kid} is retired and signs nothing new")
        return kid, keys.load_private(self.keys_dir, kid)

    def _create_token(self, tx: Tx, claims: Claims, account_row, token: str) -> int:
        wid = tx.conn.execute(insert(W).values(code=f"token:{claims.id}", kind="token", balance=0,
                                               allow_negative=False)).inserted_primary_key[0]
        tx.conn.execute(insert(T).values(
            id=claims.id, kid=claims.kid, account_id=account_row.id, wallet_id=wid,
            parent_id=claims.parent, face=claims.face, not_before=claims.not_before,
            expires=claims.expires, scopes=claims.scopes.to_dict(), digest=digest(token),
            status="active", created_at=tx.now,
        ))
        return wid

    def mint(self, account: str, amount: int, *, expires: datetime | None = None,
             not_before: datetime | None = None, scopes: Scopes = Scopes(),
             kid: str | None = None, reason: str | None = None, from_pool: bool = False,
             publish: Publish | None = None) -> tuple[str, TokenView]:
        """Issue a new signed token worth ``amount`` GPU-seconds to ``account``: new value
        (from ``system:issuance``, at most ``[limits] max_token_hours``), or with
        ``from_pool`` value the account's pool holds (revoked remainders). ``publish``
        gets the token inside the transaction: if it fails, nothing is minted."""
        check_amount(amount, what="token value")
        if not from_pool:
            self.limits.check_token(amount)
        _check_scopes(scopes)

        def run(tx: Tx):
            acct = self._account_row(tx.conn, account)
            source = tx.wallet_id("system:issuance")
            if from_pool:
                source = acct.wallet_id
                pool = self._balance(tx.conn, source)
                if amount > pool:
                    raise InvalidInput(f"the pool of account {account} holds "
                                       f"{fmt_hours(pool)} GPU-h; cannot mint "
                                       f"{fmt_hours(amount)} GPU-h from it")
            nbf = not_before or tx.now.replace(microsecond=0)
            exp = expires or (nbf + DEFAULT_VALIDITY)
            if exp <= nbf:
                raise InvalidInput("expiry must be after the start of validity")
            if exp <= tx.now:
                raise InvalidInput(f"expiry {exp.date()} is in the past")
            key_id, private = self._signing_key(tx.conn, kid)
            claims = Claims(id=new_token_id(), kid=key_id, account=account, face=amount,
                            not_before=nbf, expires=exp, issued=tx.now, scopes=scopes)
            token = sign(claims, private)
            wid = self._create_token(tx, claims, acct, token)
            tx.move("mint", source, wid, amount, account=account,
                    token_id=claims.id, reason=reason,
                    data={"kid": key_id, "expires": exp.isoformat(), "scopes": scopes.to_dict(),
                          **({"from_pool": True} if from_pool else {})})
            tx.flush()
            view = self._view(tx.conn, self._token_row(tx.conn, claims.id), tx.now)
            if publish is not None:
                publish(token)
            return token, view

        return self._write(run)

    def split(self, ref: str, amount: int, *, account: str | None = None,
              scopes: Scopes = Scopes(), expires: datetime | None = None,
              kid: str | None = None, reason: str | None = None,
              publish: Publish | None = None) -> tuple[str, TokenView]:
        """Move ``amount`` from a token into a new signed token with equal or narrower scopes
        (``publish`` as in :meth:`mint`)."""
        check_amount(amount, what="split value")
        _check_scopes(scopes)
        parent_id = self.token_id_of(ref)

        def run(tx: Tx):
            parent = self._token_row(tx.conn, parent_id, lock=True)
            self._require_spendable(parent, tx.now, "split it")
            acct = self._account_row(tx.conn, account or parent.account)
            available = self._balance(tx.conn, parent.wallet_id)
            if amount > available:
                raise Refusal(Reason.INSUFFICIENT,
                              f"token {parent.id} has {fmt_hours(available)} GPU-h left, cannot "
                              f"split {fmt_hours(amount)}", token_id=parent.id, needed=amount,
                              available=available)
            child_scopes = Scopes.from_dict(parent.scopes).narrowed(scopes)
            exp = expires or parent.expires
            if exp > parent.expires:
                raise InvalidInput(f"a split token cannot outlive its parent "
                                   f"(expires {parent.expires.date()})")
            key_id, private = self._signing_key(tx.conn, kid)
            claims = Claims(id=new_token_id(), kid=key_id, account=acct.name, face=amount,
                            not_before=max(parent.not_before, tx.now.replace(microsecond=0)),
                            expires=exp, issued=tx.now, scopes=child_scopes, parent=parent.id)
            token = sign(claims, private)
            wid = self._create_token(tx, claims, acct, token)
            tx.move("split", parent.wallet_id, wid, amount, account=acct.name,
                    token_id=claims.id, reason=reason,
                    data={"parent": parent.id, "from_account": parent.account,
                          "scopes": child_scopes.to_dict()})
            tx.flush()
            view = self._view(tx.conn, self._token_row(tx.conn, claims.id), tx.now)
            if publish is not None:
                publish(token)
            return token, view

        return self._write(run)

    # -- movements between existing tokens -----------------------------------------------------

    def transfer(self, src: str, dst: str, amount: int, reason: str
                 ) -> tuple[TokenView, TokenView]:
        """Move ``amount`` between two live tokens; (source, destination) afterwards."""
        check_amount(amount, what="transfer")
        if not (reason or "").strip():
            raise InvalidInput("a transfer needs a reason")
        src_id, dst_id = self.token_id_of(src), self.token_id_of(dst)
        if src_id == dst_id:
            raise InvalidInput("cannot transfer a token to itself")

        def run(tx: Tx):
            first, second = sorted((src_id, dst_id))  # lock order
            rows = {first: self._token_row(tx.conn, first, lock=True),
                    second: self._token_row(tx.conn, second, lock=True)}
            s, d = rows[src_id], rows[dst_id]
            self._require_spendable(s, tx.now, "transfer from it")
            self._require_spendable(d, tx.now, "transfer to it")
            available = self._balance(tx.conn, s.wallet_id)
            if amount > available:
                raise Refusal(Reason.INSUFFICIENT,
                              f"token {s.id} has {fmt_hours(available)} GPU-h left, cannot "
                              f"transfer {fmt_hours(amount)}", token_id=s.id, needed=amount,
                              available=available)
            tx.move("transfer", s.wallet_id, d.wallet_id, amount, account=d.account,
                    token_id=d.id, reason=reason, data={"from_token": s.id,
                                                        "from_account": s.account})
            tx.flush()
            return (self._view(tx.conn, self._token_row(tx.conn, src_id), tx.now),
                    self._view(tx.conn, self._token_row(tx.conn, dst_id), tx.now))

        return self._write(run)

    def revoke(self, ref: str, reason: str) -> TokenView:
        """No new holds; pending holds still settle; the remainder returns to the account pool."""
        if not (reason or "").strip():
            raise InvalidInput("revoking a token needs a reason")
        token_id = self.token_id_of(ref)

        def run(tx: Tx):
            row = self._token_row(tx.conn, token_id, lock=True)
            state = token_liveness(row, tx.now)
            if state is Liveness.REVOKED:
                raise StateError(f"token {token_id} is already revoked")
            if state is Liveness.EXPIRED:  # its remainder belongs to system:expired
                raise StateError(f"token {token_id} expired on {row.expires.date()}; "
                                 "nothing to revoke")
            tx.conn.execute(update(T).where(T.c.id == token_id).values(
                status="revoked", status_reason=reason, closed_at=tx.now))
            account = self._minted_account(tx.conn, row)
            tx.move("revoke", row.wallet_id, self._account_row(tx.conn, account).wallet_id,
                    self._balance(tx.conn, row.wallet_id), account=account,
                    token_id=token_id, reason=reason)
            tx.flush()
            return self._view(tx.conn, self._token_row(tx.conn, token_id), tx.now)

        return self._write(run)

    def expire(self, now: datetime | None = None) -> list[dict]:
        """Close tokens past their expiry: remainders move to system:expired."""
        when = now or self.clock()
        with self._read() as conn:
            due = conn.execute(select(T.c.id).where(T.c.status == "active", T.c.expires <= when)
                               .order_by(T.c.id)).scalars().all()
        done = []
        for token_id in due:
            def run(tx: Tx, token_id=token_id):
                row = self._token_row(tx.conn, token_id, lock=True)
                if row.status != "active" or \
                        token_liveness(row, when) is not Liveness.EXPIRED:
                    return None
                amount = self._balance(tx.conn, row.wallet_id)
                tx.conn.execute(update(T).where(T.c.id == token_id).values(
                    status="expired", status_reason=f"expired {row.expires.isoformat()}",
                    closed_at=tx.now))
                tx.move("expire", row.wallet_id, tx.wallet_id("system:expired"), amount,
                        account=row.account, token_id=token_id)
                return {"token_id": token_id, "account": row.account, "amount": amount}

            result = self._write(run)
            if result:
                done.append(result)
        return done

    # -- reading --------------------------------------------------------------------------------

    def inspect(self, ref: str) -> TokenView:
        """Verify a token string (or look up an id) and return its ledger state."""
        ref = (ref or "").strip()
        with self._read() as conn:
            if is_token_id(ref):
                return self._view(conn, self._token_row(conn, ref), self.clock())
            claims = self.verifier().verify(ref)
            row = conn.execute(select(T.c.digest).where(T.c.id == claims.id)).one_or_none()
            if row is None:
                raise Refusal(Reason.UNKNOWN_TOKEN,
                              f"token {claims.id} is signed but unknown to this ledger",
                              token_id=claims.id)
            if row.digest != digest(ref):
                raise Refusal(Reason.BAD_SIGNATURE,
                              f"token {claims.id} does not match the ledger's record of it",
                              token_id=claims.id)
            return self._view(conn, self._token_row(conn, claims.id), self.clock())

    def list_tokens(self, account: str | None = None) -> list[TokenView]:
        with self._read() as conn:
            q = select(T, A.c.name.label("account"), A.c.wallet_id.label("pool_wallet_id")).join(
                A, A.c.id == T.c.account_id).order_by(T.c.created_at, T.c.id)
            if account:
                self._account_row(conn, account)
                q = q.where(A.c.name == account)
            now = self.clock()
            return [self._view(conn, row, now) for row in conn.execute(q).all()]
