"""The agent over a fake node: exact busy time, energy, memory and charges for a trace."""

import pynvml
import pytest
from fakenvml import FakeClock, FakeNvmlLib, install
from fakenvml.scenario import GIB, at, mig_a100, mig_h100, run_until, two_h100

from ledger.charging import charge_for
from slurm_plugin.agent.core import Agent
from slurm_plugin.agent.spool import Spool

H100_PPM = 1_000_000


@pytest.fixture
def node(tmp_path):
    """An agent on 2 x H100 (GPU 0 with GPM, GPU 1 utilization only)."""
    clock = FakeClock()
    lib = FakeNvmlLib(two_h100(), clock)
    with install(lib):
        agent = Agent(Spool(tmp_path / "spool"), [("GPU-h100-0000",), ("GPU-h100-0001",)],
                      clock=clock)
        agent.start()
        agent.tick()
        yield agent, clock, lib
        agent.stop()


def test_full_trace_exact_on_both_paths(node):
    agent, clock, _ = node
    bindings = agent.register(7, 0, [0, 1])
    assert [(b.index, b.uuid, b.measured) for b in bindings] == [
        (0, "GPU-h100-0000", True), (1, "GPU-h100-0001", True)]
    run_until(agent, clock, 30_000)
    u = agent.summary(7, 0)
    assert u.finished
    for g in u.gpus:
        assert (g.held_ms, g.busy_ms, g.gaps_ms) == (30_000, 15_000, 0)
        assert g.energy_mj == 11_700_000  # 70 W x 10 s + 400 W x 10 s + 700 W x 10 s
        assert g.peak_mem_bytes == 4 * GIB
        assert g.measured and g.reason is None

    alloc = charge_for(u.gpus, H100_PPM, "allocated", 0.25)
    meas = charge_for(u.gpus, H100_PPM, "measured", 0.25)
    assert (alloc.total, alloc.measured_total) == (60, 30)
    assert (meas.total, meas.allocated_total) == (30, 60)
    a100 = charge_for(u.gpus, 143_000, "measured", 0.25)  # ceil(15 x 0.143) per GPU
    assert [x.charge for x in a100.lines] == [3, 3] and a100.allocated_total == 10


def test_unaligned_job_with_gpm_is_exact(node):
    agent, clock, _ = node
    at(clock, 2_500)
    agent.register(8, 1, [0])
    run_until(agent, clock, 25_000)
    at(clock, 25_500)
    g = agent.summary(8, 1).gpus[0]
    # busy: 10 s at 50 % + 5.5 s at 100 %; energy 70 W x 7.5 s + 400 W x 10 s + 700 W x 5.5 s
    assert (g.held_ms, g.busy_ms, g.energy_mj) == (23_000, 10_500, 8_375_000)
    assert charge_for([g], H100_PPM, "measured", "0.25").total == 11  # ceil(10.5)
    assert charge_for([g], H100_PPM, "allocated", "0.25").total == 23


def test_idle_job_pays_the_floor(node):
    agent, clock, _ = node
    agent.register(9, 0, [0])
    run_until(agent, clock, 10_000)
    u = agent.summary(9, 0)
    assert u.gpus[0].busy_ms == 0
    assert charge_for(u.gpus, H100_PPM, "measured", 0.25).total == 3  # ceil(0.25 x 10 s)
    assert charge_for(u.gpus, H100_PPM, "measured", 0).total == 0


def test_summary_is_idempotent_after_finish(node):
    agent, clock, _ = node
    agent.register(10, 0, [0, 1])
    run_until(agent, clock, 12_000)
    first = agent.summary(10, 0)
    run_until(agent, clock, 20_000)
    assert agent.summary(10, 0) == first
    assert agent.register(10, 0, [0, 1])[0].uuid == "GPU-h100-0000"
    assert (10, 0) not in agent.jobs


def test_summary_without_finish_keeps_accounting(node):
    agent, clock, _ = node
    agent.register(11, 0, [1])
    run_until(agent, clock, 15_000)
    mid = agent.summary(11, 0, finish=False)
    assert not mid.finished and mid.gpus[0].busy_ms == 2_500
    run_until(agent, clock, 20_000)
    assert agent.summary(11, 0).gpus[0].busy_ms == 5_000


def test_registration_is_idempotent_and_unknown_index_unmeasured(node):
    agent, clock, _ = node
    b = agent.register(12, 0, [0, 5])
    assert agent.register(12, 0, [0, 5]) == b
    assert b[1].uuid is None and not b[1].measured and "index 5" in b[1].reason
    run_until(agent, clock, 4_000)
    u = agent.summary(12, 0)
    assert not u.gpus[1].measured and u.gpus[1].held_ms == 4_000
    r = charge_for(u.gpus, H100_PPM, "measured", 0.25)
    assert [x.charge for x in r.lines] == [1, 4]  # floor on GPU 0, held time on GPU 1


def test_unknown_job_summary_is_none(node):
    agent, _, _ = node
    assert agent.summary(999, 0) is None


