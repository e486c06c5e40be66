"""The Slurm adapter against recorded 22.05 and 24.11 output and the other releases' fixtures.

22.05/ and 24.11-recorded/ were recorded on real clusters (24.11-recorded by
fixtures/slurm/record.sh, whose README names the job ids); 24.11/ was written by hand
from Slurm's source and is kept for its synthetic two-node job 3001; 23.02/ 23.11/ 24.05/
25.05/ 25.11/ 26.05/ are derived from it by fixtures/slurm/derive.py (each README names the
tag and source files), so every release's output is read by the same assertions.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from slurm_plugin import marks, slurm

FIX = Path(__file__).parent / "fixtures" / "slurm"
# every release the adapter reads: recorded (22.05), written (24.11), derived (the rest)
VERSIONS = ["22.05", "23.02", "23.11", "24.05", "24.11", "25.05", "25.11", "26.05"]


def release(version: str) -> tuple[int, int]:
    major, minor = version.split(".")
    return int(major), int(minor)


def load(version: str, name: str) -> str:
    return (FIX / version / name).read_text()


@pytest.mark.parametrize("version", VERSIONS)
def test_scontrol_jobs(version):
    jobs = {j.job_id: j for j in slurm.parse_scontrol_jobs(load(version, "scontrol_show_job.txt"))}
    done = jobs["2423"]
    assert (done.state, done.restarts, done.nodes, done.gpus) == ("COMPLETED", 0, ["vm"],
                                                                  {"h100": 2})
    assert marks.parse(done.admin_comment) == marks.HoldMark("hold_ba67fdf2214357f579fa",
                                                             "tok_e7ad0f35a8180997483e")
    assert done.ran and not done.active and done.time_limit_s == 300
    assert (done.user, done.account) == ("alice", "physics")
    task = jobs["2427"]
    assert (task.array_job_id, task.array_task, task.display_id) == ("2424", "1", "2424_1")
    assert task.gpus == {"a100": 1}
    requeued = jobs["2425"]
    assert (requeued.state, requeued.restarts, requeued.gpu_idx) == ("RUNNING", 1,
                                                                     {"vm": {0: "h100"}})
    assert requeued.active
    rest = jobs["2428"]
    assert (rest.state, rest.array_task, rest.nodes, rest.ran) == ("PENDING", "1-3%1", [], False)
    assert rest.gpus == {"h100": 1}  # 24.11: AllocTRES=(null), so from ReqTRES
    assert jobs["2429"].gpu_idx == {"vm": {1: "h100"}}


def test_24_11_two_node_job():
    jobs = {j.job_id: j for j in slurm.parse_scontrol_jobs(load("24.11", "scontrol_show_job.txt"))}
    j = jobs["3001"]
    assert j.nodes == ["gpu01", "gpu02"] and j.gpus == {"h100": 8} and j.restarts == 2
    assert j.gpu_idx == {"gpu01": {0: "h100", 1: "h100", 2: "h100", 3: "h100"},
                         "gpu02": {0: "h100", 1: "h100", 2: "h100", 3: "h100"}}
    assert j.time_limit_s == 86400 and j.elapsed_s == 3723


@pytest.mark.parametrize("version", VERSIONS)
def test_sacct_runs(version):
    recs = slurm.parse_sacct(load(version, "sacct.txt"), slurm.sacct_fields(release(version)))
    by = {}
    for r in recs:
        by.setdefault(r.job_id, []).append(r)
    first, second = by["2425"]
    assert (first.state, first.restarts, first.superseded, first.active) == ("REQUEUED", 0,
                                                                             True, False)
    assert (first.elapsed_s, first.gpus) == (12, {"h100": 1})
    assert (second.state, second.restarts, second.active) == ("RUNNING", 1, True)
    cancelled = by["2267"][0]
    assert (cancelled.state, cancelled.ran, cancelled.nodes) == ("CANCELLED", False, [])
    assert by["2270"][0].admin_comment == marks.DEFERRED
    assert by["2426"][0].display_id == "2424_0" and by["2426"][0].array_job_id == "2424"
    assert (by["2428"][0].display_id, by["2428"][0].array_task) == ("2428_[1-3%1]", "1-3%1")
    if version != "22.05":  # 3001 came with the hand-written 24.11 files
        assert by["3001"][0].nodes == ["gpu01", "gpu02"] and by["3001"][0].state == "NODE_FAIL"


@pytest.mark.parametrize("version", VERSIONS)
def test_squeue(version):
    recs = {r.display_id: r for r in slurm.parse_squeue(load(version, "squeue.txt"))}
    assert recs["2428_0"].job_id == "2429" and recs["2428_0"].array_job_id == "2428"
    assert recs["2425"].array_job_id is None and recs["2425"].nodes == ["vm"]
    assert recs["2428_[1-3%1]"].state == "PENDING"


# -- Slurm 24.11.5, recorded (24.11-recorded/README.md: which job id is which) ---------------

REC = "24.11-recorded"
TOKEN = "tok_d67e7c5e1c29bec92232"


def test_recorded_24_11_version():
    assert load(REC, "version.txt").strip() == "slurm-wlm 24.11.5"


def test_recorded_24_11_scontrol():
    jobs = {j.job_id: j for j in slurm.parse_scontrol_jobs(load(REC, "scontrol_show_job.txt"))}
    assert sorted(jobs, key=int) == [str(i) for i in range(11, 20)]
    for j in jobs.values():
        assert (j.user, j.account, j.time_limit_s, j.source) == ("alice", "physics", 300,
                                                                 "scontrol")
    done = jobs["11"]  # DONE: 2 x h100, completed
    assert (done.state, done.restarts, done.nodes, done.gpus) == ("COMPLETED", 0, ["fresh"],
                                                                  {"h100": 2})
    assert done.ran and not done.active and done.elapsed_s == 5 and done.array_job_id is None
    assert done.gpu_idx == {"fresh": {}}  # GRES= is empty once the job has ended
    assert marks.parse(done.admin_comment) == marks.HoldMark("hold_a89b92fd7c20e0602199", TOKEN)
    # ARRAY 12_[0-2]: a100, the array job id is the last task's raw id
    tasks = {jobs[i].array_task: jobs[i] for i in ("12", "13", "14")}
    assert {t: r.job_id for t, r in tasks.items()} == {"0": "13", "1": "14", "2": "12"}
    for t, r in tasks.items():
        assert (r.array_job_id, r.display_id, r.state, r.gpus) == ("12", f"12_{t}", "COMPLETED",
                                                                   {"a100": 1})
        assert marks.parse(r.admin_comment) == marks.HoldMark("hold_bdacf01e5dfce2e24987", TOKEN)
    req = jobs["15"]  # REQ: requeued once, running again on h100 index 0
    assert (req.state, req.restarts, req.active, req.ran) == ("RUNNING", 1, True, True)
    assert (req.gpus, req.gpu_idx, req.elapsed_s) == ({"h100": 1}, {"fresh": {0: "h100"}}, 9)
    assert marks.parse(req.admin_comment) == marks.HoldMark("hold_13f61d62cc2e995a84b1", TOKEN)
    rest, first = jobs["16"], jobs["17"]  # THR 16_[0-3%1]: task 0 runs on h100 index 1
    assert (first.display_id, first.state, first.gpu_idx) == ("16_0", "RUNNING",
                                                              {"fresh": {1: "h100"}})
    assert (rest.display_id, rest.array_task, rest.state, rest.reason) == (
        "16_1-3%1", "1-3%1", "PENDING", "JobArrayTaskLimit")
    assert (rest.nodes, rest.ran, rest.active, rest.start) == ([], False, True, None)
    assert rest.gpus == {"h100": 1}  # AllocTRES=(null) while pending: from ReqTRES
    assert rest.admin_comment == first.admin_comment
    for jid in ("18", "19"):  # CANC, DEFER: held, cancelled while pending
        c = jobs[jid]  # StartTime is the cancel time, but NodeList= is empty
        assert (c.state, c.reason, c.nodes, c.ran, c.active) == ("CANCELLED", "JobHeldUser", [],
                                                                 False, False)
        assert (c.start, c.gpu_idx, c.gpus) == (None, {}, {"h100": 1})
    assert marks.parse(jobs["18"].admin_comment) == marks.HoldMark("hold_61ed0f93c3ca6b37dd31",
                                                                   TOKEN)
    assert marks.parse(jobs["19"].admin_comment) == marks.DEFERRED


def test_recorded_24_11_sacct():
    recs = slurm.parse_sacct(load(REC, "sacct.txt"))
    by: dict[str, list[slurm.JobRecord]] = {}
    for r in recs:
        by.setdefault(r.job_id, []).append(r)
    assert {k: len(v) for k, v in by.items()} == {"11": 1, "12": 1, "13": 1, "14": 1, "15": 2,
                                                 "16": 1, "17": 1, "18": 1, "19": 1}
    done = by["11"][0]
    assert (done.state, done.gpus, done.elapsed_s, done.nodes) == ("COMPLETED", {"h100": 2}, 5,
                                                                   ["fresh"])
    assert marks.parse(done.admin_comment) == marks.HoldMark("hold_a89b92fd7c20e0602199", TOKEN)
    assert [(by[i][0].display_id, by[i][0].gpus) for i in ("13", "14", "12")] == [
        ("12_0", {"a100": 1}), ("12_1", {"a100": 1}), ("12_2", {"a100": 1})]
    first, second = by["15"]  # the REQUEUED run first, then the running one
    assert (first.state, first.restarts, first.superseded, first.active) == ("REQUEUED", 0,
                                                                             True, False)
    assert (first.elapsed_s, first.gpus, first.ran) == (11, {"h100": 1}, True)
    assert marks.parse(first.admin_comment) == marks.HoldMark("hold_13f61d62cc2e995a84b1", TOKEN)
    assert (second.state, second.restarts, second.active, second.superseded) == ("RUNNING", 1,
                                                                                 True, False)
    assert second.admin_comment == ""  # sacct has AdminComment only once a job has ended
    assert second.start > first.end
    rest = by["16"][0]
    assert (rest.display_id, rest.array_job_id, rest.array_task) == ("16_[1-3%1]", "16", "1-3%1")
    assert (rest.state, rest.nodes, rest.gpus, rest.active) == ("PENDING", [], {}, True)
    assert (by["17"][0].display_id, by["17"][0].state) == ("16_0", "RUNNING")
    for jid in ("18", "19"):  # "CANCELLED by 0", Start None, NodeList "None assigned"
        c = by[jid][0]
        assert (c.state, c.start, c.nodes, c.ran, c.active) == ("CANCELLED", None, [], False,
                                                                False)
        assert c.end is not None and c.elapsed_s == 0
    assert marks.parse(by["18"][0].admin_comment) == marks.HoldMark("hold_61ed0f93c3ca6b37dd31",
                                                                    TOKEN)
    assert by["19"][0].admin_comment == marks.DEFERRED


def test_recorded_24_11_squeue():
    recs = {r.display_id: r for r in slurm.parse_squeue(load(REC, "squeue.txt"))}
    assert set(recs) == {"15", "16_0", "16_[1-3%1]"}
    assert (recs["15"].state, recs["15"].array_job_id, recs["15"].nodes) == ("RUNNING", None,
                                                                            ["fresh"])
    assert (recs["16_0"].job_id, recs["16_0"].array_job_id, recs["16_0"].array_task) == (
        "17", "16", "0")
    rest = recs["16_[1-3%1]"]
    assert (rest.job_id, rest.array_task, rest.state, rest.reason, rest.nodes) == (
        "16", "1-3%1", "PENDING", "JobArrayTaskLimit", [])
    # squeue -r (CommandReader.queue): the pending rest one line per task, all job id 16
    each = slurm.parse_squeue(load(REC, "squeue-r.txt"))
    assert sorted((r.display_id, r.job_id, r.array_task, r.state) for r in each) == [
        ("15", "15", None, "RUNNING"), ("16_0", "17", "0", "RUNNING"),
        ("16_1", "16", "1", "PENDING"), ("16_2", "16", "2", "PENDING"),
        ("16_3", "16", "3", "PENDING")]


def test_record_script_uses_the_adapters_formats():
    script = (FIX / "record.sh").read_text()
    assert f"SQUEUE_FORMAT='{slurm.SQUEUE_FORMAT}'" in script
    assert f"SACCT_FORMAT='{','.join(slurm.SACCT_FIELDS)}'" in script


def test_small_parsers():
    assert slurm.expand_hostlist("gpu[01-03,7],login1") == ["gpu01", "gpu02", "gpu03", "gpu7",
                                                           "login1"]
    assert slurm.expand_hostlist("None assigned") == []
    assert slurm.parse_duration("1-02:03:04") == 93784 and slurm.parse_duration("05:00") == 300
    assert slurm.gpus_in_tres("cpu=1,gres/gpu=3,gres/gpu:h100=1") == {"h100": 1, None: 2}
    assert slurm.gpus_in_tres("cpu=1,gres:gpu=2") == {None: 2}
    assert slurm.gres_indices("gpu:h100:1(IDX:0),gpu:a100:1(IDX:2)") == {0: "h100", 2: "a100"}
    assert slurm.gres_indices("gpu:2(IDX:0-1)") == {0: None, 1: None}
    assert slurm.base_state("CANCELLED by 0") == "CANCELLED"
    pairs = dict(slurm.split_fields("JobId=1 Command=/bin/x a b WorkDir=/tmp Comment=x=y z"))
    assert pairs["Command"] == "/bin/x a b" and pairs["WorkDir"] == "/tmp"
    with pytest.raises(slurm.SlurmError):
        slurm.parse_sacct("1|2|3\n")


def test_pyslurm_is_used_only_for_the_same_release(monkeypatch):
    import sys
    import types
    fake = types.SimpleNamespace(__version__="25.11.0")
    monkeypatch.setitem(sys.modules, "pyslurm", fake)
    assert not slurm.pyslurm_matches((22, 5))
    assert slurm.pyslurm_matches((25, 11))
    assert not slurm.pyslurm_matches(None)


def test_sacct_steps_name_the_runs_that_started_a_step():
    """Recorded on the 22.05 test cluster (``sacct -D -P -n --format=JobIDRaw``): 547 was
    cancelled in PrologSlurmctld, 548's first run requeued by it; 548's second run ran."""
    text = "547\n548\n548\n548.batch\n560\n560.extern\n560.0\n561\n"
    assert slurm.parse_sacct_steps(text) == {("548", 1), ("560", 0)}


def test_scontrol_tres_per_node_of_a_shard_job():
    """As Slurm 22.05 prints a running shard job (scontrol show job -d -o, test cluster)."""
    from slurm_plugin.slurm import parse_scontrol_job
    line = ("JobId=400 JobName=wrap UserId=root(0) Account=physics JobState=RUNNING "
            "Restarts=0 RunTime=00:00:04 TimeLimit=00:02:00 StartTime=2026-12-01T06:05:01 "
            "NodeList=vm NumNodes=1 TRES=cpu=1,node=1,billing=1 JOB_GRES=shard:3 Nodes=vm "
            "CPU_IDs=0 Mem=0 GRES=shard:3(IDX:0) TresPerNode=gres:shard:3")
    job = parse_scontrol_job(line)
    assert job.tres_per_node == "gres:shard:3" and job.gpus == {} and job.gpu_idx == {"vm": {}}
