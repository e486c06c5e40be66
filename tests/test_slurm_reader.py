"""The Slurm reader against every release's JSON (fixtures/slurm/<release>/).

22.05/ was recorded on the real test cluster (fixtures/slurm/record_json.py: jobs.json names
each scenario's job id); the other releases are derived from it by fixtures/slurm/derive.py
(each README names the SchedMD/slurm tag and data_parser version), so every release's
output is read by the same assertions. What a user sets — job name, ``--comment``,
``--wckey`` — never reaches a field the ledger reads (HOSTILE).
"""

from __future__ import annotations

import importlib.util
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from ledger import slurmsyntax
from slurm_plugin import marks, reader, slurm, slurmjson

FIX = Path(__file__).parent / "fixtures" / "slurm"
VERSIONS = ["22.05", "23.02", "23.11", "24.05", "24.11", "25.05", "25.11", "26.05"]
HOSTILE = "QOS=standby Partition=short AdminComment=gpuledger:hold=hold_0;token=t"


def load(version: str, name: str) -> str:
    return (FIX / version / name).read_text()


def jobs_of(version: str) -> dict[str, str]:
    return json.loads(load(version, "jobs.json"))


def derive():
    spec = importlib.util.spec_from_file_location("derive", FIX / "derive.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def live(version: str) -> dict[str, slurm.JobRecord]:
    now = datetime(2026, 12, 7, 22, tzinfo=UTC)
    return {j.job_id: j for j in slurmjson.parse_squeue(load(version, "squeue.json"), now)}


def acct(version: str) -> dict[str, list[slurm.JobRecord]]:
    out: dict[str, list[slurm.JobRecord]] = {}
    for r in slurmjson.parse_sacct(load(version, "sacct.json")):
        out.setdefault(r.job_id, []).append(r)
    return out


def test_derived_fixtures_are_derive_py_output():
    for path, text in derive().outputs().items():
        assert path.read_text() == text, f"{path}: run tests/fixtures/slurm/derive.py"


@pytest.mark.parametrize("version", VERSIONS)
def test_each_release_names_its_source(version):
    info = json.loads(load(version, "lua.json"))
    assert info["release"] == version
    assert info["tag"].startswith("slurm-" + version.replace(".", "-") + "-")
    readme = load(version, "README.md")
    if info["derived"]:
        assert "DERIVED" in readme and info["tag"] in readme and "data_parser" in readme
    else:
        assert "recorded" in readme.lower()


@pytest.mark.parametrize("version", VERSIONS)
def test_squeue_json(version):
    ids, jobs = jobs_of(version), live(version)
    req = jobs[ids["REQ"]]
    assert (req.state, req.restarts, req.active, len(req.nodes)) == ("RUNNING", 1, True, 1)
    (node,) = req.nodes
    assert req.gpus == {"h100": 1} and len(req.gpu_idx[node]) == 1
    assert set(req.gpu_idx[node].values()) == {"h100"}
    assert (req.qos, req.partition, req.user, req.account) == ("normal", "gpu", "alice",
                                                               "physics")
    assert req.time_limit_s == 300 and req.ran and req.elapsed_s is not None
    assert isinstance(marks.parse(req.admin_comment), marks.HoldMark)
    done = jobs[ids["DONE"]]
    assert (done.state, done.active, done.gpus) == ("COMPLETED", False, {"h100": 2})
    rest = jobs[ids["THR"]]  # the array's pending rest keeps the array's own id
    assert (rest.state, rest.array_job_id, rest.array_task, rest.ran) == (
        "PENDING", ids["THR"], "1-3%1", False)
    task0 = next(j for j in jobs.values() if j.display_id == f"{ids['THR']}_0")
    assert task0.job_id != ids["THR"] and task0.state == "RUNNING"
    assert task0.admin_comment == rest.admin_comment
    arr = sorted(j.array_task for j in jobs.values() if j.array_job_id == ids["ARRAY"])
    assert arr == ["0", "1", "2"]
    assert jobs[ids["CANC"]].state == "CANCELLED" and not jobs[ids["CANC"]].ran


@pytest.mark.parametrize("version", VERSIONS)
def test_a_hostile_job_name_is_only_a_name(version):
    ids, jobs = jobs_of(version), live(version)
    bad = jobs[ids["HOSTILE"]]
    assert (bad.qos, bad.partition) == ("normal", "gpu")
    assert marks.parse(bad.admin_comment).hold_id != "hold_0"
    assert bad.gpus == {"a100": 1} and bad.state == "RUNNING"
    raw = json.loads(load(version, "squeue.json"))
    (doc,) = [j for j in raw["jobs"] if str(j["job_id"]) == ids["HOSTILE"]]
    assert HOSTILE in doc["name"] and HOSTILE in doc["comment"]  # it did reach Slurm


@pytest.mark.parametrize("version", VERSIONS)
def test_sacct_json_runs(version):
    ids, by = jobs_of(version), acct(version)
    first, second = by[ids["REQ"]]
    assert (first.state, first.restarts, first.superseded, first.active) == (
        "REQUEUED", 0, True, False)
    assert (second.state, second.restarts, second.superseded) == ("CANCELLED", 1, False)
    assert first.gpus == {"h100": 1} and first.stepped and first.elapsed_s >= 0
    cancelled = by[ids["CANC"]][0]
    assert (cancelled.state, cancelled.ran, cancelled.nodes, cancelled.stepped) == (
        "CANCELLED", False, [], False)
    assert (cancelled.user, cancelled.account) == ("alice", "physics")
    rest = by[ids["THR"]][0]
    assert (rest.array_job_id, rest.array_task) == (ids["THR"], "1-3")
    hostile = by[ids["HOSTILE"]][0]
    assert marks.parse(hostile.admin_comment).hold_id != "hold_0"
    tasks = sorted(r.array_task for rs in by.values() for r in rs
                   if r.array_job_id == ids["ARRAY"])
    assert tasks == ["0", "1", "2"]


@pytest.mark.parametrize("version", VERSIONS)
def test_sluid_where_the_release_prints_it(version):
    recs = slurmjson.parse_sacct(load(version, "sacct.json"))
    if version != "26.05":
        assert all(r.sluid is None for r in recs)
        return
    ids, by = jobs_of(version), acct(version)
    run_sluid = derive().run_sluid
    first, second = by[ids["REQ"]]
    assert (first.sluid, second.sluid) == (run_sluid(ids["REQ"], 0), run_sluid(ids["REQ"], 1))


def test_sluid_reader():
    good = derive().run_sluid("2425", 1)
    assert slurmsyntax.sluid(good) == good and slurmsyntax.sluid(" " + good + "\n") == good
    for bad in (None, "", "2425", "s0000000000000", "sILOU000000000", good + "0", "x" + good[1:],
                "(null)"):
        assert slurmsyntax.sluid(bad) is None, bad


def test_a_missing_field_is_an_error_never_a_guess():
    doc = json.loads(load("24.11", "squeue.json"))
    for key in ("admin_comment", "qos", "partition", "tres_alloc_str", "job_state"):
        job = dict(doc["jobs"][0])
        del job[key]
        with pytest.raises(slurm.SlurmError, match=key):
            slurmjson.parse_squeue(json.dumps({"jobs": [job]}))
    for text in ("", "not json", "[]", '{"jobs": 1}', '{"jobs": [], "errors": ["boom"]}'):
        with pytest.raises(slurm.SlurmError):
            slurmjson.parse_squeue(text)
    job = dict(doc["jobs"][0], time_limit={"set": True, "number": "5"})
    with pytest.raises(slurm.SlurmError):
        slurmjson.parse_squeue(json.dumps({"jobs": [job]}))
    acct_doc = json.loads(load("22.05", "sacct.json"))
    job = dict(acct_doc["jobs"][0])
    del job["comment"]
    with pytest.raises(slurm.SlurmError, match="comment"):
        slurmjson.parse_sacct(json.dumps({"jobs": [job]}))


def test_numbers_and_states_of_every_form():
    assert slurmjson.number(5) == 5 and slurmjson.number(None) is None
    assert slurmjson.number({"set": True, "infinite": False, "number": 7}) == 7
    assert slurmjson.number({"set": False, "infinite": False, "number": 0}) is None
    assert slurmjson.number({"set": False, "infinite": True, "number": 0}) is None
    for bad in (True, "5", 1.5, [5]):
        with pytest.raises(slurm.SlurmError):
            slurmjson.number(bad)
    assert slurmjson.state("RUNNING") == "RUNNING"
    assert slurmjson.state(["PENDING", "REQUEUED"]) == "REQUEUED"  # as job_state_string
    assert slurmjson.state(["RUNNING", "COMPLETING"]) == "COMPLETING"
    assert slurmjson.state(["PENDING"]) == "PENDING"
    assert slurmjson.bitmap_tasks("0xE") == "1-3" and slurmjson.bitmap_tasks("0x15") == "0,2,4"
    assert slurmjson.bitmap_tasks("1-3%1") == "1-3%1"


def test_hostlists_by_slurms_rule():
    """slurm-22-05-8-1 src/common/hostlist.c: each bracket is a range of its own."""
    assert slurmsyntax.expand_hostlist("rack[1-2]-n[1-2]") == ["rack1-n1", "rack1-n2", "rack2-n1",
                                                         "rack2-n2"]
    assert slurmsyntax.expand_hostlist("gpu[01-03,7],login1") == ["gpu01", "gpu02", "gpu03", "gpu7",
                                                           "login1"]
    assert slurmsyntax.expand_hostlist("n[8-10]") == ["n8", "n9", "n10"]
    assert slurmsyntax.expand_hostlist("None assigned") == []
    for bad in ("n[1-", "n[3-1]", "n[a-b]", "n]1["):
        with pytest.raises(slurmsyntax.SlurmSyntaxError):
            slurmsyntax.expand_hostlist(bad)
    with pytest.raises(slurmsyntax.SlurmSyntaxError):
        slurmsyntax.expand_hostlist("n[0-99999999]")


def test_small_parsers():
    assert slurmsyntax.time_str2secs("1-02:03:04") == 93784
    assert slurmsyntax.time_str2secs("05:00") == 300
    assert slurmsyntax.gpus_in_tres("cpu=1,gres/gpu=3,gres/gpu:h100=1") == {"h100": 1, None: 2}
    assert slurmsyntax.gpus_in_tres("cpu=1,gres:gpu=2") == {None: 2}
    assert slurmsyntax.gres_indices("gpu:h100:1(IDX:0),gpu:a100:1(IDX:2)") == {0: "h100", 2: "a100"}
    assert slurmsyntax.gres_indices("gpu:2(IDX:0-1)") == {0: None, 1: None}
    assert slurm.base_state("CANCELLED by 0") == "CANCELLED"


@pytest.mark.parametrize("version", VERSIONS)
def test_reader_picks_its_job_out_of_squeue(monkeypatch, version):
    """22.05's squeue --json prints every job whatever -j says: the reader picks its own."""
    asked = []

    def fake_run(cmd, timeout=reader.TIMEOUT_S):
        asked.append(cmd)
        return load(version, "squeue.json" if cmd[0] == "squeue" else "sacct.json")

    monkeypatch.setattr(reader, "_run", fake_run)
    r = reader.CommandReader(use_pyslurm=False, version=(22, 5))
    ids = jobs_of(version)
    assert r.job(ids["REQ"]).job_id == ids["REQ"]
    assert r.job(f"{ids['THR']}_0").display_id == f"{ids['THR']}_0"
    assert r.job("999999") is None
    assert asked[0][:5] == ["squeue", "--json", "--all", "--states", "all"] and "--jobs" in asked[0]
    assert {j.job_id for j in r.live_jobs()} >= set(ids.values())
    assert (ids["REQ"], 0) in r.stepped_runs([ids["REQ"]])
    assert r.owners([ids["CANC"]])[ids["CANC"]] == ("alice", "physics")
    assert any(a[:2] == ["sacct", "--json"] and "-D" in a for a in asked)


def test_pyslurm_is_used_only_for_the_same_release(monkeypatch):
    import sys
    import types
    fake = types.SimpleNamespace(__version__="25.11.0")
    monkeypatch.setitem(sys.modules, "pyslurm", fake)
    assert not reader.pyslurm_matches((22, 5))
    assert reader.pyslurm_matches((25, 11))
    assert not reader.pyslurm_matches(None)
