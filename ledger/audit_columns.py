"""``verify``, continued: the tables outside the journal, held against it column by column.

The walk (``ledger.audit``) gathers what the journal says; this module keeps the journal's
record of everything else money depends on, and compares each table with it:

* holds: token, account, amount, charged, refunded, state (``ledger.facts.HoldFacts``) and
  every column a hold is priced or settled by (:data:`HOLD_COLUMNS`): the reserve row's
  request, rate, job, cluster, share and multiplier, then each resize's and bind's
  ``cols`` and each bind's job;
* tokens: account, wallet, face, status and scopes (and a minted token's expiry);
* charges: hold, amount, job, node, restart and the sha256 of the usage record;
* rates and tier multipliers: each as its last ``rate_set`` / ``multiplier_set`` (or
  ``multiplier_unset``) row left it;
* the idempotency records that decide where money goes: run → hold links (``link`` rows)
  and post keys (a replayed post answers the record instead of charging: each must be the
  key of a charge row of the same hold);
* the journal's own ``head_export`` rows: the head each recorded must still be the chain's.

Rows written before data version 2 (``ledger.facts.DATA_VERSION``) lack some of this: what
their data does not say is :data:`UNKNOWN`, not checked. Once a row carrying version-2
data is in the journal, every later reserve, resize and charge row must carry it too.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy import Connection, Text, case, cast, func, select, type_coerce

from .amounts import PPM
from .facts import DATA_VERSION, LINK_KIND, usage_digest
from .models import (
    GENESIS_HASH,
    Account,
    Charge,
    Hold,
    IdempotencyRecord,
    JournalEntry,
    Multiplier,
    Rate,
    Token,
)

if TYPE_CHECKING:
    from .audit import VerifyResult, _Walk

A, CH, HO, IDEM, J, MU, R, T = (m.__table__ for m in (
    Account, Charge, Hold, IdempotencyRecord, JournalEntry, Multiplier, Rate, Token))
STREAM = {"yield_per": 5000}
CHUNK = 500  # seqs per IN list

UNKNOWN = object()  # what a row from before data version 2 does not say: not checked
HOLD_COLUMNS = ("user", "partition", "cluster", "gpu_type", "gpus", "seconds", "tasks",
                "rate_ppm", "job_id", "gres", "per_node", "share", "qos", "multiplier_ppm")
_AT = {name: i for i, name in enumerate(HOLD_COLUMNS)}
_HOLD_CHECKED = ("token", "account", "amount", "charged", "refunded", "state") + HOLD_COLUMNS
PARSED_HOLD_KINDS = frozenset(("reserve", "resize", "bind", "charge"))  # rows whose data counts
TABLE_KINDS = frozenset(("rate_set", "rate_unset", "multiplier_set", "multiplier_unset",
                         LINK_KIND))
_MARKS = {"reserve": "v", "resize": "cols", "charge": "usage_sha256"}  # version-2 data
_CHARGE_DATA = ("job_id", "node", "restart", "usage_sha256")
# A resize from before version 2 recorded what it asked for, not what the hold became:
_RESIZE_UNSAID = ("rate_ppm", "gres", "per_node", "share", "multiplier_ppm")


def order(seq: int | str) -> tuple[int, int]:
    """Chained rows (seq) before pending ones ("pending ID"), each in its own order."""
    return (0, seq) if isinstance(seq, int) else (1, int(seq.split()[-1]))


def _version(data: dict) -> int:
    v = data.get("v")
    return v if isinstance(v, int) and not isinstance(v, bool) else 1


def reserve_columns(data: dict) -> list:
    """A hold's columns (:data:`HOLD_COLUMNS`) as its reserve row records them. Before
    version 2 a bind could move a hold's QOS and partition unjournaled, and the cluster of
    a request that named none was the ledger's: those are UNKNOWN there."""
    req = data.get("request")
    req = req if isinstance(req, dict) else {}
    get = req.get
    if _version(data) >= DATA_VERSION:
        return [get("user"), get("partition"), data.get("cluster"), get("gpu_type"),
                get("gpus"), get("seconds"), get("tasks"), data.get("rate_ppm"),
                data.get("job_id"), get("gres"), get("per_node"), data.get("share", 1),
                get("qos") or None,  # a reserve stores no empty QOS
                data.get("multiplier_ppm", PPM)]
    return [get("user", UNKNOWN), UNKNOWN, get("cluster") or UNKNOWN, get("gpu_type", UNKNOWN),
            get("gpus", UNKNOWN), get("seconds", UNKNOWN), get("tasks", UNKNOWN),
            data.get("rate_ppm", UNKNOWN), data.get("job_id", UNKNOWN), get("gres", "gpu"),
            get("per_node"), data.get("share", 1), UNKNOWN, data.get("multiplier_ppm", PPM)]


