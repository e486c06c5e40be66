"""slurm_plugin.nvml against the real pynvml binding over a fake libnvidia-ml."""

import logging

import pynvml
import pytest
from fakenvml import FakeClock, FakeNvmlLib, Phase, Workload, h100, install
from fakenvml.scenario import GIB, mig_a100, mig_h100, two_h100

from slurm_plugin import nvml as nv


@pytest.fixture
def clock():
    return FakeClock()


def test_lists_two_h100_and_mig_a100(clock):
    lib = FakeNvmlLib(two_h100() + [mig_a100()], clock)
    lib.gpus[2].minor = 2
    with install(lib), nv.Nvml() as n:
        devs = n.devices()
    assert [(d.index, d.minor, d.uuid, d.mig_enabled) for d in devs] == [
        (0, 0, "GPU-h100-0000", False),
        (1, 1, "GPU-h100-0001", False),
        (2, 2, "GPU-a100-0000", True),
    ]
    assert devs[0].name == "NVIDIA H100 80GB HBM3"
    migs = devs[2].mig
    assert [(m.uuid, m.gpu_instance_id, m.parent_uuid, m.is_mig) for m in migs] == [
        ("MIG-a100-gi1", 1, "GPU-a100-0000", True),
        ("MIG-a100-gi2", 2, "GPU-a100-0000", True),
    ]
    assert lib.inits == 1 and lib.shutdowns == 1


def test_gpm_sm_activity_per_interval(clock):
    with install(FakeNvmlLib(two_h100(), clock)), nv.Nvml() as n:
        n.devices()
        first = n.sample("GPU-h100-0000")
        got = []
        for _ in range(30):
            clock.advance(1000)
            got.append(n.sample("GPU-h100-0000"))
    assert first.util_pct is None and first.util_source is None  # GPM needs two samples
    assert [s.util_pct for s in got] == [0.0] * 10 + [50.0] * 10 + [100.0] * 10
    assert {s.util_source for s in got} == {nv.UTIL_GPM}
    assert got[-1].mem_used_bytes == 4 * GIB
    assert got[-1].power_mw == 700_000
    # energy counter: base 5_000_000 mJ + 700 J + 4000 J + 7000 J
    assert first.energy_mj == 5_000_000
    assert got[-1].energy_mj == 5_000_000 + 11_700_000


def test_utilization_rates_without_gpm(clock):
    with install(FakeNvmlLib(two_h100(), clock)), nv.Nvml() as n:
        n.devices()
        clock.advance(15_000)
        s = n.sample("GPU-h100-0001")
    assert (s.util_pct, s.util_source) == (50.0, nv.UTIL_RATES)


def test_mig_a100_has_memory_but_no_activity(clock):
    with install(FakeNvmlLib([mig_a100()], clock)), nv.Nvml() as n:
        n.devices()
        clock.advance(25_000)
        s = n.sample("MIG-a100-gi1")
        parent = n.sample("GPU-a100-0000")
    assert s == nv.Sample("MIG-a100-gi1", None, None, 4 * GIB, None, None)
    assert parent.util_pct is None and parent.energy_mj is not None


def test_mig_h100_activity_through_gpm_mig_sample(clock):
    lib = FakeNvmlLib([mig_h100()], clock)
    with install(lib), nv.Nvml() as n:
        n.devices()
        n.sample("MIG-h100-gi3")
        clock.advance(12_000)
        s = n.sample("MIG-h100-gi3")
    # (0, 12 s]: 10 s idle, 2 s at 50 %
    assert s.util_pct == pytest.approx(100 * 1000 / 12000)
    assert s.util_source == nv.UTIL_GPM
    assert lib.calls["nvmlGpmMigSampleGet"] == 2


def test_memory_falls_back_to_v1(clock):
    g = h100(0, Workload([Phase(1000, 10, 100_000, 3 * GIB)]))
    g.errors["nvmlDeviceGetMemoryInfo_v2"] = pynvml.NVML_ERROR_FUNCTION_NOT_FOUND
    with install(FakeNvmlLib([g], clock)), nv.Nvml() as n:
        n.devices()
        clock.advance(500)
        assert n.sample(g.uuid).mem_used_bytes == 3 * GIB


@pytest.mark.parametrize("code", [pynvml.NVML_ERROR_NOT_SUPPORTED, pynvml.NVML_ERROR_NO_PERMISSION])
def test_one_metric_failing_leaves_the_others(clock, code, caplog):
    g = h100(0, Workload([Phase(1000, 10, 123_000, GIB)]))
    g.errors["nvmlDeviceGetTotalEnergyConsumption"] = code
    lib = FakeNvmlLib([g], clock)
    with install(lib), nv.Nvml() as n, caplog.at_level(logging.INFO):
        n.devices()
        samples = []
        for _ in range(3):
            clock.advance(1000)
            samples.append(n.sample(g.uuid))
    assert [s.energy_mj for s in samples] == [None, None, None]
    assert samples[-1].power_mw == 123_000 and samples[-1].mem_used_bytes == GIB
    assert samples[-1].util_pct == 10.0
    assert lib.calls["nvmlDeviceGetTotalEnergyConsumption"] == 1  # not asked again
    assert "gpuledger-agent: energy on GPU-h100-0000 unavailable" in caplog.text


