"""``verify`` names a direct database edit of any column or table money depends on — the
holds' pricing columns, the charges' job, node and usage, run → hold links, post keys,
rates, tier multipliers and token scopes — and a history recomputed since a head export it
journaled, with no head file at hand (on each database)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from alembic import command
from sqlalchemy import delete, insert, text, update
from test_journal_tamper import rewrite, rows, stranger

from ledger import db, migrate
from ledger.idempotency import fingerprint
from ledger.journal import canonical_data
from ledger.models import Charge, Hold, IdempotencyRecord, Multiplier, Rate, Token
from ledger.service import Ledger
from ledger.tokens import Scopes
from ledger.views import HoldRequest

CH, HO, IDEM, MU, R, T = (m.__table__ for m in (Charge, Hold, IdempotencyRecord, Multiplier,
                                                 Rate, Token))
USAGE = {"gpus": [{"index": 0, "held_ms": 250_000, "busy_ms": 200_000, "measured": True},
                  {"index": 1, "held_ms": 250_000, "busy_ms": 10_000, "measured": True}],
         "policy": "allocated", "elapsed_s": 250.5}


@pytest.fixture
def run(ledger):
    """A job's life on a ledger with tiers: a scoped token, a hold reserved at the premium
    QOS, bound and linked to its job, one node's charge posted; verify is clean."""
    ledger.set_multiplier("qos", "premium", 2_000_000)
    ledger.set_multiplier("partition", "scavenger", 250_000)
    token, view = ledger.mint("physics", 36_000, scopes=Scopes(users=("alice",)))
    hold = ledger.reserve(token, HoldRequest(gpus=2, seconds=600, gpu_type="h100",
                                             account="physics", user="alice",
                                             partition="gpu", qos="premium"))
    ledger.bind(hold.id, "1001", user="alice", account="physics")
    ledger.link_job(hold.id, "1001", 0, user="alice", account="physics")
    key = f"{hold.id}:1001:0:node1"
    ledger.post(hold.id, 500, usage=USAGE, key=key, final=False, job_id="1001",
                node="node1", restart=0)
    result = ledger.verify_journal()
    assert result.ok, result.problems
    return SimpleNamespace(ledger=ledger, token=token, token_id=view.id,
                           hold=ledger.hold(hold.id), key=key)


def edit(ledger, statement) -> None:
    with ledger.engine.begin() as conn:
        conn.execute(statement)


def problems(ledger) -> list[str]:
    result = ledger.verify_journal()
    assert not result.ok
    return result.problems


def journal_row(ledger, kind: str) -> int:
    """The seq of the last journal row of ``kind``."""
    return [r.seq for r in rows(ledger) if r.kind == kind][-1]


# -- holds ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("column,value", [
    ("qos", "normal"), ("multiplier_ppm", 1_000_000), ("partition", "scavenger"),
    ("user", "bob"), ("job_id", "999"), ("rate_ppm", 1), ("gpus", 1), ("seconds", 60)])
def test_hold_column_edit_is_named(run, column, value):
    was = getattr(run.hold, column)
    assert was != value
    edit(run.ledger, update(HO).where(HO.c.id == run.hold.id).values({column: value}))
    assert f"hold {run.hold.id}: {column} is {value} but the journal says {was}" \
        in problems(run.ledger)


def test_columns_a_resize_and_a_bind_change_are_journaled(run):
    ledger = run.ledger
    token, _ = ledger.mint("physics", 36_000)
    hold = ledger.reserve(token, HoldRequest(gpus=1, seconds=600, gpu_type="h100",
                                             partition="gpu,debug"))
    ledger.resize(hold.id, seconds=900, gpu_type="a100")
    ledger.bind(hold.id, "1002", partition="debug", qos="normal")  # same price: journaled too
    view = ledger.hold(hold.id)
    assert (view.seconds, view.rate_ppm, view.partition, view.qos) == (900, 600_000, "debug",
                                                                        "normal")
    assert ledger.verify_journal().ok
    edit(ledger, update(HO).where(HO.c.id == hold.id).values(rate_ppm=1_000_000,
                                                             partition="gpu,debug", qos=None))
    found = problems(ledger)
    assert f"hold {hold.id}: rate_ppm is 1000000 but the journal says 600000" in found
    assert f"hold {hold.id}: partition is gpu,debug but the journal says debug" in found
    assert f"hold {hold.id}: qos is None but the journal says normal" in found