def hold_change(kind: str, data: dict, cols: list) -> None:
    """A resize or bind row's change to a hold's recorded columns."""
    if kind == "bind" and "job_id" in data:
        cols[_AT["job_id"]] = data["job_id"]
    changed = data.get("cols")
    if isinstance(changed, dict):
        for name, value in changed.items():
            if name in _AT:
                cols[_AT[name]] = value
    elif kind == "resize" and "was_multiplier_ppm" in data:  # re-priced for QOS/partition
        for name in ("qos", "partition", "multiplier_ppm"):
            cols[_AT[name]] = data.get(name)
    elif kind == "resize":  # before version 2: what it asked for, the rest unsaid
        for name in ("gpus", "seconds", "tasks"):
            if data.get(name) is not None:
                cols[_AT[name]] = data[name]
        for name in ("gpu_type", "partition"):
            if name in data:
                cols[_AT[name]] = data[name]
        for name in _RESIZE_UNSAID:
            cols[_AT[name]] = UNKNOWN


def charge_data(data: dict) -> tuple:
    """(job, node, restart, usage sha256) as a charge row records them."""
    get = data.get
    if "usage_sha256" in data:
        return get("job_id"), get("node"), get("restart"), get("usage_sha256")
    return tuple(get(k, UNKNOWN) for k in _CHARGE_DATA)


class Recorded:
    """The journal's record of hold columns, rates, tiers and links (fed row by row)."""

    def __init__(self, fail: Callable[..., None]):
        self.fail = fail
        self.holds: dict[str, list] = {}  # hold id -> HOLD_COLUMNS' values
        self.rates: dict[str, tuple] = {}  # gpu type -> (ppm, seq)
        self.tiers: dict[tuple, tuple] = {}  # (kind, name) -> (ppm, zone, seq)
        self.links: dict[str, tuple] = {}  # key -> (hold, seq)
        self.since: int | str | None = None  # the first row with version-2 data

    def hold_row(self, seq, kind: str, hold_id: str, data: dict) -> None:
        mark = _MARKS.get(kind)
        if mark is not None:
            if mark in data:
                if self.since is None:
                    self.since = seq
            elif self.since is not None:
                self.fail(f"row {seq}: {kind} of hold {hold_id} lacks its {mark!r} data, "
                          f"which every {kind} row since row {self.since} carries", seq)
        if kind == "reserve":
            self.holds[hold_id] = reserve_columns(data)
        elif kind in ("resize", "bind") and hold_id in self.holds:
            hold_change(kind, data, self.holds[hold_id])

    def table_row(self, seq, kind: str, data: dict) -> None:
        if kind == "rate_set":
            self.rates[data.get("gpu_type")] = (data.get("rate_ppm"), seq)
        elif kind == "rate_unset":
            self.rates.pop(data.get("gpu_type"), None)
        elif kind == "multiplier_set":
            self.tiers[(data.get("kind"), data.get("name"))] = (
                data.get("multiplier_ppm"), data.get("zone"), seq)
        elif kind == "multiplier_unset":
            self.tiers.pop((data.get("kind"), data.get("name")), None)
        elif kind == LINK_KIND:
            key = data.get("key")
            if key in self.links:
                self.fail(f"row {seq}: link {key!r} is recorded a second time (first in row "
                          f"{self.links[key][1]})", seq)
            self.links[key] = (data.get("hold"), seq)


# -- the tables, each streamed once ---------------------------------------------------------------

def check_holds(conn: Connection, walk: _Walk) -> None:
    r, facts, recorded = walk.r, walk.holds, walk.recorded.holds
    rows = conn.execute(select(HO.c.id, HO.c.token_id, HO.c.account, HO.c.amount, HO.c.charged,
                               HO.c.refunded, HO.c.state, *(HO.c[c] for c in HOLD_COLUMNS))
                        .order_by(HO.c.id), execution_options=STREAM)
    for hold_id, token_id, account, amount, charged, refunded, state, *have in rows:
        f = facts.pop(hold_id, None)
        if f is None:
            r.fail(f"hold {hold_id} has no reserve row in the journal")
            continue
        want = recorded.pop(hold_id, None) or [UNKNOWN] * len(HOLD_COLUMNS)
        have[:0] = (token_id, account, amount, charged, refunded, state)
        want[:0] = (f.token_id, f.account, f.held, f.charged, f.refunded, f.state)
        if have == want:  # the common case, at C speed
            continue
        for what, value, expected in zip(_HOLD_CHECKED, have, want):
            if expected is not UNKNOWN and value != expected:
                r.fail(f"hold {hold_id}: {what} is {value} but the journal says {expected}")
    for hold_id in sorted(facts):
        r.fail(f"hold {hold_id} is in the journal but its holds row is missing")