def test_gpu_lost_mid_job_becomes_a_gap(node):
    agent, clock, lib = node
    agent.register(13, 0, [0, 1])
    run_until(agent, clock, 12_000)
    lib.gpus[0].lost = True
    run_until(agent, clock, 15_000)
    lib.gpus[0].lost = False
    run_until(agent, clock, 30_000)
    g0, g1 = agent.summary(13, 0).gpus
    assert g1.busy_ms == 15_000 and g1.gaps_ms == 0
    # (12, 15] at 50 % is unobserved; the GPM window then spans (12, 16], still 50 %
    assert g0.gaps_ms == 3_000 and g0.busy_ms == 15_000 - 1_500
    assert g0.energy_mj == 11_700_000  # the counter keeps counting while unreadable
    assert charge_for([g0], H100_PPM, "measured", 0.25).total == 17  # 13.5 s + 3 s gap


def test_nvml_missing_settles_on_held_time(tmp_path):
    clock = FakeClock()
    with install(None):
        agent = Agent(Spool(tmp_path / "s"), [("GPU-h100-0000",)], clock=clock)
        agent.start()
        b = agent.register(1, 0, [0])
        run_until(agent, clock, 5_000)
        u = agent.summary(1, 0)
        agent.stop()
    assert not b[0].measured and "NVML unavailable" in b[0].reason
    assert u.gpus[0].held_ms == 5_000 and not u.gpus[0].measured
    assert charge_for(u.gpus, H100_PPM, "measured", 0.25).total == 5


def test_driver_loaded_later_is_picked_up(tmp_path):
    clock = FakeClock()
    lib = FakeNvmlLib(two_h100(), clock, init_error=pynvml.NVML_ERROR_DRIVER_NOT_LOADED)
    with install(lib):
        agent = Agent(Spool(tmp_path / "s"), [("GPU-h100-0000",)], clock=clock, retry_ms=5_000)
        agent.start()
        assert agent.nvml_error and "Driver Not Loaded" in agent.nvml_error
        lib.init_error = pynvml.NVML_ERROR_DRIVER_NOT_LOADED
        run_until(agent, clock, 3_000)
        assert not agent.nvml.is_open
        lib.init_error = pynvml.NVML_SUCCESS
        run_until(agent, clock, 6_000)
        assert agent.nvml.is_open
        assert agent.register(2, 0, [0])[0].measured
        agent.stop()


def test_mig_a100_instance_is_held_time_only(tmp_path):
    clock = FakeClock()
    with install(FakeNvmlLib([mig_a100()], clock)):
        agent = Agent(Spool(tmp_path / "s"), [("MIG-a100-gi1",), ("MIG-a100-gi2",)], clock=clock)
        agent.start()
        agent.tick()
        b = agent.register(3, 0, [1])
        assert (b[0].uuid, b[0].measured) == ("MIG-a100-gi2", True)
        run_until(agent, clock, 30_000)
        g = agent.summary(3, 0).gpus[0]
        agent.stop()
    assert not g.measured and g.reason == "no utilization sample"
    assert g.peak_mem_bytes == 4 * GIB and g.energy_mj == 0
    assert charge_for([g], 430_000, "measured", 0.25).total == 13  # ceil(30 x 0.43)


def test_mig_h100_instance_is_measured_with_gpm(tmp_path):
    clock = FakeClock()
    with install(FakeNvmlLib([mig_h100()], clock)):
        agent = Agent(Spool(tmp_path / "s"), [("MIG-h100-gi3",)], clock=clock)
        agent.start()
        agent.tick()
        agent.register(4, 0, [0])
        run_until(agent, clock, 30_000)
        g = agent.summary(4, 0).gpus[0]
        agent.stop()
    assert g.measured and (g.busy_ms, g.held_ms) == (15_000, 30_000)
    assert g.peak_mem_bytes == 4 * GIB


def test_every_gpu_is_sampled_each_round(node):
    agent, clock, lib = node
    before = lib.calls["nvmlDeviceGetPowerUsage"]
    run_until(agent, clock, 3_000)
    assert lib.calls["nvmlDeviceGetPowerUsage"] - before == 6  # 2 GPUs x 3 rounds, no job


def test_live_workload_integrates_the_control_file_exactly(tmp_path):
    """The e2e fake (tests/fakenvml/live.py): phases start at the stamps jobs write."""
    from fakenvml.live import LiveWorkload, read_phases

    ctl = tmp_path / "gpu0"
    w = LiveWorkload(ctl, t0_ms=1_000_000)
    assert w.at(500).util_pct == 0 and w.energy_uj(500) == 70_000 * 500
    ctl.write_text("1001000 100 700000 1024\n1003000 50 400000 2048\n")
    assert w.active_pct_ms(2500) == 100 * 1500  # 1000..2500 at 100 %
    with ctl.open("a") as f:
        f.write("1004000 0 70000 0\n1004")  # a torn last line is not read yet
    assert w.active_pct_ms(6000) == 100 * 2000 + 50 * 1000
    assert w.energy_uj(6000) == 70_000 * 1000 + 700_000 * 2000 + 400_000 * 1000 + 70_000 * 2000
    assert w.at(3500).mem_bytes == 2048 and w.at(6000).util_pct == 0
    # a line stamped before the last query starts at that query: history never changes
    with ctl.open("a") as f:
        f.write("500 100 700000 0\n")
    assert w.active_pct_ms(6000) == 100 * 2000 + 50 * 1000
    assert w.active_pct_ms(7000) == 100 * 2000 + 50 * 1000 + 100 * 1000
    assert [t for t, _ in read_phases(ctl, 1_000_000)] == [1000, 3000, 4000, 4500]
