"""The job-request reader (ledger/jobrequest.py): Slurm's request fields in, what the job asks
for (or the refusal the user reads) out. job_submit.lua forwards; everything here is what it
used to count itself (tests/test_daemon_lua.py runs the two together)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ledger import jobrequest as jr
from ledger.jobrequest import INFINITE, NO_VAL, NO_VAL16, Partition, Refused, SlurmJob

GPU = Partition("gpu", default_time=60, max_time=1440, max_nodes=None, total_nodes=4)
SHORT = Partition("short", default_time=None, max_time=240, max_nodes=2, total_nodes=3)
NOLIMIT = Partition("nolimit")


def read(parts=(GPU,), token=True, free=(), **fields) -> jr.JobRequest | str:
    return jr.read_submit(SlurmJob(**fields), parts, token=token, free_accounts=free)


# -- Slurm's fields on the wire --------------------------------------------------------------

def test_candidates_carry_limits_and_unset_is_none():
    parts = jr.candidates(f"gpu:60:1440::4,short:{NO_VAL}:240:2:3,nolimit::{INFINITE}::")
    assert parts == (GPU, SHORT, NOLIMIT)
    assert jr.candidates("") == () and jr.candidates(None) == ()
    for bad in ("gpu:60", "gpu:x:1::", ":1:2:3:4", "gpu:-1:::"):
        with pytest.raises(jr.InvalidInput):
            jr.candidates(bad)
    with pytest.raises(jr.InvalidInput, match="more than 64"):
        jr.candidates(",".join(f"p{i}::::" for i in range(65)))


def test_fields_from_the_wire():
    job = SlurmJob.from_fields({"tres_per_node": "gres/gpu:2", "tres_per_task": "",
                                "time_limit": "60", "min_nodes": "", "account": "physics",
                                "rec_tres_per_job": "gres:gpu:1", "rec_max_nodes": "3"})
    assert job == SlurmJob(tres_per_node="gres/gpu:2", tres_per_task="", time_limit=60,
                           account="physics")
    assert SlurmJob.from_fields({"rec_tres_per_job": "gres:gpu:1", "rec_max_nodes": "3"},
                                jr.RECORD_PREFIX) == SlurmJob(tres_per_job="gres:gpu:1",
                                                              max_nodes=3)
    for bad in ("-1", "1.5", "12345678901", "x"):
        with pytest.raises(jr.InvalidInput, match="time_limit"):
            SlurmJob.from_fields({"time_limit": bad})


# -- what a job asks for ---------------------------------------------------------------------

@pytest.mark.parametrize("fields,parts,gpus,gtype,seconds", [
    ({"tres_per_node": "gres:gpu:h100:2", "time_limit": 60}, (GPU,), 2, "h100", 3600),
    ({"tres_per_node": "gres/gpu:h100:2", "time_limit": 60}, (GPU,), 2, "h100", 3600),
    ({"tres_per_node": "gres:gpu:2,gres:nic:1", "time_limit": 30}, (GPU,), 2, None, 1800),
    ({"tres_per_job": "gres:gpu:a100:3"}, (GPU,), 3, "a100", 3600),  # DefaultTime 60
    ({"tres_per_node": "gres:gpu:h100:2", "min_nodes": 2, "max_nodes": 2, "time_limit": 10},
     (GPU,), 4, "h100", 600),
    ({"tres_per_task": "gres:gpu:1", "num_tasks": 3, "time_limit": 10}, (GPU,), 3, None, 600),
    ({"tres_per_task": "gres/gpu:h100:1", "ntasks_per_node": 2, "min_nodes": 2,
      "max_nodes": 2, "time_limit": 10}, (GPU,), 4, "h100", 600),
    ({"tres_per_socket": "gres:gpu:1", "sockets_per_node": 2, "time_limit": 10}, (GPU,), 2,
     None, 600),
    ({"tres_per_node": "gres:gpu:3g.40gb:2", "time_limit": 60}, (GPU,), 2, "3g.40gb", 3600),
    ({"tres_per_node": "gres:gpu:h100"}, (SHORT,), 1, "h100", 4 * 3600),  # MaxTime
    ({"tres_per_node": "gres:gpu:h100", "time_limit": 600}, (SHORT,), 1, "h100", 4 * 3600),
    ({"tres_per_node": "gres:gpu:1", "num_tasks": 8, "time_limit": 10}, (GPU,), 4, None, 600),
    ({"tres_per_node": "gres:gpu:1", "num_tasks": 8, "time_limit": 10}, (SHORT,), 2, None,
     600),  # MaxNodes=2
    ({"tres_per_node": "gres:gpu:1", "num_tasks": 8, "time_limit": 10}, (NOLIMIT,), 8, None,
     600),  # no cap: one node per task
    ({"tres_per_node": "gres:gpu:1", "min_nodes": 1, "max_nodes": 3, "time_limit": 10}, (GPU,),
     3, None, 600),
    ({"tres_per_node": "gres:gpu:H100:2", "time_limit": 60}, (GPU,), 2, "h100", 3600),
    ({"tres_per_node": "gres/gpu=2", "time_limit": 60}, (GPU,), 2, None, 3600),
    # the longest default over -p short,gpu; unset NO_VAL16 counts are unset
    ({"tres_per_node": "gres:gpu:1", "ntasks_per_node": NO_VAL16, "min_nodes": NO_VAL},
     (SHORT, GPU), 1, None, 4 * 3600),
])
def test_request_forms(fields, parts, gpus, gtype, seconds):
    got = read(parts, **fields)
    assert (got.gpus, got.gpu_type, got.seconds, got.tasks, got.gres) == (gpus, gtype, seconds,
                                                                          1, "gpu")
    assert got.partition == ",".join(p.name for p in parts)


def test_shares_are_per_node_and_never_mixed_with_gpus():
    got = read(tres_per_node="gres:shard:h100:2", min_nodes=2, max_nodes=2, time_limit=5)
    assert (got.gres, got.gpus, got.per_node, got.gpu_type, got.nodes) == ("shard", 4, 2,
                                                                          "h100", 2)
    assert read(tres_per_node="gres/mps:50", time_limit=5).per_node == 50
    for fields, text in (
            ({"tres_per_task": "gres/mps:25", "num_tasks": 2}, "asked per node, with --gres=mps:N"),
            ({"tres_per_job": "gres:shard:h100:4"}, "asked per node, with --gres=shard:N"),
            ({"tres_per_node": "gres:gpu:1,gres:shard:1"}, "not both"),
            ({"tres_per_node": "gres:shard:1", "tres_per_job": "gres:gpu:1"}, "not both"),
            ({"tres_per_node": "gres:shard:1,gres:mps:1"}, "not both"),
            ({"tres_per_node": "gres:gpu:h100:1", "tres_per_job": "gres:gpu:a100:1"},
             "one GPU type per job, not h100 and a100"),
            ({"tres_per_node": "gres:gpu:x:y"}, "cannot read the GPU request gres:gpu:x:y")):
        with pytest.raises(Refused, match=text) as exc:
            read(time_limit=5, **fields)
        assert exc.value.reason == jr.REQUEST


def test_time_limits_and_their_refusals():
    assert read((SHORT, GPU), tres_per_node="gres:gpu:1").seconds == 4 * 3600
    assert read((GPU, NOLIMIT), tres_per_node="gres:gpu:1", time_limit=5000).seconds \
        == 5000 * 60  # one candidate without MaxTime: nothing to clamp to
    for parts, fields, text in (
            ((NOLIMIT,), {}, ("partition nolimit has no default or maximum time limit; give "
                              "the job one with -t/--time (e.g. -t 2:00:00)")),
            ((GPU,), {"time_limit": INFINITE}, ("GPU jobs need a finite time limit; give one "
                                                "with -t/--time (e.g. -t 2:00:00)")),
            ((), {}, "the job has no time limit; give it one with -t/--time (e.g. -t 2:00:00)")):
        with pytest.raises(Refused) as exc:
            read(parts, tres_per_node="gres:gpu:1", **fields)
        assert str(exc.value) == text and exc.value.reason == jr.TIME_LIMIT


def test_arrays():
    assert read(tres_per_node="gres:gpu:1", time_limit=6, array_inx="0-9:2,20%2").tasks == 6
    with pytest.raises(Refused, match="cannot read the array spec") as exc:
        read(tres_per_node="gres:gpu:1", time_limit=6, array_inx="x-1")
    assert exc.value.reason == jr.REQUEST


def test_submit_decides_in_job_submits_order():
    """Readable first (even a free account's request), then free, then no GPU, then the
    token, then the time limit."""
    with pytest.raises(Refused, match="not both"):
        read(free=("freebie",), account="freebie", tres_per_node="gres:gpu:1,gres:shard:1")
    assert read(free=("freebie",), account="freebie", tres_per_node="gres:gpu:1",
                token=False, time_limit=INFINITE) == jr.FREE
    assert read(tres_per_node="gres:gpu:0,gres:nic:2", token=False) == jr.NO_GPU
    assert read(tres_per_node="gres:gpunic:1", token=False) == jr.NO_GPU
    with pytest.raises(Refused) as exc:
        read(tres_per_task="gres:gpu:2", num_tasks=3, token=False, time_limit=INFINITE)
    assert exc.value.reason == jr.NO_TOKEN
    assert str(exc.value).startswith("this job asks for 6 GPU(s) but carries no GPU token; "
                                     "submit it with --gpu-token=@FILE")


def test_hold_request_carries_who_and_where():
    req = read((SHORT, GPU, SHORT), tres_per_node="gres:shard:2", time_limit=5, array_inx="0-2")
    hold = req.hold(user="alice", account="physics", qos="high", cluster="c1")
    assert (hold.gpus, hold.seconds, hold.tasks, hold.gres, hold.per_node, hold.partition,
            hold.user, hold.account, hold.qos, hold.cluster) == (
        2, 300, 3, "shard", 2, "short,gpu", "alice", "physics", "high", "c1")


# -- generated requests against a model of the rule -----------------------------------------

COUNTS = st.integers(1, 8)
SHAPE = st.one_of(st.none(), st.just(NO_VAL), st.integers(1, 6))
SHAPE16 = st.one_of(st.none(), st.just(NO_VAL16), st.integers(1, 4))


@given(st.sampled_from(jr.TRES_FIELDS), COUNTS, st.sampled_from(["gres:", "gres/", ""]),
       SHAPE, SHAPE, SHAPE, SHAPE16, SHAPE16, st.sampled_from([(GPU,), (SHORT,), (NOLIMIT,),
                                                                (SHORT, GPU)]))
def test_gpus_are_the_count_times_the_shape(field, n, prefix, lo, hi, tasks, per_node, sockets,
                                            parts):
    """GPUs = count × nodes (per node), × 1 (per job), × tasks, × sockets × nodes, where nodes
    is -N's upper end, else one per task up to the candidates' MaxNodes, at least -N's lower
    end; tasks is -n, else tasks per node × nodes."""
    def unset(v, marker=NO_VAL):
        return None if v in (None, marker) else v

    lo_, hi_, tasks_ = unset(lo), unset(hi), unset(tasks)
    nodes = hi_ or max(lo_ or 1, min(tasks_ or 1, jr.node_cap(parts) or 10**9))
    tasks_ = tasks_ or (unset(per_node, NO_VAL16) or 1) * nodes
    times = {"tres_per_node": nodes, "tres_per_job": 1, "tres_per_task": tasks_,
             "tres_per_socket": (unset(sockets, NO_VAL16) or 1) * nodes}[field]
    job = SlurmJob(**{field: f"{prefix}gpu:{n}"}, min_nodes=lo, max_nodes=hi, num_tasks=tasks,
                   ntasks_per_node=per_node, sockets_per_node=sockets, time_limit=10)
    got = jr.read_submit(job, parts, token=True)
    assert got.gpus == n * times and got.nodes == nodes and got.seconds == 600


ITEM = st.one_of(
    st.tuples(st.sampled_from(["", "gres:", "gres/"]), st.sampled_from(["gpu", "shard", "mps"]),
              st.none() | st.sampled_from(["h100", "A100", "3g.40gb"]),
              st.none() | st.integers(0, 9)).map(
        lambda t: t[0] + t[1] + (f":{t[2]}" if t[2] else "") + (f":{t[3]}" if t[3] is not None
                                                                 else "")),
    st.sampled_from(["gres:nic:1", "gres:gpunic:2", "gpu:x:y", "gres/gpu=0", "gpu(x):1"]))


@given(st.dictionaries(st.sampled_from(jr.TRES_FIELDS), st.lists(ITEM, min_size=1, max_size=3)
                       .map(",".join), max_size=3), st.booleans())
def test_the_shortcut_never_lets_a_priced_job_pass(tres, token):
    """A job the CPU-job shortcut passes asks for nothing; a job it stops is held, free,
    refused, or (only when every GPU count is zero) nothing — never a job that pays 0."""
    job = SlurmJob(**tres, time_limit=10)
    try:
        got = jr.read_submit(job, (GPU,), token=token)
    except Refused:
        assert jr.asks_gpu(job)
        return
    if not jr.asks_gpu(job):
        assert got == jr.NO_GPU
    else:
        assert isinstance(got, jr.JobRequest) and got.gpus > 0


# -- scontrol update ---------------------------------------------------------------------------

HELD = SlurmJob(tres_per_node="gres:gpu:h100:2", min_nodes=1, account="physics")


def modify(update, record=HELD, parts=(GPU,), held=True, free=()):
    return jr.read_modify(update, record, parts, held=held, free_accounts=free)


def test_an_update_reprices_what_it_changes():
    assert modify(SlurmJob(time_limit=120)) == jr.Change(seconds=7200)
    assert modify(SlurmJob(time_limit=NO_VAL)).nothing
    assert modify(SlurmJob()).nothing
    fewer = modify(SlurmJob(tres_per_node="gres/gpu:a100:1"))
    assert (fewer.gpus, fewer.gpu_type, fewer.gres, fewer.per_node) == (1, "a100", "gpu", None)
    wider = modify(SlurmJob(min_nodes=3, max_nodes=3))  # the record's GRES, the new nodes
    assert (wider.gpus, wider.gpu_type) == (6, "h100")
    shards = modify(SlurmJob(tres_per_node="gres:shard:6"))
    assert (shards.gres, shards.gpus, shards.per_node) == ("shard", 6, 6)
    assert modify(SlurmJob(partition="gpu,short", account="chem")) == jr.Change(
        partition="gpu,short", account="chem")
    assert modify(SlurmJob(tres_per_node="")).void  # --gres cleared: no GPU any more
    assert modify(SlurmJob(tres_per_node="gres:gpu:0")).void


def test_update_refusals():
    with pytest.raises(Refused, match="finite time limit") as exc:
        modify(SlurmJob(time_limit=INFINITE))
    assert exc.value.reason == jr.TIME_LIMIT
    per_task = SlurmJob(tres_per_task="gres:gpu:1", account="physics")
    for change in (SlurmJob(min_nodes=2, max_nodes=2), SlurmJob(tres_per_task="gres:gpu:2")):
        with pytest.raises(Refused, match="per task or per socket") as exc:
            modify(change, per_task)
        assert exc.value.reason == jr.DENIED
    assert modify(SlurmJob(time_limit=20), per_task) == jr.Change(seconds=1200)
    assert modify(SlurmJob(min_nodes=2), SlurmJob(tres_per_task="gres:gpu:0",
                                                  tres_per_node="gres:gpu:1")).gpus == 2


def test_gpus_cannot_be_added_to_a_job_without_a_hold():
    plain = SlurmJob(account="physics")
    with pytest.raises(Refused, match="GPUs cannot be added") as exc:
        modify(SlurmJob(tres_per_node="gres:shard:2"), plain, held=False)
    assert exc.value.reason == jr.DENIED
    assert modify(SlurmJob(tres_per_node="gres:gpu:2"), SlurmJob(account="freebie"), held=False,
                  free=("freebie",)).nothing
    assert modify(SlurmJob(tres_per_node="gres:gpu:0"), plain, held=False).nothing
    assert modify(SlurmJob(time_limit=5), plain, held=False).nothing


# -- what a run was given (PrologSlurmctld) ------------------------------------------------

def test_allocation_and_the_run_request():
    assert jr.allocation({"h100": 2}, 1, None) == jr.Allocation(2, "h100", "gpu", None)
    assert jr.allocation({"h100": 1, None: 1}, 1, None).gpu_type is None  # an untyped rest
    assert jr.allocation({"h100": 1, "a100": 1}, 2, None).gpu_type is None
    assert jr.allocation({}, 1, "gres:nic:1") == jr.Allocation(0, None, "gpu", None)
    assert jr.allocation({}, 3, "gres:shard:h100:2,gres:nic:1") == jr.Allocation(
        6, "h100", "shard", 2)
    assert jr.shares_of("gres/mps:40") == ("mps", 40, None)
    assert jr.shares_of("gres:shard:x:y") is None and jr.shares_of(None) is None
    run = jr.run_request(jr.allocation({"a100": 3}, 1, None), None)
    assert (run.gpus, run.gpu_type, run.seconds, run.tasks) == (3, "a100", 3600, 1)
    assert jr.run_request(jr.allocation({}, 1, None), 30).gpus == 1  # at least one, a minute
    assert jr.run_request(jr.allocation({}, 1, None), 30).seconds == 60
