"""Map Slurm GPU indices to NVML devices via device-file minor numbers or UUIDs."""

from __future__ import annotations

import logging
import os
import re
import stat as stat_mod
from collections.abc import Callable, Sequence

from slurm_plugin.agent.models import GpuBinding
from slurm_plugin.nvml import DeviceInfo

log = logging.getLogger("gpuledger.agent")

_GPU_FILE = re.compile(r"^/dev/nvidia\d+$")
_CAP_FILE = re.compile(r"^/dev/nvidia-caps/nvidia-cap\d+$")


class MappingError(Exception):
    """A Slurm GPU index could not be tied to an NVML device."""


def char_minor(path: str, stat: Callable[[str], os.stat_result] = os.stat) -> int:
    """Minor number of a character device file."""
    try:
        st = stat(path)
    except OSError as exc:
        raise MappingError(f"cannot stat {path}: {exc.strerror or exc}") from None
    if not stat_mod.S_ISCHR(st.st_mode):
        raise MappingError(f"{path} is not a character device")
    return os.minor(st.st_rdev)


class GpuMap:
    """Resolves `SLURM_JOB_GPUS` indices against the devices NVML reported."""

    def __init__(
        self,
        devices: Sequence[DeviceInfo],
        specs: Sequence[tuple[str, ...]],
        *,
        mig_minors: dict[int, tuple[int, int]] | None = None,
        stat: Callable[[str], os.stat_result] = os.stat,
    ) -> None:
        self.specs = list(specs)
        self.mig_minors = mig_minors or {}
        self._stat = stat
        self._by_uuid: dict[str, DeviceInfo] = {}
        self._by_minor: dict[int, DeviceInfo] = {}
        for d in devices:
            self._by_uuid[d.uuid] = d
            if d.minor is not None:
                self._by_minor[d.minor] = d
            for m in d.mig:
                self._by_uuid[m.uuid] = m

    def bind(self, index: int) -> GpuBinding:
        """Binding for one index; a failure is logged and returned unmeasured."""
        try:
            dev = self.resolve(index)
        except MappingError as exc:
            log.warning("gpuledger-agent: GPU index %d not mapped: %s", index, exc)
            return GpuBinding(index, None, False, f"unmapped: {exc}")
        return GpuBinding(index, dev.uuid, True, None)

    def resolve(self, index: int) -> DeviceInfo:
        if not 0 <= index < len(self.specs):
            raise MappingError(f"no gres.conf device for index {index} ({len(self.specs)} known)")
        spec = self.specs[index]
        uuids = [s for s in spec if s.startswith(("GPU-", "MIG-"))]
        if uuids:
            dev = self._by_uuid.get(uuids[0])
            if dev is None:
                raise MappingError(f"NVML has no device {uuids[0]}")
            return dev
        gpu_files = [p for p in spec if _GPU_FILE.match(p)]
        if len(gpu_files) != 1:
            raise MappingError(f"expected one /dev/nvidiaN file in {list(spec)}")
        minor = char_minor(gpu_files[0], self._stat)
        parent = self._by_minor.get(minor)
        if parent is None:
            raise MappingError(f"no NVML device with minor {minor} ({gpu_files[0]})")
        caps = [p for p in spec if _CAP_FILE.match(p)]
        if not caps:
            return parent
        return self._mig(parent, minor, caps)

    def _mig(self, parent: DeviceInfo, minor: int, caps: list[str]) -> DeviceInfo:
        for cap in caps:
            hit = self.mig_minors.get(char_minor(cap, self._stat))
            if hit is None or hit[0] != minor:
                continue
            for m in parent.mig:
                if m.gpu_instance_id == hit[1]:
                    return m
            raise MappingError(f"{parent.uuid} has no MIG instance with GI {hit[1]}")
        raise MappingError(f"no MIG instance of {parent.uuid} matches {caps}")
