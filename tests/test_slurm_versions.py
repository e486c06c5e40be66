"""What changes between Slurm 22.05 and 26.05 in what the adapter reads (fixtures/slurm/).

The derived releases' fixtures are fixtures/slurm/derive.py's output (checked here), each
README naming the SchedMD/slurm tag and source files they follow. The SLUID — a job's id
unique in the Slurm realm, a new one per requeue — is read where a release prints the job's
own (scontrol ``SLUID=`` from 25.11, sacct ``SLUID`` in 25.11 and ``OriginalSLUID`` from
26.05), never 24.11/25.05's accounting-record index, which no hook sees.
"""

from __future__ import annotations

import importlib.util
import json
from datetime import datetime, timezone
from pathlib import Path

import pytest
from test_settle_slurm import VERSIONS, load, release

from slurm_plugin import slurm

FIX = Path(__file__).parent / "fixtures" / "slurm"
SLUID_RELEASES = ("25.11", "26.05")


def derive():
    spec = importlib.util.spec_from_file_location("derive", FIX / "derive.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


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
        assert "DERIVED" in readme and info["tag"] in readme and "src/" in readme
    else:
        assert "recorded" in readme.lower() or "written" in readme.lower()


def decode_sluid(text: str) -> tuple[int, int, int]:
    """(cluster, unix ms, sequence) of a SLUID (src/common/sluid.h layout)."""
    cb32 = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
    value = 0
    for c in text[1:].upper():
        value = value * 32 + cb32.index(c)
    value &= (1 << 64) - 1
    return value >> 52, (value >> 10) & ((1 << 42) - 1), value & 0x3FF


def test_sluid_reader():
    good = derive().run_sluid("2425", 1)
    assert slurm.sluid(good) == good and slurm.sluid(" " + good + "\n") == good
    cluster, ms, seq = decode_sluid(good)
    assert cluster == 0x2A7 and seq == 0
    assert datetime.fromtimestamp(ms / 1000, timezone.utc).year == 2026
    for bad in (None, "", "2425", "s0000000000000", "sILOU000000000", good + "0", "x" + good[1:],
                "(null)"):
        assert slurm.sluid(bad) is None, bad


def test_sacct_fields_by_release():
    base = slurm.SACCT_FIELDS
    assert slurm.sacct_fields(None) == base
    for v in ((22, 5), (23, 11), (24, 11), (25, 5)):
        assert slurm.sacct_fields(v) == base  # 24.11/25.05's SLUID is no hook's SLUID
    assert slurm.sacct_fields((25, 11)) == base + ("SLUID",)
    assert slurm.sacct_fields((26, 5)) == slurm.sacct_fields((27, 2)) == base + ("OriginalSLUID",)


@pytest.mark.parametrize("version", VERSIONS)
def test_scontrol_sluid(version):
    jobs = {j.job_id: j for j in slurm.parse_scontrol_jobs(load(version, "scontrol_show_job.txt"))}
    run_sluid = derive().run_sluid
    if version not in SLUID_RELEASES:
        assert all(j.sluid is None for j in jobs.values())
        return
    assert jobs["2423"].sluid == run_sluid("2423", 0)
    assert jobs["2425"].sluid == run_sluid("2425", 1)  # requeued once: its second run's
    assert len({j.sluid for j in jobs.values()}) == len(jobs)  # one per job, tasks too


@pytest.mark.parametrize("version", VERSIONS)
def test_sacct_sluid_per_run(version):
    recs = slurm.parse_sacct(load(version, "sacct.txt"), slurm.sacct_fields(release(version)))
    by: dict[str, list[slurm.JobRecord]] = {}
    for r in recs:
        by.setdefault(r.job_id, []).append(r)
    if version not in SLUID_RELEASES:
        assert all(r.sluid is None for r in recs)
        return
    run_sluid = derive().run_sluid
    first, second = by["2425"]
    assert (first.sluid, second.sluid) == (run_sluid("2425", 0), run_sluid("2425", 1))
    assert by["2267"][0].sluid == run_sluid("2267", 0)  # never ran: a SLUID all the same
    # AdminComment stays whole before the extra column
    assert by["2423"][0].admin_comment.startswith("gpuledger:hold=hold_ba67")
    # scontrol and sacct name the same run with the same SLUID
    live = {j.job_id: j for j in slurm.parse_scontrol_jobs(load(version, "scontrol_show_job.txt"))}
    assert live["2425"].sluid == second.sluid and live["2423"].sluid == by["2423"][0].sluid


def test_sacct_line_with_a_pipe_in_the_admin_comment():
    fields = slurm.sacct_fields((26, 5))
    line = "7|7|COMPLETED|None|None|0|None assigned||note|with|pipes|s2MXM88KGAAR00\n"
    (r,) = slurm.parse_sacct(line, fields)
    assert (r.admin_comment, r.sluid) == ("note|with|pipes", "s2MXM88KGAAR00")
    with pytest.raises(slurm.SlurmError):
        slurm.parse_sacct("7|7|COMPLETED\n", fields)
    with pytest.raises(slurm.SlurmError):
        slurm.parse_sacct(line, ("JobID",))


@pytest.mark.parametrize("version", VERSIONS)
def test_reader_asks_sacct_for_what_the_release_has(monkeypatch, version):
    asked = []

    def fake_run(cmd, timeout=slurm.TIMEOUT_S):
        asked.append(cmd)
        return load(version, "sacct.txt")

    monkeypatch.setattr(slurm, "_run", fake_run)
    reader = slurm.CommandReader(use_pyslurm=False, version=release(version))
    recs = reader.finished_jobs(datetime(2026, 11, 25, tzinfo=timezone.utc))
    fmt = next(a for a in asked[0] if a.startswith("--format="))
    assert fmt == "--format=" + ",".join(slurm.sacct_fields(release(version)))
    assert any(r.sluid for r in recs) == (version in SLUID_RELEASES)
