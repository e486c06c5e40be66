"""One function per operation: fields in, response fields out, the ledger does the work.

Nothing here decides a business rule: prices, scopes, balances and refusal messages all
come from :class:`ledger.service.Ledger`, and what a Slurm job asks for from
:mod:`ledger.jobrequest`. Handlers only check who may ask, turn wire fields into a
:class:`HoldRequest`, and turn results and typed errors into responses.

``reserve``, ``resize`` and ``quote`` take a request in one of two forms: Slurm's own
fields, as job_submit.lua forwards them (``tres_per_*``, ``time_limit``, node and task
counts, ``array_inx``, ``candidates``; ``rec_*`` for the job record of an update: any of
:data:`ledger.jobrequest.SLURM_KEYS`), read by the job-request reader; or a request
already counted (``gpus seconds [type tasks gres per_node]``: PrologSlurmctld's, from what
Slurm allocated, and the admin tools').
"""

from __future__ import annotations

import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable

from .. import jobrequest, settlement
from ..amounts import fmt_hours
from ..config import ChargeConfig
from ..errors import (
    ConfigError,
    IdempotencyConflict,
    InvalidInput,
    LedgerError,
    NotFound,
    Reason,
    Refusal,
    StateError,
    StorageError,
)
from ..jobrequest import SLURM_KEYS
from ..names import is_account_name, is_identifier, is_user_name
from ..nodecharge import NodeCharge
from ..queries import account_views, user_tokens
from ..slurmsyntax import sluid
from ..views import HoldRequest
from .auth import Forbidden, Peer, Policy, SlurmAccounts, user_name
from .protocol import VERSION, ProtocolError, with_json

_INT = re.compile(r"^[0-9]{1,12}$")
KEY_RELOAD_INTERVAL = 5.0


class BadRequest(LedgerError):
    """A well-formed line whose fields do not make a valid request."""


def _int(fields: dict[str, str], name: str, *, required: bool = True) -> int | None:
    value = fields.get(name)
    if value is None or value == "":
        if required:
            raise BadRequest(f"missing field {name}")
        return None
    if not _INT.match(value):
        raise BadRequest(f"field {name} is not a non-negative integer")
    return int(value)


def _name(fields: dict[str, str], name: str, rule=is_identifier, what: str = "name"
          ) -> str | None:
    value = fields.get(name)
    if value is None or value == "":
        return None
    if not rule(value):
        raise BadRequest(f"field {name} is not a valid {what}")
    return value


def _user(fields: dict[str, str]) -> str | None:
    """The ``user`` field, by the ledger's one rule for user names (``ledger.names``)."""
    return _name(fields, "user", is_user_name, "user name")


def _account(fields: dict[str, str]) -> str | None:
    """The ``account`` field, by the ledger's rule for Slurm account names."""
    return _name(fields, "account", is_account_name, "account name")


def _sluid(fields: dict[str, str]) -> str | None:
    """The run's SLUID (``sluid=``, Slurm 25.11+), None when absent."""
    value = fields.get("sluid")
    if value is None or value == "":
        return None
    if sluid(value) is None:
        raise BadRequest("field sluid is not a SLUID")
    return value


def _names(fields: dict[str, str], name: str) -> str | None:
    """A comma list of names (``partition=a,b``: the job's candidate partitions), in order,
    without repeats; None when absent."""
    value = fields.get(name)
    if value is None or value == "":
        return None
    items = value.split(",")
    if len(items) > 64 or not all(is_identifier(i) for i in items):
        raise BadRequest(f"field {name} is not a comma list of valid names")
    return ",".join(dict.fromkeys(items))


def error_response(exc: BaseException) -> dict[str, object]:
    """A typed error → ``ok=0 reason=… message=…`` (Refusals keep their numbers; the
    job-request reader's refusals say why: ``request``, ``no_token``, ``time_limit``,
    ``denied``)."""
    if isinstance(exc, jobrequest.Refused):
        return {"ok": 0, "reason": exc.reason, "message": str(exc)}
    if isinstance(exc, Refusal):
        d = exc.to_dict()
        return {"ok": 0, "reason": d["reason"], "message": d["message"],
                "token_id": d.get("token_id"), "needed": d.get("needed"),
                "available": d.get("available")}
    for kind, reason in ((ProtocolError, "bad_request"), (BadRequest, "bad_request"),
                         (Forbidden, "forbidden"), (InvalidInput, "invalid"),
                         (NotFound, "not_found"), (StateError, "state"),
                         (IdempotencyConflict, "conflict"), (StorageError, "unavailable"),
                         (ConfigError, "unavailable"), (LedgerError, "error")):
        if isinstance(exc, kind):
            return {"ok": 0, "reason": reason, "message": str(exc)}
    return {"ok": 0, "reason": "internal", "message": f"internal error ({type(exc).__name__})"}