# -- charges ----------------------------------------------------------------------------------------

def test_charge_usage_edit_is_named(run):
    seq = journal_row(run.ledger, "charge")
    lighter = {**USAGE, "gpus": [{**g, "held_ms": 1} for g in USAGE["gpus"]]}
    edit(run.ledger, update(CH).where(CH.c.key == run.key).values(usage=lighter))
    assert f"charge {run.key!r}: usage is not the record journal row {seq} was written with " \
           "(its sha256 differs)" in problems(run.ledger)


@pytest.mark.parametrize("column,named,value", [("job_id", "job", "999"),
                                                ("node", "node", "node2")])
def test_charge_job_and_node_edits_are_named(run, column, named, value):
    seq = journal_row(run.ledger, "charge")
    was = run.ledger.charges(run.hold.id)[0][column]
    edit(run.ledger, update(CH).where(CH.c.key == run.key).values({column: value}))
    assert f"charge {run.key!r}: {named} is {value} but journal row {seq} says {was}" \
        in problems(run.ledger)


# -- run -> hold links and post keys ----------------------------------------------------------------

def test_link_edit_is_named(run):
    ledger = run.ledger
    token, _ = ledger.mint("physics", 36_000, scopes=Scopes(users=("alice",)))
    other = ledger.reserve(token, HoldRequest(gpus=1, seconds=60, gpu_type="h100",
                                              user="alice"))
    seq = journal_row(ledger, "link")
    edit(ledger, update(IDEM).where(IDEM.c.key == "job:1001:0").values(
        result={"hold": other.id}))
    assert ledger.linked_hold("1001", 0) == other.id  # the epilog would charge this hold
    assert f"link 'job:1001:0': hold is {other.id} but journal row {seq} says {run.hold.id}" \
        in problems(ledger)


def test_link_inserted_or_deleted_is_named(run):
    ledger = run.ledger
    edit(ledger, insert(IDEM).values(
        key="job:1002:0", op="link", fingerprint=fingerprint({"op": "link", "hold": run.hold.id}),
        result={"hold": run.hold.id}, created_at=ledger.clock()))
    edit(ledger, delete(IDEM).where(IDEM.c.key == "job:1001:0"))
    found = problems(ledger)
    assert "link 'job:1002:0' (idempotency record) has no link row in the journal" in found
    assert f"link 'job:1001:0' to hold {run.hold.id} (journal row " \
           f"{journal_row(ledger, 'link')}) is missing from the idempotency table" in found


def test_post_key_edits_are_named(run):
    """A post record answers a replayed post instead of charging: one inserted for a charge
    that never happened would let the job go unpaid."""
    ledger, hold = run.ledger, run.hold
    seq = journal_row(ledger, "charge")
    result = ledger.hold(hold.id).to_dict()
    edit(ledger, insert(IDEM).values(
        key=f"{hold.id}:1001:0:node2", op="post", fingerprint="0" * 64, result=result,
        created_at=ledger.clock()))
    edit(ledger, update(IDEM).where(IDEM.c.key == run.key).values(
        result={**result, "charged": 1}))
    found = problems(ledger)
    assert f"post key '{hold.id}:1001:0:node2' (idempotency record) has no charge row in the " \
           "journal: a replay would answer a post that charged nothing" in found
    assert f"post key {run.key!r}: hold {hold.id}, charged 1, but journal row {seq} says " \
           f"hold {hold.id}, charged 500" in found
    edit(ledger, delete(IDEM).where(IDEM.c.key == run.key))
    assert f"charge {run.key!r} of hold {hold.id} (journal row {seq}) has no post record in " \
           "the idempotency table" in problems(ledger)