def check_tokens(conn: Connection, walk: _Walk) -> None:
    r, facts = walk.r, dict(walk.tokens)
    rows = conn.execute(select(T.c.id, A.c.name, T.c.wallet_id, T.c.face, T.c.status,
                               type_coerce(T.c.scopes, Text), T.c.expires)
                        .outerjoin(A, A.c.id == T.c.account_id).order_by(T.c.id),
                        execution_options=STREAM)
    for token_id, account, wallet_id, face, status, scopes, expires in rows:
        scopes = _json(scopes)
        t = facts.pop(token_id, None)
        if t is None:
            r.fail(f"token {token_id} has no mint or split row in the journal")
            continue
        for what, have, want in (("account", account, t[0]), ("wallet", wallet_id, t[1]),
                                 ("face value", face, t[2]), ("status", status, t[3]),
                                 ("scopes", scopes, t[4])):
            if want is not UNKNOWN and have != want:
                r.fail(f"token {token_id}: {what} is {have} but the journal says {want}")
        if isinstance(t[5], str) and expires != _when(t[5]):
            r.fail(f"token {token_id}: expires is {expires.isoformat() if expires else None} "
                   f"but the journal says {t[5]}")
    for token_id in sorted(facts):
        r.fail(f"token {token_id} is in the journal but its tokens row is missing")


def _json(value):
    """A JSON column read as text (PostgreSQL's driver parses it anyway); text that is not
    JSON (SQLite does not check) stays text, to be named."""
    if isinstance(value, str | bytes):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _when(text: str) -> datetime | None:
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        return None


def check_charges(conn: Connection, walk: _Walk) -> None:
    r, facts = walk.r, dict(walk.charges)
    total = 0
    rows = conn.execute(select(CH.c.hold_id, CH.c.key, CH.c.amount, CH.c.job_id, CH.c.node,
                               CH.c.restart, cast(CH.c.usage, Text)).order_by(CH.c.id),
                        execution_options=STREAM)
    for hold_id, key, amount, job_id, node, restart, usage in rows:
        total += amount
        f = facts.pop(key, None)
        if f is None:
            r.fail(f"charge {key!r} of hold {hold_id} has no journal row")
            continue
        if (hold_id, amount) != f[:2]:
            r.fail(f"charge {key!r}: hold {hold_id}, {amount} GPU-s, but journal row {f[2]} "
                   f"says hold {f[0]}, {f[1]} GPU-s", f[2])
        want_job, want_node, want_restart, want_usage = f[4]
        for what, have, want in (("job", job_id, want_job), ("node", node, want_node),
                                 ("restart", restart, want_restart)):
            if want is not UNKNOWN and have != want:
                r.fail(f"charge {key!r}: {what} is {have} but journal row {f[2]} says {want}")
        if want_usage is not UNKNOWN and usage_digest(usage or "") != want_usage:
            r.fail(f"charge {key!r}: usage is not the record journal row {f[2]} was written "
                   "with (its sha256 differs)")
    for key, f in sorted(facts.items(), key=lambda kv: order(kv[1][2])):
        r.fail(f"charge {key!r} of hold {f[0]} (journal row {f[2]}) is missing from the "
               "charges table", f[2])
    usage = walk.sums.get(walk.usage, 0)
    if usage != total - walk.refunds:
        r.fail(f"system:usage holds {usage} GPU-s but the charges table less refunds says "
               f"{total - walk.refunds}")


def _result(conn: Connection, name: str):
    """One field of an idempotency record's result as text, extracted by the database (the
    records are many and their results long); NULL where the result is not a JSON object
    (SQLite alone stores JSON unchecked)."""
    field = IDEM.c.result[name].as_string()
    if conn.dialect.name == "sqlite":
        return case((func.json_valid(IDEM.c.result) == 1, field), else_=None)
    return field


def _text(value) -> str | None:
    return None if value is None else str(value)


