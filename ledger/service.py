"""The ledger's service API: one class the CLI, the daemon and the Slurm hooks call.

Every state change runs in one database transaction that also appends its
journal rows. Operations that take an idempotency ``key`` return the first
result again when replayed with the same fields, and raise
:class:`IdempotencyConflict` when the fields differ.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path

from sqlalchemy import Connection, Engine, func, insert, select, update

from . import attest, audit, db, keys, verifyrecord
from .audit import ATTEST_KEY_KIND, ATTEST_RETIRE_KIND, HEAD_EXPORT_KIND, VerifyResult
from .chargereads import ChargeReadOps
from .config import Config
from .debts import DebtOps
from .errors import (
    AlreadyExists,
    IdempotencyConflict,
    InvalidInput,
    LedgerError,
    NotFound,
    StorageError,
    UniqueViolation,
)
from .groupcommit import GroupCommit
from .holds import HoldOps
from .idempotency import fingerprint, idempotency_row
from .joblinks import JobLinkOps
from .journal import Tx, ensure_head, now_utc
from .limits import Limits
from .models import Account, Hold, IdempotencyRecord, Rate, SigningKey, Token, Wallet
from .names import check_account_name, check_gpu_type  # noqa: F401 (re-exported)
from .pool import PoolOps
from .rawsql import Raw
from .shares import GresFile
from .tiers import TierOps
from .token_ops import TokenOps
from .tokens import Verifier
from .views import iso

A, W, T, R, K, HO, IDEM = (m.__table__ for m in (Account, Wallet, Token, Rate, SigningKey, Hold,
                                                  IdempotencyRecord))

SYSTEM_WALLETS = {
    "system:issuance": True,  # the only wallet allowed below zero: value minted
    "system:escrow": False,  # held for pending jobs
    "system:usage": False,  # charged to jobs
    "system:expired": False,  # remainders of expired tokens
}


class LedgerBase:
    """Engine, clock, key directory and the transaction/idempotency machinery."""

    def __init__(self, engine: Engine, *, keys_dir: Path | None = None,
                 clock: Callable[[], datetime] = now_utc, cluster: str | None = None,
                 gres_conf: str | Path | None = None,
                 unavailable_wait: float = db.UNAVAILABLE_WAIT_S, limits: Limits | None = None):
        self.engine = engine
        # how long a write tries again while the database is away, read-only or failing
        # over ([database] unavailable_wait; ledger.db.run_write)
        self.unavailable_wait = unavailable_wait
        self.limits = limits or Limits()  # caps on what an admin command may set
        self.gres = GresFile(gres_conf)  # the GPUs' shard counts (``ledger.shares``)
        self.keys_dir = keys_dir
        self.clock = clock
        self.cluster = cluster
        self._verifier: Verifier | None = None
        self._wallet_ids: dict[str, int] = {}
        self._group = GroupCommit(self._write_alone) if db.is_sqlite(engine) else None

    @classmethod
    def from_config(cls, config: Config, **kw):
        engine = db.make_engine(db.resolve_url(config))
        kw.setdefault("gres_conf", config.hooks.gres_conf)
        kw.setdefault("unavailable_wait", config.database.unavailable_wait)
        kw.setdefault("limits", config.limits.limits())
        return cls(engine, keys_dir=config.keys_dir, cluster=config.cluster, **kw)

    # -- transactions -------------------------------------------------------------------------

    def _write(self, fn: Callable[[Tx], object], *, chain_now: bool = False,
               replay_safe: bool = False):
        """Run ``fn`` in a write transaction and seal its rows. ``chain_now``: chain them in
        this transaction even if that means waiting for the head (events that later reads
        must find in the journal itself: head exports, head-attestation keys). On SQLite,
        operations other threads ask for at the same time share the transaction and its
        commit (``ledger.groupcommit``).

        ``replay_safe``: ``fn`` may run again after a COMMIT whose outcome is unknown (a
        connection lost during it): it carries its idempotency key (:meth:`_idempotent`),
        or a second run finds its state set and changes nothing. Other operations raise
        :class:`OutcomeUnknown` then (``ledger.db.run_write``)."""
        if self._group is not None and not chain_now:
            return self._group.submit(fn)
        return self._write_alone(fn, chain_now, replay_safe)

    def _write_alone(self, fn: Callable[[Tx], object], chain_now: bool = False,
                     replay_safe: bool = False):
        def run(conn: Connection):
            tx = Tx(conn, self.clock(), self._wallet_ids)
            try:
                result = fn(tx)
                tx.seal(wait=chain_now)  # the rows, last: the head is locked only until commit
            finally:
                tx.close()
            return result

        return db.run_write(self.engine, run, replay_safe=replay_safe,
                            wait_s=self.unavailable_wait, confirm=_confirm)

    def seal_pending(self) -> int:
        """Chain every journal row other writers left pending (server databases: see
        ``Tx.seal``), waiting for the chain head if another writer holds it; so that what
        reads the journal or the system wallets next sees every committed movement. Returns
        the rows chained (0 on SQLite, where nothing is ever pending)."""
        if db.is_sqlite(self.engine):
            return 0
        return self._write(lambda tx: tx.seal(wait=True), replay_safe=True)

    def _idempotent(self, op: str, key: str | None, fields: dict,
                    fn: Callable[[Tx], dict], *, replay_safe: bool = False) -> dict:
        """Run ``fn`` once per ``key``; replays get the stored result back. Without a key,
        ``replay_safe`` says whether ``fn`` may run again after a COMMIT whose outcome is
        unknown (see :meth:`_write`)."""
        if key is None:
            return self._write(fn, replay_safe=replay_safe)

        def stored(conn: Connection) -> dict | None:
            with Raw(conn) as raw:
                return self._stored(raw, op, key, fields)

        def run(tx: Tx) -> dict:
            return self._once(tx, op, key, fields, fn)

        for _attempt in range(3):
            try:
                return self._write(run, replay_safe=True)  # the key makes a replay harmless
            except UniqueViolation:
                continue  # a concurrent replay committed the key first: read its result
            except StorageError:
                raise  # the database's own trouble: not another writer's result
            except LedgerError:
                # A concurrent replay may have committed while we waited for a row lock and
                # changed what we saw (hold already posted, funds already held): its result
                # is ours.
                with self._read() as conn:
                    previous = stored(conn)
                if previous is None:
                    raise
                return previous
        return self._write(run, replay_safe=True)

    @staticmethod
    def _stored(raw: Raw, op: str, key: str, fields: dict) -> dict | None:
        """The stored result of ``key``, None when it is new; IdempotencyConflict when it
        was used for another request."""
        if not isinstance(key, str) or not 0 < len(key) <= 200:
            raise InvalidInput("idempotency key must be 1 to 200 characters")
        row = idempotency_row(raw, key)
        if row is None:
            return None
        stored_op, stored_fingerprint, result = row
        if stored_op != op or stored_fingerprint != fingerprint({"op": op, **fields}):
            raise IdempotencyConflict(
                f"idempotency key {key!r} was already used for a different {stored_op} request")
        return result

    def _once(self, tx: Tx, op: str, key: str, fields: dict, fn: Callable[[Tx], dict]) -> dict:
        """Inside a transaction: the stored result of ``key``, else ``fn``'s, stored."""
        previous = self._stored(tx.raw, op, key, fields)
        if previous is not None:
            return previous
        result = fn(tx)
        tx.raw.insert(IDEM, {"key": key, "op": op,
                             "fingerprint": fingerprint({"op": op, **fields}),
                             "result": result, "created_at": tx.now})
        return result

    def _read(self):
        return db.read(self.engine)

    # -- setup ----------------------------------------------------------------------------------

    def bootstrap(self) -> None:
        """Create the system wallets and the chain head if missing (idempotent)."""
        def run(conn: Connection):
            for code, negative in SYSTEM_WALLETS.items():
                if conn.execute(select(W.c.id).where(W.c.code == code)).first() is None:
                    conn.execute(insert(W).values(code=code, kind="system", balance=0,
                                                  allow_negative=negative))
            ensure_head(conn)

        db.run_write(self.engine, run)

    # -- lookups shared by the operations ------------------------------------------------------

    def verifier(self) -> Verifier:
        """Public keys from the ledger (reloaded on demand by :meth:`reload_keys`)."""
        if self._verifier is None:
            self.reload_keys()
        return self._verifier

    def reload_keys(self) -> None:
        with self._read() as conn:
            rows = conn.execute(select(K.c.kid, K.c.public_key)).all()
        self._verifier = Verifier({kid: keys.public_from_text(pub) for kid, pub in rows})

    @staticmethod
    def _account_row(conn: Connection, name: str):
        row = conn.execute(select(A).where(A.c.name == name)).one_or_none()
        if row is None:
            raise NotFound(f"unknown account {name!r}")
        return row