# -- rates, tiers, scopes ---------------------------------------------------------------------------

def test_rate_edits_are_named(run):
    ledger = run.ledger
    seq = [r["seq"] for r in ledger.journal() if r["kind"] == "rate_set"
           and r["data"]["gpu_type"] == "h100"][-1]
    edit(ledger, update(R).where(R.c.gpu_type == "h100").values(rate_ppm=1))
    edit(ledger, insert(R).values(gpu_type="l40s", rate_ppm=1, updated_at=ledger.clock()))
    found = problems(ledger)
    assert f"rate h100: rate_ppm is 1 but journal row {seq} says 1000000" in found
    assert "rate l40s: in the rates table but set by no journal row" in found
    edit(ledger, delete(R).where(R.c.gpu_type == "a100"))
    assert any(p.startswith("rate a100 (journal row ") and
               p.endswith(") is missing from the rates table") for p in problems(ledger))


def test_multiplier_edits_are_named(run):
    ledger = run.ledger
    seq = [r["seq"] for r in ledger.journal() if r["kind"] == "multiplier_set"
           and r["data"]["name"] == "premium"][-1]
    edit(ledger, update(MU).where(MU.c.kind == "qos", MU.c.name == "premium")
         .values(multiplier_ppm=1))
    edit(ledger, delete(MU).where(MU.c.kind == "partition"))
    found = problems(ledger)
    assert f"multiplier qos premium: multiplier_ppm 1, zone None, but journal row {seq} says " \
           "2000000, zone None" in found
    assert any(p.startswith("multiplier partition scavenger (journal row ") for p in found)


def test_multiplier_unset_and_offpeak_zone_are_followed(run):
    ledger = run.ledger
    ledger.set_multiplier("offpeak", "22:00-06:00", 500_000, zone="Europe/Berlin")
    ledger.unset_multiplier("partition", "scavenger")
    assert ledger.verify_journal().ok
    edit(ledger, update(MU).where(MU.c.kind == "offpeak").values(zone="UTC"))
    edit(ledger, insert(MU).values(kind="partition", name="scavenger", multiplier_ppm=1,
                                   updated_at=ledger.clock()))
    found = problems(ledger)
    assert any(p.startswith("multiplier offpeak 22:00-06:00: multiplier_ppm 500000, zone UTC, "
                            "but journal row ") for p in found)
    assert "multiplier partition scavenger: in the multipliers table but set by no journal " \
           "row" in found


def test_token_scopes_edit_is_named(run):
    edit(run.ledger, update(T).where(T.c.id == run.token_id).values(scopes={}))
    assert f"token {run.token_id}: scopes is {{}} but the journal says {{'users': ['alice']}}" \
        in problems(run.ledger)
    # the widened copy is what a resize checks the job against
    edit(run.ledger, update(T).where(T.c.id == run.token_id).values(scopes={"users": ["bob"]}))
    assert f"token {run.token_id}: scopes is {{'users': ['bob']}} but the journal says " \
           "{'users': ['alice']}" in problems(run.ledger)


# -- the journal's own head exports (no head file) --------------------------------------------------

def test_recomputed_history_is_named_against_the_journals_head_export(run, tmp_path):
    ledger = run.ledger
    ledger.generate_attest_key("attest1")
    result, head = ledger.export_head()
    assert result.ok
    export = journal_row(ledger, "head_export")
    ledger.post(run.hold.id, 100, key=f"{run.hold.id}:1001:0:node2", final=False)
    rewrite(ledger, 3, reason="rewritten")  # every later hash and link recomputed, head too
    found = stranger(ledger, tmp_path).verify_journal()  # no last-head.json, no --against
    assert not found.ok and found.chain_intact and found.bad_seq == export
    assert found.problem.startswith(
        f"row {export}: head_export recorded row {head['seq']} with hash {head['hash']}, but "
        f"row {head['seq']} now hashes to ")
    assert found.problem.endswith("history rewritten since that export")


