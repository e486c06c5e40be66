"""Every string a user sets is only that string: the same hold, bind and price as a plain job.

On the real cluster (tests/cluster/up), with tiers that would make a fooled reader cheaper
(QOS ``standby`` and partition ``short`` at 0.25): each job below fills one user-set field —
job name, ``--comment``, ``--chdir``, the script's path, ``-o``/``-e``, ``--wckey``, an
exported variable — with ``Key=Value`` pairs naming that QOS, that partition and an
AdminComment that points at a victim's hold, plus spaces, tabs, ``|``, ``;``, quotes and
non-ASCII. Each must be held, bound and charged exactly as the plain job is, and the victim's
hold must stay untouched. (``--constraint`` and ``--licenses`` are not here: Slurm refuses
at submission any name the cluster does not define, so a user cannot put text there.)
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
from settlekit import field, s, sh, st  # noqa: F401 - st and s are fixtures

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(600)]


def hostile(victim: str) -> str:
    return (f"x QOS=standby Partition=short AdminComment=gpuledger:hold={victim};token=t "
            "JobState=COMPLETED\t|;\"' é")


def test_user_set_fields_change_no_price_and_no_binding(s):
    s.gl("tiers", "set", "qos", "standby", "0.25")
    s.gl("tiers", "set", "partition", "short", "0.25")
    work = Path("/tmp/gl-hostile")
    try:
        token, _ = s.mint("40")
        victim_job = s.sbatch(token, "--gres=gpu:h100:1", "-t", "10", wrap="sleep 1",
                              hold=True)
        victim = s.hold_of(victim_job)
        evil = hostile(victim.id)
        shutil.rmtree(work, ignore_errors=True)
        odd_dir = work / evil.replace("/", "_").replace("\t", " ")
        odd_dir.mkdir(parents=True)
        script = odd_dir / "job QOS=standby.sh"
        script.write_text("#!/bin/sh\nsleep 3\n")
        for p in (work, odd_dir, script):
            os.chown(p, 1001, 1001)
        script.chmod(0o755)
        gres = ("--gres=gpu:h100:1", "-t", "10")
        jobs = {
            "plain": s.sbatch(token, *gres, wrap="sleep 3"),
            "name": s.sbatch(token, *gres, "-J", evil, wrap="sleep 3"),
            "comment": s.sbatch(token, *gres, f"--comment={evil}", wrap="sleep 3"),
            "chdir": s.sbatch(token, *gres, f"--chdir={odd_dir}", wrap="sleep 3"),
            "output": s.sbatch(token, *gres, "-o", str(odd_dir / "o %j"),
                               "-e", str(odd_dir / "e %j"), wrap="sleep 3"),
            "wckey": s.sbatch(token, *gres, f"--wckey={evil.split()[1]}", wrap="sleep 3"),
            "env": s.sbatch(token, *gres, f"--export=ALL,EVIL={evil}", wrap="sleep 3"),
            "script": s.sbatch(token, *gres, script=str(script)),
        }
        holds = {}
        for what, job in jobs.items():
            s.wait(job)
            hold = s.settled(s.hold_of(job).id)
            assert s.ledger.holds(job_id=job) == [hold], what  # bound to its own hold
            assert (hold.qos, hold.partition, hold.multiplier_ppm, hold.amount) == (
                "normal", "gpu", 1_000_000, 600), what
            assert hold.charged > 0 and hold.state == "posted", what
            # the same price: 1 x h100 at x1 for the time it held the GPU (a job whose
            # output path Slurm cannot open ends sooner: it pays for less time, not less rate)
            [charge] = s.ledger.charges(hold.id)
            [gpu] = charge["usage"]["gpus"]
            assert charge["amount"] == -(-gpu["held_ms"] * 1_000_000 // 10**9), (what, charge)
            holds[what] = hold
        v = s.ledger.hold(victim.id)
        assert (v.state, v.job_id, v.charged) == ("pending", None, 0)
        mark = field(jobs["name"], "AdminComment")
        assert mark.startswith(f"gpuledger:hold={holds['name'].id};"), mark
    finally:
        s.gl("tiers", "unset", "qos", "standby")
        s.gl("tiers", "unset", "partition", "short")
        shutil.rmtree(work, ignore_errors=True)
    s.verify()


def test_gres_names_pay_for_what_slurm_allocates(s):
    """GRES names in other cases are refused by Slurm itself (22.05, 24.11: "Invalid generic
    resource (gres) specification"), and a GPU type in capitals finds no node on 22.05
    ("Requested node configuration is not available"): never an unpaid GPU. Where a
    release runs ``gpu:H100`` on an h100, the hold is priced as an h100 (job_submit.lua
    reads types without case), never at the default rate of an unknown type."""
    token, _ = s.mint("20")
    for gres in ("GPU:1", "Gpu:h100:1", "gres:GPU:1", "SHARD:2", "gpu:H100:1"):
        out = sh(["runuser", "-u", "alice", "--", "env", f"HOME={s.home}", "sbatch",
                  "-o", "/dev/null", "--chdir=/tmp", f"--gpu-token={token}", "-t", "10",
                  f"--gres={gres}", "--wrap", "sleep 1"])
        m = re.search(r"Submitted batch job (\d+)", out.stdout)
        if m is None:
            assert out.returncode != 0, (gres, out.stderr)
            continue
        job = m.group(1)
        s.jobs.append(job)
        assert gres == "gpu:H100:1", (gres, "accepted")
        hold = s.hold_of(job)
        assert (hold.gpu_type, hold.rate_ppm, hold.amount) == ("h100", 1_000_000, 600)
        s.wait(job)
        assert s.settled(hold.id).charged > 0
    s.verify()
