"""Spool: atomic files, agent restarts without double counting, epilog reading it."""

import json
import os
import stat

import pytest
from fakenvml import FakeClock, FakeNvmlLib, install
from fakenvml.scenario import at, run_until, two_h100

from slurm_plugin.agent import client
from slurm_plugin.agent.core import Agent, wall_ms
from slurm_plugin.agent.spool import Spool

SPECS = [("GPU-h100-0000",), ("GPU-h100-0001",)]


def new_agent(spool_dir, clock):
    a = Agent(Spool(spool_dir), SPECS, clock=clock)
    a.start()
    a.tick()
    return a


def test_spool_files_are_private_and_atomic(tmp_path):
    sp = Spool(tmp_path / "s")
    sp.ensure()
    sp.write(5, 1, {"a": 1})
    sp.write(5, 1, {"a": 2})
    assert sp.read(5, 1) == {"a": 2}
    assert stat.S_IMODE(os.stat(sp.path(5, 1)).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "s").st_mode) == 0o700
    assert sorted(os.listdir(tmp_path / "s")) == ["job-5.1.json"]  # no temp file left


def test_spool_ignores_garbage_files(tmp_path, caplog):
    sp = Spool(tmp_path)
    (tmp_path / "job-1.0.json").write_text("{not json")
    (tmp_path / "job-2.0.json").write_text("[1]")
    (tmp_path / ".job-3.0.json.99.tmp").write_text("{}")
    (tmp_path / "notes.txt").write_text("hello")
    sp.write(4, 0, {"x": 1})
    assert sp.load_all() == [{"x": 1}]
    assert "unreadable spool file" in caplog.text


def test_prune_removes_old_finished_only(tmp_path):
    sp = Spool(tmp_path)
    sp.write(1, 0, {"finished": True})
    sp.write(2, 0, {"finished": False})
    now = os.stat(sp.path(1, 0)).st_mtime
    assert sp.prune(3600, now + 10) == 0
    assert sp.prune(3600, now + 7200) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["job-2.0.json"]


def test_restart_mid_job_no_double_count_gap_marked(tmp_path):
    clock = FakeClock()
    lib = FakeNvmlLib(two_h100(), clock)
    with install(lib):
        a = new_agent(tmp_path, clock)
        a.register(20, 0, [0, 1])
        run_until(a, clock, 10_000)
        # crash: no stop(), the NVML session and GPM state die with the process
        a.nvml.close()
        at(clock, 13_000)
        b = new_agent(tmp_path, clock)  # first round at 13 s follows the outage
        assert (20, 0) in b.jobs
        run_until(b, clock, 30_000)
        u = b.summary(20, 0)
        b.stop()
    for g in u.gpus:
        assert g.held_ms == 30_000
        assert g.gaps_ms == 3_000  # (10 s, 13 s]
        assert g.busy_ms == 15_000 - 1_500  # the gap hid 3 s at 50 %
        assert g.energy_mj == 11_700_000  # counter delta across the outage is exact
        assert g.measured


def test_crash_after_sampling_before_write_loses_one_interval(tmp_path):
    clock = FakeClock()
    with install(FakeNvmlLib(two_h100(), clock)):
        a = new_agent(tmp_path, clock)
        a.register(21, 0, [0])
        run_until(a, clock, 14_000)
        saved = Spool(tmp_path).read(21, 0)
        run_until(a, clock, 15_000)  # this round's write is "lost"
        Spool(tmp_path).write(21, 0, saved)
        a.nvml.close()
        b = new_agent(tmp_path, clock)  # restarts at once, at 15 s
        run_until(b, clock, 20_000)
        g = b.summary(21, 0).gpus[0]
        b.stop()
    assert (g.held_ms, g.gaps_ms, g.busy_ms) == (20_000, 1_000, 5_000 - 500)
    assert g.energy_mj == 70_000 * 10 + 400_000 * 10


def test_read_spool_exact_with_given_end(tmp_path):
    clock = FakeClock()
    with install(FakeNvmlLib(two_h100(), clock)):
        a = new_agent(tmp_path, clock)
        a.register(23, 0, [0])
        run_until(a, clock, 20_000)
        a.nvml.close()
    end = clock.t0 + 26_000
    g = client.read_spool(23, 0, str(tmp_path), now_ms=end).gpus[0]
    assert (g.held_ms, g.busy_ms, g.gaps_ms, g.energy_mj) == (26_000, 5_000, 6_000, 4_700_000)
    assert g.measured