def check_idempotency(conn: Connection, walk: _Walk) -> None:
    """Run → hold links against the ``link`` rows; post keys against the charge rows (a
    version-2 charge row's key must have its post record)."""
    fail, charges = walk.r.fail, walk.charges
    links = dict(walk.recorded.links)
    unrecorded = {key: c for key, c in charges.items() if c[4][3] is not UNKNOWN}
    rows = conn.execute(select(IDEM.c.key, IDEM.c.op, _result(conn, "hold"),
                               _result(conn, "id"), _result(conn, "charged"))
                        .where(IDEM.c.op.in_(("link", "post"))).order_by(IDEM.c.key),
                        execution_options=STREAM)
    for key, op, linked, hold_id, charged in rows:
        if op == "link":
            want = links.pop(key, None)
            if want is None:
                fail(f"link {key!r} (idempotency record) has no link row in the journal")
            elif linked != _text(want[0]):
                fail(f"link {key!r}: hold is {linked} but journal row {want[1]} says {want[0]}")
            continue
        unrecorded.pop(key, None)
        c = charges.get(key)
        if c is None:
            fail(f"post key {key!r} (idempotency record) has no charge row in the journal: a "
                 "replay would answer a post that charged nothing")
            continue
        have = (hold_id, charged)
        want = (_text(c[0]), _text(c[3]) if c[4][3] is not UNKNOWN else charged)
        if have != want:
            fail(f"post key {key!r}: hold {have[0]}, charged {have[1]}, but journal row {c[2]} "
                 f"says hold {want[0]}, charged {want[1]}")
    for key, (hold_id, seq) in sorted(links.items(), key=lambda kv: order(kv[1][1])):
        fail(f"link {key!r} to hold {hold_id} (journal row {seq}) is missing from the "
             "idempotency table")
    for key, c in sorted(unrecorded.items(), key=lambda kv: order(kv[1][2])):
        fail(f"charge {key!r} of hold {c[0]} (journal row {c[2]}) has no post record in the "
             "idempotency table")


def check_rates(conn: Connection, walk: _Walk) -> None:
    """The rates and tier multipliers tables against their last journal rows."""
    fail, rates, tiers = walk.r.fail, dict(walk.recorded.rates), dict(walk.recorded.tiers)
    for gpu_type, ppm in conn.execute(select(R.c.gpu_type, R.c.rate_ppm)):
        want = rates.pop(gpu_type, None)
        if want is None:
            fail(f"rate {gpu_type}: in the rates table but set by no journal row")
        elif ppm != want[0]:
            fail(f"rate {gpu_type}: rate_ppm is {ppm} but journal row {want[1]} says {want[0]}")
    for gpu_type, (_ppm, seq) in sorted(rates.items(), key=lambda kv: order(kv[1][1])):
        fail(f"rate {gpu_type} (journal row {seq}) is missing from the rates table")
    for kind, name, ppm, zone in conn.execute(select(MU.c.kind, MU.c.name, MU.c.multiplier_ppm,
                                                     MU.c.zone)):
        want = tiers.pop((kind, name), None)
        if want is None:
            fail(f"multiplier {kind} {name}: in the multipliers table but set by no journal "
                 "row")
        elif (ppm, zone) != want[:2]:
            fail(f"multiplier {kind} {name}: multiplier_ppm {ppm}, zone {zone}, but journal "
                 f"row {want[2]} says {want[0]}, zone {want[1]}")
    for (kind, name), want in sorted(tiers.items(), key=lambda kv: order(kv[1][2])):
        fail(f"multiplier {kind} {name} (journal row {want[2]}) is missing from the "
             "multipliers table")


def check_exports(conn: Connection, r: VerifyResult) -> None:
    """Each ``head_export`` row's head must still be the chain's: the row it names hashes to
    what it recorded (a history recomputed since is named here, with no head file at all)."""
    seqs = sorted({e["seq"] for e in r.exports
                   if isinstance(e.get("seq"), int) and 0 < e["seq"] <= r.rows})
    hashes = {0: GENESIS_HASH}
    for at in range(0, len(seqs), CHUNK):  # the chain is intact: stored hashes are recomputed
        hashes.update(conn.execute(select(J.c.seq, J.c.hash)
                                   .where(J.c.seq.in_(seqs[at:at + CHUNK]))).all())
    for e in r.exports:
        seq, row = e.get("seq"), e["row"]
        before = isinstance(seq, int) and 0 <= seq and (seq < row if isinstance(row, int)
                                                         else seq <= r.rows)
        if not before:
            r.fail(f"row {row}: head_export records row {seq}, which is not a row before it",
                   row)
        elif hashes.get(seq) != e.get("hash"):
            r.fail(f"row {row}: head_export recorded row {seq} with hash {e.get('hash')}, but "
                   f"row {seq} now hashes to {hashes.get(seq)}: history rewritten since that "
                   "export", row)