def _confirm(conn: Connection) -> None:
    """A write in the run after a COMMIT whose outcome was unknown: its own COMMIT then
    waits for the synchronous standby, and with it everything the primary committed
    before — the earlier run's commit included, when it was there — even when this run
    finds its work done and writes nothing else. The chain head's row is in every ledger;
    the update leaves it as it was."""
    conn.exec_driver_sql("UPDATE chain_head SET seq = seq WHERE id = 1")


class AdminOps(LedgerBase):
    """Accounts, rates, keys, journal and verification."""

    def create_account(self, name: str) -> None:
        check_account_name(name)

        def run(tx: Tx):
            if tx.conn.execute(select(A.c.id).where(A.c.name == name)).first() is not None:
                raise AlreadyExists(f"account {name} already exists")
            wid = tx.conn.execute(insert(W).values(code=f"account:{name}", kind="account",
                                                   balance=0, allow_negative=False)
                                  ).inserted_primary_key[0]
            tx.conn.execute(insert(A).values(name=name, wallet_id=wid, report_to=[],
                                             created_at=tx.now))
            tx.event("account_create", account=name)

        self._write(run)

    def set_report_to(self, name: str, emails: list[str]) -> None:
        for e in emails:
            if not re.match(r"^[^@\s,]+@[^@\s,]+$", e):
                raise InvalidInput(f"not an email address: {e!r}")

        def run(tx: Tx):
            self._account_row(tx.conn, name)
            tx.conn.execute(update(A).where(A.c.name == name).values(report_to=list(emails)))
            tx.event("account_update", account=name, data={"report_to": list(emails)})

        self._write(run)

    def set_rate(self, gpu_type: str, rate_ppm: int) -> int | None:
        """Set a GPU type's rate (journaled); returns the rate it replaces, None if new."""
        check_gpu_type(gpu_type)
        self.limits.check_rate(rate_ppm)

        def run(tx: Tx):
            old = tx.conn.execute(select(R.c.rate_ppm).where(R.c.gpu_type == gpu_type)).scalar()
            if old is None:
                tx.conn.execute(insert(R).values(gpu_type=gpu_type, rate_ppm=rate_ppm,
                                                 updated_at=tx.now))
            else:
                tx.conn.execute(update(R).where(R.c.gpu_type == gpu_type)
                                .values(rate_ppm=rate_ppm, updated_at=tx.now))
            tx.event("rate_set", data={"gpu_type": gpu_type, "rate_ppm": rate_ppm,
                                       "previous_ppm": old})
            return old

        return self._write(run)

    def unset_rate(self, gpu_type: str) -> int:
        """Remove a GPU type's rate (journaled); returns the rate removed. The type is then
        priced at ``default`` (``ledger.pricing``), and untyped requests at the highest rate
        left."""
        def run(tx: Tx):
            old = tx.conn.execute(select(R.c.rate_ppm).where(R.c.gpu_type == gpu_type)).scalar()
            if old is None:
                known = tx.conn.execute(select(R.c.gpu_type).order_by(R.c.gpu_type)).scalars()
                raise NotFound(f"no rate for GPU type {gpu_type!r} (rates: "
                               f"{', '.join(known) or 'none'})")
            tx.conn.execute(R.delete().where(R.c.gpu_type == gpu_type))
            tx.event("rate_unset", data={"gpu_type": gpu_type, "previous_ppm": old})
            return old

        return self._write(run)

    def rates(self) -> dict[str, int]:
        with self._read() as conn:
            return dict(conn.execute(select(R.c.gpu_type, R.c.rate_ppm).order_by(R.c.gpu_type)).all())

    def add_key(self, kid: str, public: str) -> None:
        keys.check_kid(kid)

        def run(tx: Tx):
            if tx.conn.execute(select(K.c.kid).where(K.c.kid == kid)).first() is not None:
                raise AlreadyExists(f"key {kid} is already registered in the ledger")
            tx.conn.execute(insert(K).values(kid=kid, public_key=public, created_at=tx.now))
            tx.event("key_add", data={"kid": kid, "public_key": public})

        self._write(run)
        self._verifier = None

    def generate_key(self, kid: str) -> str:
        """New Ed25519 key: private file (0600) in the keys directory, public half in the ledger."""
        if self.keys_dir is None:
            raise InvalidInput("no keys directory configured")
        keys.check_kid(kid)
        with self._read() as conn:
            if conn.execute(select(K.c.kid).where(K.c.kid == kid)).first() is not None:
                raise AlreadyExists(f"key {kid} is already registered in the ledger")
        key = keys.generate(self.keys_dir, kid)
        self.add_key(kid, keys.public_text(key))
        return keys.public_text(key)

    def generate_attest_key(self, kid: str) -> str:
        """New head-attestation key: private file (0600) here, public half recorded in the
        journal. It signs exported heads only; it can never mint or verify a token."""
        if self.keys_dir is None:
            raise InvalidInput("no keys directory configured")
        keys.check_kid(kid)
        with self._read() as conn:
            if conn.execute(select(K.c.kid).where(K.c.kid == kid)).first() is not None or \
                    kid in self._attest_events(conn)[0]:
                raise AlreadyExists(f"key {kid} is already registered in the ledger")
        key = keys.generate(self.keys_dir, kid)
        public = keys.public_text(key)

        def run(tx: Tx):
            if kid in self._attest_events(tx.conn)[0]:
                raise AlreadyExists(f"key {kid} is already registered in the ledger")
            tx.event(ATTEST_KEY_KIND, data={"kid": kid, "public_key": public,
                                            "purpose": attest.PURPOSE})

        self._write(run, chain_now=True)
        return public

    @staticmethod
    def _attest_events(conn: Connection) -> tuple[dict[str, dict], dict[str, int]]:
        """Head-attestation keys recorded in the journal: {kid: event}, {retired kid: ts}."""
        from .journal import J
        found, retired = {}, {}
        for kind, data, ts in conn.execute(select(J.c.kind, J.c.data, J.c.ts).where(
                J.c.kind.in_([ATTEST_KEY_KIND, ATTEST_RETIRE_KIND])).order_by(J.c.seq)):
            body = json.loads(data)
            if kind == ATTEST_KEY_KIND:
                found.setdefault(body.get("kid"), {**body, "ts": ts})
            else:
                retired.setdefault(body.get("kid"), ts)
        return found, retired

    def attest_keys(self) -> list[dict]:
        from datetime import UTC

        def when(ts: int) -> str:
            return iso(datetime.fromtimestamp(ts / 1e6, UTC))

        self.seal_pending()
        with self._read() as conn:
            found, retired = self._attest_events(conn)
        have = self.keys_dir
        return [{
            "kid": kid, "public_key": e.get("public_key"), "purpose": attest.PURPOSE,
            "created": when(e["ts"]), "retired": when(retired[kid]) if kid in retired else None,
            "private_key_here": bool(have and keys.private_path(have, kid).exists()),
        } for kid, e in found.items()]

    def retire_key(self, kid: str) -> None:
        def run(tx: Tx):
            row = tx.conn.execute(select(K.c.retired_at).where(K.c.kid == kid)).one_or_none()
            if row is None:
                found, retired = self._attest_events(tx.conn)
                if kid not in found:
                    raise NotFound(f"unknown key {kid!r}")
                if kid not in retired:
                    tx.event(ATTEST_RETIRE_KIND, data={"kid": kid})
                return
            if row.retired_at is not None:
                return
            tx.conn.execute(update(K).where(K.c.kid == kid).values(retired_at=tx.now))
            tx.event("key_retire", data={"kid": kid})

        self._write(run, chain_now=True)

    def list_keys(self, conn: Connection | None = None) -> list[dict]:
        if conn is None:
            with self._read() as c:
                return self.list_keys(c)
        rows = conn.execute(select(K).order_by(K.c.created_at, K.c.kid)).all()
        have = self.keys_dir
        return [{
            "kid": r.kid, "public_key": r.public_key, "created": iso(r.created_at),
            "retired": iso(r.retired_at),
            "private_key_here": bool(have and keys.private_path(have, r.kid).exists()),
        } for r in rows]

    def active_kid(self, conn: Connection | None = None) -> str:
        """The newest non-retired key whose private half is on this host."""
        for k in reversed(self.list_keys(conn)):
            if not k["retired"] and k["private_key_here"]:
                return k["kid"]
        raise NotFound("no active signing key on this host (run `gpuledger keys generate`)")

    def verify_journal(self, against: Sequence[tuple[str, dict]] = ()) -> VerifyResult:
        """Check the journal and the state outside it in one snapshot, and today's chain
        against exported heads: ``against`` ((label, head) pairs, from
        :func:`attest.read_head`) and the last head this host exported, if any."""
        heads = list(against)
        last = attest.remembered(self.keys_dir)
        watch = {h["seq"] for _, h in heads} | ({last[1]["seq"]} if last else set())
        self.seal_pending()  # rows left pending later are checked as such (ledger.audit)
        with audit.snapshot(self.engine) as conn:
            result = audit.verify(conn, watch)
        if result.chain_intact:
            local = attest.local_publics(self.keys_dir, result.attest_keys)
            for label, head in heads + ([last] if last else []):
                attest.check_head(result, head, label, local)
            attest.check_replay(result, heads, last)
        verifyrecord.record(self.keys_dir, result.ok, result.rows, result.head_seq,
                            result.problem)  # for the metrics and `gpuledger status`
        return result

    def export_head(self, against: Sequence[tuple[str, dict]] = (),
                    publish: Callable[[dict], None] | None = None
                    ) -> tuple[VerifyResult, dict | None]:
        """Verify; when the ledger is sound, sign its head with this host's head-attestation
        key, record the export in the journal and remember it here. (result, head or None)

        ``publish`` gets the signed head before the export is recorded: if it fails (the
        file cannot be written), nothing is recorded."""
        result = self.verify_journal(against)
        if not result.ok:
            return result, None
        kid, private = attest.signing_key(self.keys_dir, result, result.attest_retired)
        head = attest.sign_head(kid, private, result, self.clock())
        if publish is not None:
            publish(head)
        self._write(lambda tx: tx.event(HEAD_EXPORT_KIND, data={
            "seq": head["seq"], "hash": head["hash"], "kid": kid, "at": head["at"]}),
            chain_now=True)
        attest.remember(self.keys_dir, head)
        return result, head

    def head(self) -> tuple[int, str]:
        from .models import ChainHead
        self.seal_pending()
        with self._read() as conn:
            row = conn.execute(select(ChainHead.seq, ChainHead.hash)).one()
        return row.seq, row.hash

    def journal(self, since: datetime | None = None, limit: int | None = None) -> list[dict]:
        from .journal import J
        q = (select(J, W.c.code.label("debit_code"))
             .outerjoin(W, W.c.id == J.c.debit_wallet_id).order_by(J.c.seq))
        if since is not None:
            from .journal import micros
            q = q.where(J.c.ts >= micros(since))
        if limit is not None:  # the newest rows, shown oldest first
            if limit <= 0:
                raise InvalidInput(f"--limit must be at least 1, got {limit}")
            q = q.order_by(None).order_by(J.c.seq.desc()).limit(limit)
        self.seal_pending()
        with self._read() as conn:
            codes = dict(conn.execute(select(W.c.id, W.c.code)).all())
            rows = conn.execute(q).all()
        if limit is not None:
            rows.reverse()
        from datetime import UTC
        return [{
            "seq": r.seq,
            "time": iso(datetime.fromtimestamp(r.ts / 1e6, UTC)),
            "kind": r.kind, "from": codes.get(r.debit_wallet_id),
            "to": codes.get(r.credit_wallet_id), "amount": r.amount, "account": r.account,
            "token_id": r.token_id, "hold_id": r.hold_id, "reason": r.reason,
            "data": json.loads(r.data), "hash": r.hash,
        } for r in rows]

    def wallet_balance(self, code: str) -> int:
        self.seal_pending()  # the system wallets move when their rows are chained
        with self._read() as conn:
            value = conn.execute(select(W.c.balance).where(W.c.code == code)).scalar()
        if value is None:
            raise NotFound(f"unknown wallet {code}")
        return value

    def totals(self) -> dict[str, int]:
        self.seal_pending()
        with self._read() as conn:
            return dict(conn.execute(select(W.c.code, W.c.balance)).all())

    def sum_balances(self) -> int:
        self.seal_pending()
        with self._read() as conn:
            return conn.execute(select(func.coalesce(func.sum(W.c.balance), 0))).scalar()



class Ledger(HoldOps, TokenOps, PoolOps, DebtOps, JobLinkOps, TierOps, ChargeReadOps, AdminOps):
    """The whole service API."""
