"""Typed wrapper around NVML (nvidia-ml-py). The only module that imports pynvml."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Self, TypeVar

try:  # the binding itself may be missing on a node
    import pynvml
except ImportError:  # pragma: no cover - exercised only without nvidia-ml-py
    pynvml = None  # type: ignore[assignment]

log = logging.getLogger("gpuledger.agent")

T = TypeVar("T")

UTIL_GPM = "gpm"
UTIL_RATES = "util"


class NvmlError(Exception):
    """Any NVML failure; `code` is the NVML_ERROR_* value when there is one."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class NvmlUnavailable(NvmlError):
    """Library missing, driver not loaded, or NVML not initialised."""


class NvmlNotSupported(NvmlError):
    """The device or driver does not offer this query."""


class NvmlNoPermission(NvmlError):
    """The caller may not make this query."""


class NvmlGpuLost(NvmlError):
    """The GPU fell off the bus, needs a reset, or is gone."""


class NvmlNotFound(NvmlError):
    """No such device (index, UUID or MIG slot)."""


def _code_map() -> dict[int, type[NvmlError]]:
    if pynvml is None:
        return {}
    names: dict[str, type[NvmlError]] = {
        "NVML_ERROR_UNINITIALIZED": NvmlUnavailable,
        "NVML_ERROR_LIBRARY_NOT_FOUND": NvmlUnavailable,
        "NVML_ERROR_DRIVER_NOT_LOADED": NvmlUnavailable,
        "NVML_ERROR_LIB_RM_VERSION_MISMATCH": NvmlUnavailable,
        "NVML_ERROR_NOT_SUPPORTED": NvmlNotSupported,
        "NVML_ERROR_FUNCTION_NOT_FOUND": NvmlNotSupported,
        "NVML_ERROR_ARGUMENT_VERSION_MISMATCH": NvmlNotSupported,
        "NVML_ERROR_NO_PERMISSION": NvmlNoPermission,
        "NVML_ERROR_GPU_IS_LOST": NvmlGpuLost,
        "NVML_ERROR_RESET_REQUIRED": NvmlGpuLost,
        "NVML_ERROR_GPU_NOT_FOUND": NvmlGpuLost,
        "NVML_ERROR_NOT_FOUND": NvmlNotFound,
    }
    return {getattr(pynvml, n): cls for n, cls in names.items() if hasattr(pynvml, n)}


_CODES = _code_map()


def translate(exc: Exception) -> NvmlError:
    """Map a pynvml.NVMLError to one of our exception types."""
    code = getattr(exc, "value", None)
    cls = _CODES.get(code, NvmlError) if isinstance(code, int) else NvmlError
    try:
        text = str(exc)
    except Exception:  # noqa: BLE001 - str() of an NVMLError may call into the library
        text = f"NVML error {code}"
    return cls(text, code if isinstance(code, int) else None)


def _call(fn: Callable[..., T], *args: Any) -> T:
    try:
        return fn(*args)
    except pynvml.NVMLError as exc:
        raise translate(exc) from None


def _text(value: str | bytes) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


@dataclass(frozen=True)
class DeviceInfo:
    """One NVML device: a physical GPU or a MIG instance (parent_uuid set)."""

    index: int
    minor: int | None
    uuid: str
    name: str
    mig_enabled: bool = False
    parent_uuid: str | None = None
    gpu_instance_id: int | None = None
    mig: tuple[DeviceInfo, ...] = ()

    @property
    def is_mig(self) -> bool:
        return self.parent_uuid is not None


@dataclass(frozen=True)
class Sample:
    """One reading of a device; a metric is None when it could not be read."""

    uuid: str
    util_pct: float | None
    util_source: str | None
    mem_used_bytes: int | None
    power_mw: int | None
    energy_mj: int | None


@dataclass
class _Dev:
    info: DeviceInfo
    handle: Any
    parent_handle: Any = None
    gpm: bool | None = None  # None: not asked yet
    gpm_prev: Any = None
    gpm_cur: Any = None
    gpm_primed: bool = False


