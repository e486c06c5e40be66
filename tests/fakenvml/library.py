"""A stand-in for libnvidia-ml: ctypes callbacks that the real pynvml binding calls.

`install()` puts a FakeNvmlLib where pynvml keeps its CDLL handle and clears the
binding's function-pointer cache, so pynvml's own argument passing, struct
filling and NVML_ERROR_* -> NVMLError_* mapping run against our fake devices.
"""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Callable, Iterator
from ctypes import CFUNCTYPE, POINTER, c_int, c_uint, c_uint64, c_void_p, cast

import pynvml

from .devices import FakeClock, FakeGpu, FakeMig

OK = pynvml.NVML_SUCCESS
_VP = c_void_p


def _put(ptr: int, ctype: type, value: int) -> None:
    cast(ptr, POINTER(ctype))[0] = value


def _put_str(buf: int, size: int, text: str) -> int:
    data = text.encode() + b"\0"
    if len(data) > size:
        return pynvml.NVML_ERROR_INSUFFICIENT_SIZE
    ctypes.memmove(buf, data, len(data))
    return OK


class FakeNvmlLib:
    """Attributes named like the C functions; each one is a CFUNCTYPE callback."""

    def __init__(self, gpus: list[FakeGpu], clock: FakeClock, *, init_error: int = OK) -> None:
        self.gpus = gpus
        self.clock = clock
        self.init_error = init_error
        self.calls: dict[str, int] = {}
        self.inits = 0
        self.shutdowns = 0
        self._handles: dict[int, FakeGpu | FakeMig] = {}
        self._parent: dict[int, FakeGpu] = {}
        self._ids: dict[int, int] = {}  # id(device) -> handle
        self._samples: dict[int, tuple[int, int] | None] = {}
        self._next = 0x1000
        self._err = ctypes.create_string_buffer(b"Fake NVML error")
        for name, argtypes, fn in self._table():
            setattr(self, name, self._wrap(name, argtypes, fn))

    # -- plumbing ---------------------------------------------------------
    def _wrap(self, name: str, argtypes: tuple[type, ...], fn: Callable[..., int]):
        restype = c_void_p if name == "nvmlErrorString" else c_int

        def call(*args):
            self.calls[name] = self.calls.get(name, 0) + 1
            try:
                return fn(*args)
            except Exception:  # noqa: BLE001 - a bug in the fake must not cross into C
                import traceback

                traceback.print_exc()
                return pynvml.NVML_ERROR_UNKNOWN

        return CFUNCTYPE(restype, *argtypes)(call)

    def _handle(self, dev: FakeGpu | FakeMig, parent: FakeGpu | None = None) -> int:
        h = self._ids.get(id(dev))
        if h is None:
            h = self._ids[id(dev)] = self._next
            self._next += 0x10
            self._handles[h] = dev
            if parent is not None:
                self._parent[h] = parent
        return h

    def _dev(self, h: int | None, fn: str) -> tuple[FakeGpu | FakeMig | None, int]:
        dev = self._handles.get(h or 0)
        if dev is None:
            return None, pynvml.NVML_ERROR_INVALID_ARGUMENT
        gpu = dev if isinstance(dev, FakeGpu) else self._parent[h]
        if gpu.lost:
            return None, pynvml.NVML_ERROR_GPU_IS_LOST
        if fn in dev.errors:
            return None, dev.errors[fn]
        return dev, OK

    def _t(self) -> int:
        return self.clock.ms - self.clock.t0

    # -- the C API --------------------------------------------------------
    def _table(self):
        U = c_uint
        return [
            ("nvmlInitWithFlags", (U,), self.init),
            ("nvmlShutdown", (), self.shutdown),
            ("nvmlErrorString", (c_int,), lambda code: ctypes.addressof(self._err)),
            ("nvmlDeviceGetCount_v2", (_VP,), self.count),
            ("nvmlDeviceGetHandleByIndex_v2", (U, _VP), self.by_index),
            ("nvmlDeviceGetUUID", (_VP, _VP, U), self.uuid),
            ("nvmlDeviceGetName", (_VP, _VP, U), self.name),
            ("nvmlDeviceGetMinorNumber", (_VP, _VP), self.minor),
            ("nvmlDeviceGetMigMode", (_VP, _VP, _VP), self.mig_mode),
            ("nvmlDeviceGetMaxMigDeviceCount", (_VP, _VP), self.max_mig),
            ("nvmlDeviceGetMigDeviceHandleByIndex", (_VP, U, _VP), self.mig_by_index),
            ("nvmlDeviceGetGpuInstanceId", (_VP, _VP), self.gi_id),
            ("nvmlDeviceGetUtilizationRates", (_VP, _VP), self.util),
            ("nvmlDeviceGetMemoryInfo", (_VP, _VP), self.mem_v1),
            ("nvmlDeviceGetMemoryInfo_v2", (_VP, _VP), self.mem_v2),
            ("nvmlDeviceGetPowerUsage", (_VP, _VP), self.power),
            ("nvmlDeviceGetTotalEnergyConsumption", (_VP, _VP), self.energy),
            ("nvmlGpmQueryDeviceSupport", (_VP, _VP), self.gpm_support),
            ("nvmlGpmSampleAlloc", (_VP,), self.gpm_alloc),
            ("nvmlGpmSampleFree", (_VP,), self.gpm_free),
            ("nvmlGpmSampleGet", (_VP, _VP), self.gpm_sample),
            ("nvmlGpmMigSampleGet", (_VP, U, _VP), self.gpm_mig_sample),
            ("nvmlGpmMetricsGet", (_VP,), self.gpm_metrics),
        ]

    def init(self, flags: int) -> int:
        if self.init_error != OK:
            return self.init_error
        self.inits += 1
        return OK

    def shutdown(self) -> int:
        self.shutdowns += 1
        return OK

    def count(self, p: int) -> int:
        _put(p, c_uint, len(self.gpus))
        return OK

    def by_index(self, i: int, p: int) -> int:
        if i >= len(self.gpus):
            return pynvml.NVML_ERROR_INVALID_ARGUMENT
        if self.gpus[i].lost:
            return pynvml.NVML_ERROR_GPU_IS_LOST
        _put(p, c_void_p, self._handle(self.gpus[i]))
        return OK

    def uuid(self, h: int, buf: int, size: int) -> int:
        dev, rc = self._dev(h, "nvmlDeviceGetUUID")
        return rc if dev is None else _put_str(buf, size, dev.uuid)

    def name(self, h: int, buf: int, size: int) -> int:
        dev, rc = self._dev(h, "nvmlDeviceGetName")
        return rc if dev is None else _put_str(buf, size, dev.name)

    def minor(self, h: int, p: int) -> int:
        dev, rc = self._dev(h, "nvmlDeviceGetMinorNumber")
        if dev is None:
            return rc
        if isinstance(dev, FakeMig):
            return pynvml.NVML_ERROR_NOT_SUPPORTED
        _put(p, c_uint, dev.minor)
        return OK

    def mig_mode(self, h: int, cur: int, pending: int) -> int:
        dev, rc = self._dev(h, "nvmlDeviceGetMigMode")
        if dev is None:
            return rc
        if not isinstance(dev, FakeGpu) or not dev.name.startswith(("NVIDIA A100", "NVIDIA H1")):
            return pynvml.NVML_ERROR_NOT_SUPPORTED
        _put(cur, c_uint, int(dev.mig_enabled))
        _put(pending, c_uint, int(dev.mig_enabled))
        return OK

    def max_mig(self, h: int, p: int) -> int:
        dev, rc = self._dev(h, "nvmlDeviceGetMaxMigDeviceCount")
        if dev is None:
            return rc
        _put(p, c_uint, dev.mig_slots if isinstance(dev, FakeGpu) else 0)
        return OK

    def mig_by_index(self, h: int, i: int, p: int) -> int:
        dev, rc = self._dev(h, "nvmlDeviceGetMigDeviceHandleByIndex")
        if dev is None:
            return rc
        if not isinstance(dev, FakeGpu) or i >= len(dev.migs):
            return pynvml.NVML_ERROR_NOT_FOUND
        _put(p, c_void_p, self._handle(dev.migs[i], dev))
        return OK

    def gi_id(self, h: int, p: int) -> int:
        dev, rc = self._dev(h, "nvmlDeviceGetGpuInstanceId")
        if dev is None:
            return rc
        if not isinstance(dev, FakeMig):
            return pynvml.NVML_ERROR_INVALID_ARGUMENT
        _put(p, c_uint, dev.gpu_instance_id)
        return OK

    def util(self, h: int, p: int) -> int:
        dev, rc = self._dev(h, "nvmlDeviceGetUtilizationRates")
        if dev is None:
            return rc
        if isinstance(dev, FakeMig) or not dev.util_supported:
            return pynvml.NVML_ERROR_NOT_SUPPORTED
        s = cast(p, POINTER(pynvml.c_nvmlUtilization_t))[0]
        phase = dev.workload.at(self._t())
        s.gpu = phase.util_pct
        s.memory = phase.util_pct // 2
        return OK

    def _mem(self, dev: FakeGpu | FakeMig) -> tuple[int, int]:
        total = dev.total_mem if isinstance(dev, FakeGpu) else 40 * 2**30
        return total, dev.workload.at(self._t()).mem_bytes

    def mem_v1(self, h: int, p: int) -> int:
        dev, rc = self._dev(h, "nvmlDeviceGetMemoryInfo")
        if dev is None:
            return rc
        total, used = self._mem(dev)
        s = cast(p, POINTER(pynvml.c_nvmlMemory_t))[0]
        s.total, s.used, s.free = total, used, total - used
        return OK

    def mem_v2(self, h: int, p: int) -> int:
        dev, rc = self._dev(h, "nvmlDeviceGetMemoryInfo_v2")
        if dev is None:
            return rc
        s = cast(p, POINTER(pynvml.c_nvmlMemory_v2_t))[0]
        if s.version != pynvml.nvmlMemory_v2:
            return pynvml.NVML_ERROR_ARGUMENT_VERSION_MISMATCH
        total, used = self._mem(dev)
        s.total, s.reserved, s.used, s.free = total, 0, used, total - used
        return OK

    def power(self, h: int, p: int) -> int:
        dev, rc = self._dev(h, "nvmlDeviceGetPowerUsage")
        if dev is None:
            return rc
        if isinstance(dev, FakeMig):
            return pynvml.NVML_ERROR_NOT_SUPPORTED
        _put(p, c_uint, dev.workload.at(self._t()).power_mw)
        return OK

    def energy(self, h: int, p: int) -> int:
        dev, rc = self._dev(h, "nvmlDeviceGetTotalEnergyConsumption")
        if dev is None:
            return rc
        if isinstance(dev, FakeMig):
            return pynvml.NVML_ERROR_NOT_SUPPORTED
        _put(p, c_uint64, dev.energy_base_mj + dev.workload.energy_uj(self._t()) // 1000)
        return OK

    def gpm_support(self, h: int, p: int) -> int:
        dev, rc = self._dev(h, "nvmlGpmQueryDeviceSupport")
        if dev is None:
            return rc
        s = cast(p, POINTER(pynvml.c_nvmlGpmSupport_t))[0]
        if s.version != pynvml.NVML_GPM_SUPPORT_VERSION:
            return pynvml.NVML_ERROR_ARGUMENT_VERSION_MISMATCH
        s.isSupportedDevice = int(isinstance(dev, FakeGpu) and dev.gpm)
        return OK

    def gpm_alloc(self, p: int) -> int:
        sid = self._next
        self._next += 0x10
        self._samples[sid] = None
        _put(p, c_void_p, sid)
        return OK

    def gpm_free(self, sid: int) -> int:
        return OK if self._samples.pop(sid or 0, False) is not False else pynvml.NVML_ERROR_INVALID_ARGUMENT

    def _fill(self, sid: int, dev: FakeGpu | FakeMig) -> int:
        if (sid or 0) not in self._samples:
            return pynvml.NVML_ERROR_INVALID_ARGUMENT
        t = self._t()
        self._samples[sid] = (t, dev.workload.active_pct_ms(t))
        return OK

    def gpm_sample(self, h: int, sid: int) -> int:
        dev, rc = self._dev(h, "nvmlGpmSampleGet")
        if dev is None:
            return rc
        if not isinstance(dev, FakeGpu) or not dev.gpm:
            return pynvml.NVML_ERROR_NOT_SUPPORTED
        return self._fill(sid, dev)

    def gpm_mig_sample(self, h: int, gi: int, sid: int) -> int:
        dev, rc = self._dev(h, "nvmlGpmMigSampleGet")
        if dev is None:
            return rc
        if not isinstance(dev, FakeGpu) or not dev.gpm:
            return pynvml.NVML_ERROR_NOT_SUPPORTED
        for m in dev.migs:
            if m.gpu_instance_id == gi:
                if "nvmlGpmMigSampleGet" in m.errors:
                    return m.errors["nvmlGpmMigSampleGet"]
                return self._fill(sid, m)
        return pynvml.NVML_ERROR_NOT_FOUND

    def gpm_metrics(self, p: int) -> int:
        req = cast(p, POINTER(pynvml.c_nvmlGpmMetricsGet_t))[0]
        if req.version != pynvml.NVML_GPM_METRICS_GET_VERSION:
            return pynvml.NVML_ERROR_ARGUMENT_VERSION_MISMATCH
        a = self._samples.get(cast(req.sample1, c_void_p).value or 0)
        b = self._samples.get(cast(req.sample2, c_void_p).value or 0)
        if a is None or b is None:
            return pynvml.NVML_ERROR_INVALID_ARGUMENT
        dt = b[0] - a[0]
        for i in range(req.numMetrics):
            m = req.metrics[i]
            if m.metricId != pynvml.NVML_GPM_METRIC_SM_UTIL:
                m.nvmlReturn = pynvml.NVML_ERROR_NOT_SUPPORTED
                continue
            m.nvmlReturn = OK
            m.value = (b[1] - a[1]) / dt if dt > 0 else 0.0
        return OK


@contextlib.contextmanager
def install(lib: FakeNvmlLib | None) -> Iterator[FakeNvmlLib | None]:
    """Swap pynvml's library handle for `lib` (None: no library can be loaded)."""
    saved = (pynvml.nvmlLib, dict(pynvml._nvmlGetFunctionPointer_cache),
             pynvml._nvmlLib_refcount, pynvml.CDLL)

    def no_library(name, *a, **k):
        raise OSError(f"{name}: cannot open shared object file")

    pynvml._nvmlGetFunctionPointer_cache.clear()
    pynvml._nvmlLib_refcount = 0
    pynvml.nvmlLib = lib
    pynvml.CDLL = no_library  # only reached when lib is None
    try:
        yield lib
    finally:
        pynvml.nvmlLib, cache, pynvml._nvmlLib_refcount, pynvml.CDLL = saved
        pynvml._nvmlGetFunctionPointer_cache.clear()
        pynvml._nvmlGetFunctionPointer_cache.update(cache)