def test_epilog_reads_spool_when_agent_down(tmp_path):
    clock = FakeClock(wall_ms() - 60_000)
    with install(FakeNvmlLib(two_h100(), clock)):
        a = new_agent(tmp_path, clock)
        a.register(22, 0, [0, 1])
        run_until(a, clock, 20_000)
        a.nvml.close()  # agent dies
    sock = str(tmp_path / "absent.sock")
    last_ms = clock.ms
    u = client.summary(22, 0, socket_path=sock, spool_dir=str(tmp_path))
    assert u is not None and u.source == "spool" and u.finished
    g = u.gpus[0]
    assert g.busy_ms == 5_000 and g.energy_mj == 4_700_000
    # the time since the agent's last round (real wall clock now) is held, unobserved
    assert 60_000 <= g.held_ms < 120_000 and g.gaps_ms == g.held_ms - 20_000
    assert g.held_ms == u.gpus[1].held_ms
    stored = json.loads((tmp_path / "job-22.0.json").read_text())
    assert stored["finished"] and stored["last_ms"] > last_ms
    # a restarted agent does not resume a job the epilog already closed
    with install(FakeNvmlLib(two_h100(), clock)):
        b = new_agent(tmp_path, clock)
        assert (22, 0) not in b.jobs
        assert b.summary(22, 0).gpus[0].held_ms == g.held_ms
        b.stop()
    assert client.summary(22, 0, socket_path=sock, spool_dir=str(tmp_path)) == u


def test_epilog_with_nothing_anywhere_gets_none(tmp_path):
    assert client.summary(1, 0, socket_path=str(tmp_path / "x.sock"),
                          spool_dir=str(tmp_path / "none")) is None


@pytest.mark.parametrize("content", ["{}", '{"version": 99}', '{"version": 1, "job_id": 3}'])
def test_epilog_with_broken_spool_state_gets_none(tmp_path, content):
    (tmp_path / "job-3.0.json").write_text(content)
    assert client.summary(3, 0, socket_path=str(tmp_path / "x.sock"),
                          spool_dir=str(tmp_path)) is None


def test_agent_skips_broken_state_on_start(tmp_path, caplog):
    (tmp_path / "job-3.0.json").write_text('{"version": 1, "job_id": 3}')
    clock = FakeClock()
    with install(FakeNvmlLib(two_h100(), clock)):
        a = new_agent(tmp_path, clock)
        assert a.jobs == {}
        a.stop()
    assert "bad spool state" in caplog.text


S_OLD, S_NEW = "s2MXM88KGAAR00", "s2MXM88KGG6800"  # two runs' SLUIDs (Slurm 25.11+)


def test_an_earlier_job_with_the_same_id_is_not_reused(tmp_path):
    """A controller that lost its state counts job ids from 1 again: the node still holds
    job 1 run 0's finished state. With SLUIDs the new job 1 is measured afresh, and its
    epilog never reads the earlier job's figures; without one, job id + restart decide."""
    clock = FakeClock()
    with install(FakeNvmlLib(two_h100(), clock)):
        a = new_agent(tmp_path, clock)
        a.register(1, 0, [0, 1], sluid=S_OLD)
        run_until(a, clock, 10_000)
        old = a.summary(1, 0, sluid=S_OLD)
        assert old.gpus[0].held_ms == 10_000
        run_until(a, clock, 50_000)
        assert a.summary(1, 0, sluid=S_NEW) is None  # not this run's state
        assert client.read_spool(1, 0, str(tmp_path), sluid=S_NEW) is None
        assert client.read_spool(1, 0, str(tmp_path), sluid=S_OLD) == \
            client.read_spool(1, 0, str(tmp_path))
        b = a.register(1, 0, [1], sluid=S_NEW)  # the new job 1
        assert [x.index for x in b] == [1]
        run_until(a, clock, 55_000)
        new = a.summary(1, 0, sluid=S_NEW)
        a.stop()
    assert [g.index for g in new.gpus] == [1] and new.gpus[0].held_ms == 5_000
    stored = json.loads((tmp_path / "job-1.0.json").read_text())
    assert stored["sluid"] == S_NEW and stored["finished"]


def test_the_same_run_registers_once_with_or_without_a_sluid(tmp_path):
    clock = FakeClock()
    with install(FakeNvmlLib(two_h100(), clock)):
        a = new_agent(tmp_path, clock)
        first = a.register(2, 0, [0], sluid=S_OLD)
        run_until(a, clock, 5_000)
        assert a.register(2, 0, [0], sluid=S_OLD) == first  # idempotent
        assert a.register(2, 0, [0]) == first  # a caller without one: job id + restart
        a.register(3, 0, [1])  # no SLUID (before 25.11): as before
        run_until(a, clock, 8_000)
        assert a.summary(3, 0, sluid=S_NEW).gpus[0].held_ms == 3_000  # registered at 5 s
        a.stop()
    assert "sluid" not in json.loads((tmp_path / "job-3.0.json").read_text())