class Nvml:
    """An NVML session: open once, list devices, sample them, close."""

    def __init__(self) -> None:
        self._open = False
        self._devs: dict[str, _Dev] = {}
        self._off: dict[str, set[str]] = {}  # uuid -> metrics known unavailable
        self._failing: set[tuple[str, str]] = set()  # (uuid, metric) with a transient error

    # -- lifetime -------------------------------------------------------
    def open(self) -> None:
        if pynvml is None:
            raise NvmlUnavailable("nvidia-ml-py is not installed")
        if self._open:
            return
        _call(pynvml.nvmlInit)
        self._open = True

    def close(self) -> None:
        if not self._open:
            return
        for dev in self._devs.values():
            for s in (dev.gpm_prev, dev.gpm_cur):
                if s is not None:
                    try:
                        _call(pynvml.nvmlGpmSampleFree, s)
                    except NvmlError:
                        pass
        self._devs.clear()
        self._off.clear()
        self._open = False
        try:
            _call(pynvml.nvmlShutdown)
        except NvmlError as exc:
            log.warning("gpuledger-agent: nvmlShutdown failed: %s", exc)

    def __enter__(self) -> Self:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def is_open(self) -> bool:
        return self._open

    # -- inventory ------------------------------------------------------
    def devices(self) -> list[DeviceInfo]:
        """All physical GPUs (with their MIG instances); lost ones are skipped."""
        self._require_open()
        out: list[DeviceInfo] = []
        for i in range(_call(pynvml.nvmlDeviceGetCount)):
            try:
                out.append(self._physical(i))
            except NvmlError as exc:
                log.warning("gpuledger-agent: GPU index %d skipped: %s", i, exc)
        return out

    def _physical(self, index: int) -> DeviceInfo:
        h = _call(pynvml.nvmlDeviceGetHandleByIndex, index)
        uuid = _text(_call(pynvml.nvmlDeviceGetUUID, h))
        name = _text(_call(pynvml.nvmlDeviceGetName, h))
        minor = self._optional(lambda: _call(pynvml.nvmlDeviceGetMinorNumber, h))
        mode = self._optional(lambda: _call(pynvml.nvmlDeviceGetMigMode, h))
        mig_on = bool(mode and mode[0] == getattr(pynvml, "NVML_DEVICE_MIG_ENABLE", 1))
        migs = self._mig_instances(h, index, uuid) if mig_on else ()
        info = DeviceInfo(index, minor, uuid, name, mig_on, mig=migs)
        self._devs[uuid] = _Dev(info, h)
        return info

    def _mig_instances(self, parent: Any, index: int, parent_uuid: str) -> tuple[DeviceInfo, ...]:
        out = []
        for j in range(_call(pynvml.nvmlDeviceGetMaxMigDeviceCount, parent)):
            try:
                mh = _call(pynvml.nvmlDeviceGetMigDeviceHandleByIndex, parent, j)
            except NvmlNotFound:
                continue  # empty slot
            try:
                uuid = _text(_call(pynvml.nvmlDeviceGetUUID, mh))
                name = _text(_call(pynvml.nvmlDeviceGetName, mh))
                gi = _call(pynvml.nvmlDeviceGetGpuInstanceId, mh)
            except (NvmlNotSupported, NvmlNoPermission, NvmlNotFound) as exc:
                log.warning("gpuledger-agent: MIG slot %d of %s skipped: %s", j, parent_uuid, exc)
                continue
            info = DeviceInfo(index, None, uuid, name, parent_uuid=parent_uuid, gpu_instance_id=gi)
            self._devs[uuid] = _Dev(info, mh, parent_handle=parent)
            out.append(info)
        return tuple(out)

    @staticmethod
    def _optional(fn: Callable[[], T]) -> T | None:
        try:
            return fn()
        except (NvmlNotSupported, NvmlNoPermission):
            return None

    # -- sampling -------------------------------------------------------
    def sample(self, uuid: str, *, util: bool = True) -> Sample:
        """Read one device. Metrics that fail with NotSupported/NoPermission are None.

        Raises NvmlGpuLost when the device is gone, NvmlNotFound for an unknown UUID.
        `util=False` skips utilization (and leaves the GPM window untouched).
        """
        self._require_open()
        dev = self._devs.get(uuid)
        if dev is None:
            raise NvmlNotFound(f"unknown device {uuid}")
        h = dev.handle
        pct, source = self._utilization(dev) if util else (None, None)
        mem = self._metric(uuid, "memory", lambda: self._memory_used(h))
        power = self._metric(uuid, "power", lambda: _call(pynvml.nvmlDeviceGetPowerUsage, h))
        energy = self._metric(
            uuid, "energy", lambda: _call(pynvml.nvmlDeviceGetTotalEnergyConsumption, h)
        )
        return Sample(uuid, pct, source, mem, power, energy)

    def _metric(self, uuid: str, name: str, fn: Callable[[], T]) -> T | None:
        off = self._off.setdefault(uuid, set())
        if name in off:
            return None
        try:
            value = fn()
        except (NvmlNotSupported, NvmlNoPermission) as exc:
            off.add(name)
            log.info("gpuledger-agent: %s on %s unavailable (%s); not asked again", name, uuid, exc)
            return None
        except (NvmlGpuLost, NvmlUnavailable):
            raise
        except NvmlError as exc:  # transient (timeout, unknown): this reading only
            if (uuid, name) not in self._failing:
                self._failing.add((uuid, name))
                log.warning("gpuledger-agent: %s on %s failed: %s", name, uuid, exc)
            return None
        self._failing.discard((uuid, name))
        return value

    @staticmethod
    def _memory_used(h: Any) -> int:
        try:
            return int(_call(pynvml.nvmlDeviceGetMemoryInfo, h, pynvml.nvmlMemory_v2).used)
        except NvmlNotSupported:
            return int(_call(pynvml.nvmlDeviceGetMemoryInfo, h).used)

    def _utilization(self, dev: _Dev) -> tuple[float | None, str | None]:
        uuid = dev.info.uuid
        if dev.gpm is None:
            dev.gpm = self._gpm_supported(dev)
        if dev.gpm:
            try:
                value = self._metric(uuid, "gpm", lambda: self._gpm_sm_util(dev))
            finally:
                if "gpm" in self._off.get(uuid, ()):
                    dev.gpm = False
            if dev.gpm:
                return (value, UTIL_GPM) if value is not None else (None, None)
            log.info("gpuledger-agent: using utilization rates on %s", uuid)
        rates = self._metric(
            uuid, "util", lambda: _call(pynvml.nvmlDeviceGetUtilizationRates, dev.handle)
        )
        return (float(rates.gpu), UTIL_RATES) if rates is not None else (None, None)

    def _gpm_supported(self, dev: _Dev) -> bool:
        target = dev.parent_handle if dev.info.is_mig else dev.handle
        try:
            return bool(_call(pynvml.nvmlGpmQueryDeviceSupport, target).isSupportedDevice)
        except (NvmlNotSupported, NvmlNoPermission):
            return False

    def _gpm_sm_util(self, dev: _Dev) -> float | None:
        """SM activity (%) between the previous GPM sample and now; None on the first."""
        if dev.gpm_cur is None:
            dev.gpm_prev = _call(pynvml.nvmlGpmSampleAlloc)
            dev.gpm_cur = _call(pynvml.nvmlGpmSampleAlloc)
        if dev.info.is_mig:
            gi = dev.info.gpu_instance_id
            _call(pynvml.nvmlGpmMigSampleGet, dev.parent_handle, gi, dev.gpm_cur)
        else:
            _call(pynvml.nvmlGpmSampleGet, dev.handle, dev.gpm_cur)
        primed = dev.gpm_primed
        dev.gpm_prev, dev.gpm_cur = dev.gpm_cur, dev.gpm_prev
        dev.gpm_primed = True
        if not primed:
            return None
        req = pynvml.c_nvmlGpmMetricsGet_t()
        req.version = pynvml.NVML_GPM_METRICS_GET_VERSION
        req.numMetrics = 1
        req.sample1 = dev.gpm_cur  # the older one, after the swap
        req.sample2 = dev.gpm_prev
        req.metrics[0].metricId = pynvml.NVML_GPM_METRIC_SM_UTIL
        _call(pynvml.nvmlGpmMetricsGet, req)
        metric = req.metrics[0]
        if metric.nvmlReturn != pynvml.NVML_SUCCESS:
            raise translate(pynvml.NVMLError(metric.nvmlReturn))
        return min(100.0, max(0.0, float(metric.value)))

    def _require_open(self) -> None:
        if not self._open:
            raise NvmlUnavailable("NVML is not initialised")