# -- journals from before data version 2 ------------------------------------------------------------

def _strip(ledger, kind: str, *keys: str) -> None:
    """Rewrite (rehashing the chain) every ``kind`` row without ``keys`` in its data, as a
    journal written before version 2 has them."""
    for r in rows(ledger):
        if r.kind != kind:
            continue
        with ledger.engine.connect() as conn:
            data = json.loads(conn.execute(text("SELECT data FROM journal WHERE seq = :s"),
                                           {"s": r.seq}).scalar())
        rewrite(ledger, r.seq, data=canonical_data({k: v for k, v in data.items()
                                                    if k not in keys}))


def test_rows_from_before_version_2_are_checked_where_they_tell(run):
    ledger = run.ledger
    _strip(ledger, "reserve", "v", "cluster")
    _strip(ledger, "charge", "usage_sha256")
    assert ledger.verify_journal().ok
    # what an old reserve row says is still checked; what it does not say is not
    edit(ledger, update(HO).where(HO.c.id == run.hold.id).values(qos="normal", gpus=1))
    found = problems(ledger)
    assert found == [f"hold {run.hold.id}: gpus is 1 but the journal says 2"]


def test_a_row_after_version_2_without_its_data_is_named(run):
    """Deleting the version-2 keys from a row (rehashing the chain) leaves it named: rows
    after the first with version-2 data must carry it."""
    ledger = run.ledger
    token, _ = ledger.mint("physics", 36_000)
    hold = ledger.reserve(token, HoldRequest(gpus=1, seconds=60, gpu_type="h100"))
    seq = journal_row(ledger, "reserve")
    first = next(r.seq for r in rows(ledger) if r.kind == "reserve")
    with ledger.engine.connect() as conn:
        data = json.loads(conn.execute(text("SELECT data FROM journal WHERE seq = :s"),
                                       {"s": seq}).scalar())
    del data["v"]
    rewrite(ledger, seq, data=canonical_data(data))
    assert f"row {seq}: reserve of hold {hold.id} lacks its 'v' data, which every reserve " \
           f"row since row {first} carries" in problems(ledger)


def test_links_made_before_0007_are_journaled_by_it(db_url, tmp_path, clock):
    engine = db.make_engine(db_url)
    migrate._upgrade(engine, migrate.LEDGER, "0006")
    ledger = Ledger(engine, keys_dir=tmp_path / "keys", clock=clock)
    ledger.bootstrap()
    ledger.generate_key("k1")
    ledger.create_account("physics")
    ledger.set_rate("h100", 1_000_000)
    token, _ = ledger.mint("physics", 36_000)
    hold = ledger.reserve(token, HoldRequest(gpus=1, seconds=600, gpu_type="h100"))
    for job in ("77", "78"):  # as links were made before: the idempotency record alone
        edit(ledger, insert(IDEM).values(
            key=f"job:{job}:0", op="link", fingerprint=fingerprint({"op": "link",
                                                                     "hold": hold.id}),
            result={"hold": hold.id}, created_at=clock()))
    assert "link 'job:77:0' (idempotency record) has no link row in the journal" \
        in problems(ledger)
    migrate.upgrade(engine)
    assert ledger.verify_journal().ok
    assert ledger.linked_hold("77", 0) == hold.id
    assert [r["data"] for r in ledger.journal() if r["kind"] == "link"] == [
        {"key": "job:77:0", "hold": hold.id}, {"key": "job:78:0", "hold": hold.id}]
    with engine.connect() as conn:  # down and up again: no link is journaled twice
        command.downgrade(migrate._alembic(conn), "0006")
        conn.commit()
    migrate.upgrade(engine)
    assert ledger.verify_journal().ok
    assert len([r for r in ledger.journal() if r["kind"] == "link"]) == 2
    edit(ledger, update(IDEM).where(IDEM.c.key == "job:78:0").values(result={"hold": "x"}))
    assert any(p.startswith("link 'job:78:0': hold is x but journal row ")
               for p in problems(ledger))
    engine.dispose()
