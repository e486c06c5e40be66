"""Two real Slurm clusters, alpha and beta, on one PostgreSQL ledger (issue 23, item 1).

Each cluster has its own slurmctld, slurmd, job_submit.lua and hooks and its own daemon;
they share munged, slurmdbd and the ledger. Both count job ids from the same FirstJobId,
as clusters that share a ledger often do: alpha's job N and beta's job N are two jobs.
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import pytest
from clusterkit import reconcile, refusal, settle

pytestmark = pytest.mark.timeout(600)

JOB_COST = 60  # GPU-s: one h100 for one minute (-t 1)


def test_a_token_scoped_to_alpha_is_refused_on_beta(clean):
    site = clean
    token, tid = site.mint("1", "physics", "--clusters", "alpha")
    out = site["beta"].sbatch(token, "--gres=gpu:h100:1", "-t", "5", check=False)
    why = refusal(out)
    assert why == f"token {tid} is not valid on cluster beta (only alpha)", why
    job = site["alpha"].sbatch(token, "--gres=gpu:h100:1", "-t", "5", "--hold")
    ledger = site.ledger()
    (hold,) = ledger.holds(token_id=tid)
    assert hold.cluster == "alpha" and hold.amount == 300
    assert site["alpha"].admin_comment(job) == f"gpuledger:hold={hold.id};token={tid}"
    site["alpha"].run("scancel", job)
    site["alpha"].wait(job)
    reconcile(site)  # a job cancelled while pending: its hold comes back
    assert ledger.inspect(tid).remaining == 3600


def test_one_balance_two_clusters_concurrent_jobs_never_overdraw(clean):
    """16 jobs at once, 8 on each cluster, on a token that pays for 6: exactly 6 are held
    (wherever they were submitted), the rest refused with the shortfall; the held ones run
    on their own clusters and each pays its own hold; nothing overdrawn, verify passes."""
    site = clean
    token, tid = site.mint(f"{6 * JOB_COST / 3600:.4f}")
    ledger = site.ledger()
    assert ledger.inspect(tid).remaining == 6 * JOB_COST

    def submit(name: str):
        return name, site[name].sbatch(token, "--gres=gpu:h100:1", "-t", "1", "--hold",
                                       check=False)

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(submit, ["alpha", "beta"] * 8))
    held = {"alpha": [], "beta": []}
    refused = []
    for name, out in results:
        m = re.search(r"Submitted batch job (\d+)", out.stdout)
        if m:
            held[name].append(m.group(1))
        else:
            refused.append(refusal(out))
    assert sum(len(v) for v in held.values()) == 6, (held, refused)
    assert len(refused) == 10
    assert all(re.match(rf"needs 0\.017 GPU-h .*token {tid} has 0\.\d{{3}} GPU-h left", r)
               for r in refused), refused
    assert ledger.inspect(tid).remaining == 0
    holds = ledger.holds(token_id=tid)
    assert sorted(h.cluster for h in holds) == sorted(
        [n for n, ids in held.items() for _ in ids])
    for name, ids in held.items():
        site[name].run("scontrol", "release", ",".join(ids)) if ids else None
    settle(site, held)
    charged = 0
    for name, ids in held.items():
        for j in ids:
            (h,) = [x for x in ledger.holds(job_id=j, cluster=name)]
            assert h.state == "posted" and h.cluster == name
            assert [c["node"] for c in ledger.charges(h.id)] == [f"{name}1"]
            assert 0 < h.charged <= h.amount
            charged += h.charged
    view = ledger.inspect(tid)
    assert view.remaining == 6 * JOB_COST - charged >= 0
    same = set(held["alpha"]) & set(held["beta"])  # ids both clusters gave out
    for j in same:
        a, b = (ledger.holds(job_id=j, cluster=c)[0] for c in ("alpha", "beta"))
        assert a.id != b.id
    site.first.gl("verify")


def test_the_receipt_names_the_cluster_of_a_job_id_both_clusters_used(clean):
    site = clean
    token, _tid = site.mint("1")
    site.align_job_ids()
    ids = {name: site[name].sbatch(token, "--gres=gpu:h100:1", "-t", "2", wrap="sleep 1")
           for name in ("alpha", "beta")}
    assert ids["alpha"] == ids["beta"]
    settle(site, {n: [j] for n, j in ids.items()})
    for name, j in ids.items():
        shown = json.loads(site[name].gl("job", "show", j, "--json"))
        (h,) = shown["holds"]
        assert (shown["cluster"], h["cluster"], h["job_id"]) == (name, name, j)
        assert [c["node"] for c in h["charges"]] == [f"{name}1"]
        text = site.first.gl("job", "show", j, "--cluster", name)
        assert re.search(rf"^cluster\s+{name}$", text, re.MULTILINE), text
    out = site.first.gl("job", "show", ids["alpha"], "--cluster", "no such", check=False)
    assert out.returncode == 1 and out.stderr.startswith("Error: invalid cluster 'no such'")


def test_reports_show_usage_by_cluster(clean, tmp_path):
    site = clean
    token, _tid = site.mint("1")
    jobs = {n: [site[n].sbatch(token, "--gres=gpu:h100:1", "-t", "2", wrap="sleep 1")]
            for n in ("alpha", "beta")}
    settle(site, jobs)
    site.first.gl("report", "render", "--month", "current", "--format", "json", "--out",
                  str(tmp_path))
    physics = json.loads(next(tmp_path.glob("physics-*.json")).read_text())
    by_cluster = {u["key"]: u for u in physics["by_cluster"]}
    assert {"alpha", "beta"} <= set(by_cluster)
    assert all(by_cluster[c]["charged"] > 0 for c in ("alpha", "beta"))
    summary = json.loads(next(tmp_path.glob("site-*.json")).read_text())
    assert {u["key"] for u in summary["by_cluster"]} >= {"alpha", "beta"}
    site.first.gl("report", "render", "--month", "current", "--format", "text", "--out",
                  str(tmp_path / "text"))
    text = next((tmp_path / "text").glob("physics-*.txt")).read_text()
    assert "USAGE BY CLUSTER" in text