def test_gpm_not_supported_falls_back_to_utilization(clock):
    g = h100(0, Workload([Phase(1000, 30)]))
    g.errors["nvmlGpmSampleGet"] = pynvml.NVML_ERROR_NOT_SUPPORTED
    with install(FakeNvmlLib([g], clock)), nv.Nvml() as n:
        n.devices()
        clock.advance(1000)
        s = n.sample(g.uuid)
    assert (s.util_pct, s.util_source) == (30.0, nv.UTIL_RATES)


def test_gpu_lost_raises_typed_error(clock):
    gpus = two_h100()
    with install(FakeNvmlLib(gpus, clock)), nv.Nvml() as n:
        n.devices()
        gpus[1].lost = True
        with pytest.raises(nv.NvmlGpuLost) as err:
            n.sample("GPU-h100-0001")
        assert err.value.code == pynvml.NVML_ERROR_GPU_IS_LOST
        assert n.sample("GPU-h100-0000").energy_mj == 5_000_000
        with pytest.raises(nv.NvmlNotFound):
            n.sample("GPU-nope")


def test_lost_gpu_is_skipped_in_inventory(clock):
    gpus = two_h100()
    gpus[0].lost = True
    with install(FakeNvmlLib(gpus, clock)), nv.Nvml() as n:
        assert [d.uuid for d in n.devices()] == ["GPU-h100-0001"]


def test_driver_not_loaded(clock):
    lib = FakeNvmlLib(two_h100(), clock, init_error=pynvml.NVML_ERROR_DRIVER_NOT_LOADED)
    with install(lib):
        n = nv.Nvml()
        with pytest.raises(nv.NvmlUnavailable) as err:
            n.open()
    assert err.value.code == pynvml.NVML_ERROR_DRIVER_NOT_LOADED
    assert "Driver Not Loaded" in str(err.value)
    assert not n.is_open


def test_library_not_found():
    with install(None):
        n = nv.Nvml()
        with pytest.raises(nv.NvmlUnavailable) as err:
            n.open()
        assert err.value.code == pynvml.NVML_ERROR_LIBRARY_NOT_FOUND
        with pytest.raises(nv.NvmlUnavailable):
            n.sample("GPU-x")


def test_translate_covers_the_typed_errors():
    cases = {
        pynvml.NVML_ERROR_NOT_SUPPORTED: nv.NvmlNotSupported,
        pynvml.NVML_ERROR_NO_PERMISSION: nv.NvmlNoPermission,
        pynvml.NVML_ERROR_GPU_IS_LOST: nv.NvmlGpuLost,
        pynvml.NVML_ERROR_LIBRARY_NOT_FOUND: nv.NvmlUnavailable,
        pynvml.NVML_ERROR_DRIVER_NOT_LOADED: nv.NvmlUnavailable,
        pynvml.NVML_ERROR_NOT_FOUND: nv.NvmlNotFound,
        pynvml.NVML_ERROR_TIMEOUT: nv.NvmlError,
    }
    for code, cls in cases.items():
        e = nv.translate(pynvml.NVMLError(code))
        assert type(e) is cls and e.code == code


def test_unknown_error_code_text_comes_from_nvml_error_string(clock):
    with install(FakeNvmlLib([], clock)), nv.Nvml():
        assert str(nv.translate(pynvml.NVMLError(4242))) == "Fake NVML error"


def test_transient_error_loses_one_reading_only(clock, caplog):
    g = h100(0, Workload([Phase(1000, 40, 250_000)]))
    lib = FakeNvmlLib([g], clock)
    with install(lib), nv.Nvml() as n:
        n.devices()
        clock.advance(1000)
        n.sample(g.uuid)
        g.errors["nvmlDeviceGetPowerUsage"] = pynvml.NVML_ERROR_UNKNOWN
        clock.advance(1000)
        bad = n.sample(g.uuid)
        del g.errors["nvmlDeviceGetPowerUsage"]
        clock.advance(1000)
        good = n.sample(g.uuid)
    assert bad.power_mw is None and bad.util_pct == 40.0 and bad.energy_mj is not None
    assert good.power_mw == 250_000
    assert caplog.text.count("power on GPU-h100-0000 failed") == 1


def test_transient_gpm_failure_keeps_gpm(clock):
    g = h100(0, Workload([Phase(1000, 40)]))
    with install(FakeNvmlLib([g], clock)), nv.Nvml() as n:
        n.devices()
        n.sample(g.uuid)
        g.errors["nvmlGpmSampleGet"] = pynvml.NVML_ERROR_UNKNOWN
        clock.advance(1000)
        bad = n.sample(g.uuid)
        del g.errors["nvmlGpmSampleGet"]
        clock.advance(1000)
        good = n.sample(g.uuid)
    assert (bad.util_pct, bad.util_source) == (None, None)
    assert (good.util_pct, good.util_source) == (40.0, nv.UTIL_GPM)


def test_unreadable_mig_slot_is_skipped(clock):
    gpu = mig_a100()
    gpu.migs[0].errors["nvmlDeviceGetUUID"] = pynvml.NVML_ERROR_NO_PERMISSION
    with install(FakeNvmlLib([gpu], clock)), nv.Nvml() as n:
        (dev,) = n.devices()
    assert [m.uuid for m in dev.mig] == ["MIG-a100-gi2"]
