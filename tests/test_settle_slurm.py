"""The Slurm adapter against recorded 22.05 output and 24.11-format fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

from slurm_plugin import marks, slurm

FIX = Path(__file__).parent / "fixtures" / "slurm"


def load(version: str, name: str) -> str:
    return (FIX / version / name).read_text()


@pytest.mark.parametrize("version", ["22.05", "24.11"])
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
    assert jobs["2429"].gpu_idx == {"vm": {1: "h100"}}


def test_24_11_two_node_job():
    jobs = {j.job_id: j for j in slurm.parse_scontrol_jobs(load("24.11", "scontrol_show_job.txt"))}
    j = jobs["3001"]
    assert j.nodes == ["gpu01", "gpu02"] and j.gpus == {"h100": 8} and j.restarts == 2
    assert j.gpu_idx == {"gpu01": {0: "h100", 1: "h100", 2: "h100", 3: "h100"},
                         "gpu02": {0: "h100", 1: "h100", 2: "h100", 3: "h100"}}
    assert j.time_limit_s == 86400 and j.elapsed_s == 3723


@pytest.mark.parametrize("version", ["22.05", "24.11"])
def test_sacct_runs(version):
    recs = slurm.parse_sacct(load(version, "sacct.txt"))
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
    if version == "24.11":
        assert by["3001"][0].nodes == ["gpu01", "gpu02"] and by["3001"][0].state == "NODE_FAIL"


@pytest.mark.parametrize("version", ["22.05", "24.11"])
def test_squeue(version):
    recs = {r.display_id: r for r in slurm.parse_squeue(load(version, "squeue.txt"))}
    assert recs["2428_0"].job_id == "2429" and recs["2428_0"].array_job_id == "2428"
    assert recs["2425"].array_job_id is None and recs["2425"].nodes == ["vm"]
    assert recs["2428_[1-3%1]"].state == "PENDING"


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