_UNQUEUED = frozenset({"reserve", "ping", "hello", "metrics"})  # ops that need not wait for the writer


class Handlers:
    """The operations of the socket, bound to one ledger."""

    def __init__(self, ledger, policy: Policy, accounts: Callable[[str], frozenset[str]] | None = None,
                 on_fault: Callable[[Peer, dict[str, str], BaseException], None] | None = None,
                 fast=None, charge: ChargeConfig | None = None, instruments=None,
                 free_accounts: Iterable[str] = ()):
        self.ledger = ledger
        self.charge_config = charge or ChargeConfig()  # the site's policy, for node records
        # this process's counters (ledger.daemon.instruments), for op metrics
        self.instruments = instruments
        # [submit] free_accounts: Slurm accounts whose GPU jobs need no token (the reader
        # decides; job_submit.lua falls back on the same list only when this cannot answer)
        self.free_accounts = frozenset(free_accounts)
        # reserves answered from memory and written in batches (ledger.daemon.fastpath);
        # every other operation waits for them to be written first
        self.fast = fast
        self.policy = policy
        self.accounts = accounts or SlurmAccounts()
        # Called with every unexpected exception (a server fault, answered ``internal``);
        # the server logs its traceback. Typed errors (bad input, refusals) are not faults.
        self.on_fault = on_fault
        # Only the decision to reload public keys is serialized; no request waits on
        # another's database work (the ledger's verifier is thread-safe).
        self._reload_lock = threading.Lock()
        self._keys_loaded_at = 0.0
        self.ops: dict[str, Callable[[Peer, dict[str, str]], dict[str, object]]] = {
            "hello": self.hello, "ping": self.ping, "reserve": self.reserve,
            "resize": self.resize, "void": self.void, "quote": self.quote,
            "balance": self.balance, "jobs": self.jobs, "bind": self.bind,
            "finish": self.finish, "charge": self.charge, "metrics": self.metrics,
            "revoked": self.revoked,
        }

    def handle(self, peer: Peer, fields: dict[str, str]) -> dict[str, object]:
        """Dispatch one decoded request; every failure becomes an error response."""
        try:
            op = fields.get("op")
            fn = self.ops.get(op or "")
            if fn is None:
                raise BadRequest(f"unknown op {op!r}" if op else "missing field op")
            if self.fast is not None and op not in _UNQUEUED:
                self.fast.flush()
            return fn(peer, fields)
        except LedgerError as exc:
            return error_response(exc)
        except Exception as exc:  # noqa: BLE001 - a request must never kill the daemon
            if self.on_fault is not None:
                self.on_fault(peer, fields, exc)
            return error_response(exc)

    # -- helpers ------------------------------------------------------------------------------

    def _with_keys(self, fn):
        """Run ``fn``; reload public keys once (at most every few seconds) on an unknown key."""
        try:
            return fn()
        except Refusal as exc:
            if exc.reason is not Reason.UNKNOWN_KEY:
                raise
            with self._reload_lock:
                if time.monotonic() - self._keys_loaded_at < KEY_RELOAD_INTERVAL:
                    raise
                self._keys_loaded_at = time.monotonic()
            self.ledger.reload_keys()  # a key added since start
            return fn()

    def _request(self, fields: dict[str, str], user: str | None) -> HoldRequest:
        return HoldRequest(
            gpus=_int(fields, "gpus"), seconds=_int(fields, "seconds"),
            gpu_type=_name(fields, "type"), tasks=_int(fields, "tasks", required=False) or 1,
            account=_account(fields), user=user, partition=_names(fields, "partition"),
            cluster=_name(fields, "cluster"), gres=_name(fields, "gres") or "gpu",
            per_node=_int(fields, "per_node", required=False) or None,
            qos=_names(fields, "qos"),
        )

    def _cluster(self, fields: dict[str, str]) -> str | None:
        """The cluster a job runs on (``cluster=``, else this daemon's): job ids are looked up
        with it, as the clusters sharing a ledger reuse each other's ids."""
        return _name(fields, "cluster") or self.ledger.cluster or None

    def _slurm_request(self, fields: dict[str, str], user: str | None, *, token: bool
                       ) -> HoldRequest | str:
        """Slurm's request fields, read by the job-request reader: the HoldRequest, or
        ``jobrequest.FREE`` / ``jobrequest.NO_GPU``; :class:`jobrequest.Refused` with the
        user's text."""
        if "gpus" in fields or "seconds" in fields:
            raise BadRequest("a request gives Slurm's fields or gpus/seconds, not both")
        parts = jobrequest.candidates(fields.get("candidates"))
        if not parts and fields.get("partition"):  # names only (gpuledger quote -p a,b)
            parts = tuple(jobrequest.Partition(p) for p in _names(fields, "partition")
                          .split(","))
        job = jobrequest.SlurmJob.from_fields(fields)
        read = jobrequest.read_submit(job, parts, token=token,
                                      free_accounts=self.free_accounts)
        if isinstance(read, str):
            return read
        return read.hold(user=user, account=_account(fields), qos=_names(fields, "qos"),
                         cluster=_name(fields, "cluster"))

    @staticmethod
    def _job_user(fields: dict[str, str]) -> str | None:
        name = _user(fields)
        if name is None and fields.get("uid"):
            name = user_name(_int(fields, "uid"))
        return name

    # -- operations ---------------------------------------------------------------------------

    def hello(self, peer: Peer, fields: dict[str, str]) -> dict[str, object]:
        return {"ok": 1, "version": VERSION, "user": peer.name, "privileged": peer.privileged}

    def ping(self, peer: Peer, fields: dict[str, str]) -> dict[str, object]:
        return {"ok": 1}

    def metrics(self, peer: Peer, fields: dict[str, str]) -> dict[str, object]:
        """This process's in-memory counters (``Instruments.snapshot``), for the process that
        serves the metrics endpoint. Root and the Slurm user only."""
        self.policy.require_privileged(peer, "metrics")
        if self.instruments is None:
            raise BadRequest("this daemon process keeps no metrics")
        return with_json(self.instruments.snapshot())

    def reserve(self, peer: Peer, fields: dict[str, str]) -> dict[str, object]:
        """Hold a job's maximum cost: ``token`` and the request (Slurm's fields, or ``gpus
        seconds [type tasks …]``), ``user``/``uid``, ``account``, ``key``. Slurm's fields may
        also answer ``result=free`` (a free account) or ``result=none`` (no GPU): no hold."""
        self.policy.require_privileged(peer, "reserve")
        token = fields.get("token") or ""
        if SLURM_KEYS.intersection(fields):
            request = self._slurm_request(fields, self._job_user(fields), token=bool(token))
            if isinstance(request, str):
                return {"ok": 1, "result": request}
        else:
            request = self._request(fields, self._job_user(fields))
        key = fields.get("key") or None
        job_id = _name(fields, "job")
        if self.fast is not None and job_id is None:
            answer = self._with_keys(lambda: self.fast.answer(token, request, key))
            if answer is not None:
                return {"ok": 1, "hold": answer["hold"], "token_id": answer["token_id"],
                        "amount": answer["amount"], "hours": fmt_hours(answer["amount"]),
                        "rate": answer["rate"], "desc": request.describe()}
            self.fast.flush()  # the database decides, after every answer before it
        # A request without a key (job_submit.lua and PrologSlurmctld always send one) gets
        # one of its own: the ledger may then run it again after a COMMIT whose outcome it
        # does not know (a database failover) instead of answering "outcome unknown".
        once = key or f"daemon:{secrets.token_hex(12)}"
        view = self._with_keys(lambda: self.ledger.reserve(token, request, once, job_id=job_id))
        if self.fast is not None:
            self.fast.learn(view.token_id)
        return {"ok": 1, "hold": view.id, "token_id": view.token_id, "amount": view.amount,
                "hours": fmt_hours(view.amount), "rate": view.rate_ppm,
                "desc": request.describe()}

    def resize(self, peer: Peer, fields: dict[str, str]) -> dict[str, object]:
        """Re-price a pending hold to what the job now asks for (replays are no-ops).

        Absolute ``seconds``/``gpus``/``tasks``; ``type`` when the GPU request changed
        (empty: untyped); ``partition``/``account`` when those changed. The ledger checks
        the token's scopes again. Slurm's fields (an update and its ``rec_*`` job record)
        are read by the job-request reader, which may void the hold instead (the job asks
        for no GPU any more: ``state=voided``) or, with no ``hold``, refuse GPUs added to a
        job that has none."""
        self.policy.require_privileged(peer, "resize")
        hold_id = _name(fields, "hold")
        if SLURM_KEYS.intersection(fields):
            return self._modify(hold_id, fields)
        if hold_id is None:
            raise BadRequest("missing field hold")
        seconds, gpus, tasks = (_int(fields, k, required=False) for k in ("seconds", "gpus", "tasks"))
        partition, account = _names(fields, "partition"), _account(fields)
        retype = "type" in fields
        if not (seconds or gpus or tasks or retype or partition or account):
            raise BadRequest("resize needs seconds, gpus, tasks, type, partition or account")
        extra = {"gpu_type": _name(fields, "type")} if retype else {}
        if _name(fields, "gres"):
            extra.update(gres=_name(fields, "gres"),
                         per_node=_int(fields, "per_node", required=False) or None)
        return self._resized(hold_id, seconds=seconds or None, gpus=gpus or None,
                             tasks=tasks or None, partition=partition, account=account,
                             **extra)

    def _resized(self, hold_id: str, **change) -> dict[str, object]:
        before = self.ledger.hold(hold_id).amount
        view = self.ledger.resize(hold_id, **change)
        return {"ok": 1, "hold": view.id, "amount": view.amount, "hours": fmt_hours(view.amount),
                "delta": view.amount - before}

    def _modify(self, hold_id: str | None, fields: dict[str, str]) -> dict[str, object]:
        """scontrol update of a job, in Slurm's fields: what it changes, by the reader."""
        if {"gpus", "seconds", "tasks", "type"}.intersection(fields):
            raise BadRequest("a request gives Slurm's fields or gpus/seconds, not both")
        parts = jobrequest.candidates(fields.get("candidates"))
        update = jobrequest.SlurmJob.from_fields(fields)
        record = jobrequest.SlurmJob.from_fields(fields, jobrequest.RECORD_PREFIX)
        _names(fields, "partition"), _account(fields)  # names by the ledger's rules
        change = jobrequest.read_modify(update, record, parts, held=hold_id is not None,
                                        free_accounts=self.free_accounts)
        if hold_id is None or change.nothing:
            if hold_id is None:
                return {"ok": 1, "result": "none"}
            view = self.ledger.hold(hold_id)
            return {"ok": 1, "hold": view.id, "amount": view.amount,
                    "hours": fmt_hours(view.amount), "delta": 0}
        if change.void:
            view = self.ledger.void(hold_id, reason="job modified to use no GPU")
            return {"ok": 1, "hold": view.id, "state": view.state, "returned": view.returned}
        extra: dict[str, object] = {}
        if change.gpus:
            extra = {"gpus": change.gpus, "gpu_type": change.gpu_type, "gres": change.gres,
                     "per_node": change.per_node}
        return self._resized(hold_id, seconds=change.seconds or None,
                             partition=change.partition, account=change.account, **extra)

    def void(self, peer: Peer, fields: dict[str, str]) -> dict[str, object]:
        self.policy.require_privileged(peer, "void")
        hold_id = _name(fields, "hold")
        if hold_id is None:
            raise BadRequest("missing field hold")
        view = self.ledger.void(hold_id, reason=fields.get("reason") or "released by Slurm")
        return {"ok": 1, "hold": view.id, "state": view.state, "returned": view.returned}

    def quote(self, peer: Peer, fields: dict[str, str]) -> dict[str, object]:
        """What a job would hold and, given a token, whether that token covers it now."""
        user = self.policy.subject(peer, self._job_user(fields))
        if SLURM_KEYS.intersection(fields):
            request = self._slurm_request(fields, user, token=True)
            if request == jobrequest.FREE:
                return {"ok": 1, "result": request, "amount": 0, "hours": fmt_hours(0),
                        "user": user}
            if request == jobrequest.NO_GPU:
                raise BadRequest("the request asks for no GPU (gpu, shard or mps)")
        else:
            request = self._request(fields, user)
        amount, rate = self.ledger.price(request)
        share = self.ledger.hold_share(request)
        quote = self.ledger.tier_quote(request)
        out: dict[str, object] = {"ok": 1, "amount": amount, "hours": fmt_hours(amount),
                                  "rate": rate, "share": share, "desc": request.describe(),
                                  "gres": request.gres, "per_node": request.per_node,
                                  "seconds": request.seconds,
                                  "user": user, "multiplier": quote["multiplier_ppm"],
                                  **{k: v for k, v in quote.items() if k.startswith("cheapest")}}
        token = fields.get("token")
        if not token:
            return out

        try:
            view, short = self._with_keys(lambda: self.ledger.covers(token, request))
        except Refusal as exc:
            return {**out, **error_response(exc), "amount": amount, "hours": fmt_hours(amount)}
        out.update(token_id=view.id, status=view.status, remaining=view.remaining,
                   remaining_hours=fmt_hours(view.remaining), covers=short is None)
        if short is not None:  # the same words a reserve would refuse with
            out.update(reason=str(short.reason), message=short.message)
        return out

    def balance(self, peer: Peer, fields: dict[str, str]) -> dict[str, object]:
        """The user's tokens (scoped to them or to their Slurm accounts) and those accounts."""
        user = self.policy.subject(peer, _user(fields))
        accounts = self.accounts(user)
        tokens = [t.to_dict() for t in user_tokens(self.ledger, user, accounts)]
        known = {a.name: a for a in account_views(self.ledger)}
        views = [known[a].member_dict() for a in sorted(accounts) if a in known]
        return with_json({"user": user, "slurm_accounts": sorted(accounts), "accounts": views,
                          "tokens": tokens})

    def jobs(self, peer: Peer, fields: dict[str, str]) -> dict[str, object]:
        """The user's holds (pending and settled) with what each held and charged."""
        user = self.policy.subject(peer, _user(fields))
        state = fields.get("state") or None
        if state not in (None, "pending", "posted", "voided"):
            raise BadRequest("state must be pending, posted or voided")
        holds = [h.to_dict() for h in self.ledger.holds(user=user, state=state)]
        return with_json({"user": user, "holds": holds})

    # -- PrologSlurmctld / EpilogSlurmctld (slurm_plugin.ctld) -----------------------------

    def bind(self, peer: Peer, fields: dict[str, str]) -> dict[str, object]:
        """Bind a hold to its job (``hold job user account [task restart sluid qos partition
        alloc_*]``) and link this run of the job (or array task) to it — by its SLUID where
        Slurm gives one (25.11+) — ; the ledger checks the identity and re-prices the hold for
        the QOS and partition the job runs in, and a one-run hold for the GPUs it got."""
        self.policy.require_privileged(peer, "bind")
        hold_id, job = _name(fields, "hold"), _name(fields, "job")
        if hold_id is None or job is None:
            raise BadRequest("bind needs hold and job")
        user, account = _user(fields), _account(fields)
        run_of = _name(fields, "task") or job  # an array task's own id: its nodes know only it
        restart = _int(fields, "restart", required=False) or 0
        sluid = _sluid(fields)
        cluster = self._cluster(fields)
        view = self.ledger.bind(hold_id, job, user=user, account=account,
                                qos=_name(fields, "qos"), partition=_names(fields, "partition"),
                                cluster=cluster)
        if view.state == "pending":
            self.ledger.link_job(hold_id, run_of, restart, user=user, account=account,
                                 sluid=sluid, cluster=cluster)
            view = self._fit(view, fields)
        token = self.ledger.inspect(view.token_id)
        return {"ok": 1, "hold": view.id, "state": view.state, "token_id": view.token_id,
                "token_status": token.status, "token_reason": token.status_reason or ""}

    def _fit(self, view, fields: dict[str, str]):
        """A hold that pays one run is re-priced to what Slurm allocated the run (bind's
        ``alloc_gpus``, ``alloc_type``, ``alloc_gres``/``alloc_per_node`` for shares, read
        from Slurm's record by PrologSlurmctld): job_submit held an estimate (the most nodes
        the request allows, the type as written), the run pays for what it got. A token that
        cannot pay the difference refuses (the caller cancels the job)."""
        gpus = _int(fields, "alloc_gpus", required=False)
        if not gpus or view.tasks != 1:
            return view
        gres = _name(fields, "alloc_gres") or "gpu"
        if gres != view.gres:  # whole GPUs and shares are not traded here: settlement charges
            return view        # what ran, anything beyond the hold is a journaled debt
        gtype = _name(fields, "alloc_type")
        per_node = _int(fields, "alloc_per_node", required=False) or None
        extra: dict = {}
        if gtype and gtype != view.gpu_type:
            extra["gpu_type"] = gtype
        if gres != "gpu":
            extra.update(gres=gres, per_node=per_node)
        if gpus == view.gpus and "gpu_type" not in extra and (
                gres == "gpu" or per_node == view.per_node):
            return view
        return self.ledger.resize(view.id, gpus=gpus, **extra)

    def finish(self, peer: Peer, fields: dict[str, str]) -> dict[str, object]:
        """A run ended (``job [array_job] nodes``): close its hold once every charge is in."""
        self.policy.require_privileged(peer, "finish")
        job = _name(fields, "job")
        if job is None:
            raise BadRequest("finish needs job")
        owners = [o for o in (job, _name(fields, "array_job")) if o]
        nodes = [n for n in (fields.get("nodes") or "").split(",") if n]
        for n in nodes:
            if not is_identifier(n):
                raise BadRequest("field nodes is not a list of node names")
        state, view = settlement.finish(self.ledger, owners, job, nodes,
                                        cluster=self._cluster(fields))
        out: dict[str, object] = {"ok": 1, "state": state}
        if view is not None:
            out.update(hold=view.id, charged=view.charged, returned=view.returned)
        return out

    def revoked(self, peer: Peer, fields: dict[str, str]) -> dict[str, object]:
        """A federated job started here (``job``); its copy on sibling ``cluster`` was
        revoked: return that copy's ``hold`` (``settlement.release_revoked`` checks it is
        that cluster's, of the job's ``user``/``account`` and bound to no other job)."""
        self.policy.require_privileged(peer, "revoked")
        hold_id, job, cluster = _name(fields, "hold"), _name(fields, "job"), _name(fields,
                                                                                "cluster")
        runs_on = _name(fields, "runs_on") or self.ledger.cluster
        if hold_id is None or job is None or cluster is None or runs_on is None:
            raise BadRequest("revoked needs hold, job, cluster and runs_on")
        state, view = settlement.release_revoked(self.ledger, hold_id, job, cluster, runs_on,
                                                 user=_user(fields), account=_account(fields))
        out: dict[str, object] = {"ok": 1, "state": state}
        if view is not None:
            out.update(hold=view.id, returned=view.returned)
        return out

    # -- the nodes' epilogs (slurm_plugin.epilog, slurm_plugin.chargespool) ---------------

    def charge(self, peer: Peer, fields: dict[str, str]) -> dict[str, object]:
        """One node's record of one run (``record``: ``ledger.nodecharge`` JSON), priced and
        posted by the ledger (``settlement.charge_node``), at most once per job, run and node.
        ``ok=1`` whether this call charged or the run was charged before (``charged=0``): the
        node may forget the record. Bad records are ``bad_request``: retrying cannot help."""
        self.policy.require_privileged(peer, "charge")
        raw = fields.get("record")
        if not raw:
            raise BadRequest("charge needs record")
        return self.charge_record(NodeCharge.from_json(raw))

    def charge_record(self, rec: NodeCharge) -> dict[str, object]:
        """``charge`` for a record already parsed and its sender already checked (the
        nodes' TCP door, ``nodedoor``, parses it once to check the node's address)."""
        c = self.charge_config
        result = settlement.charge_node(self.ledger, rec, c.policy, c.floor)
        return {"ok": 1, "charged": int(result.charged), "amount": result.amount,
                "hold": result.hold_id, "note": result.note or None}
