"""Slurm GPU index -> NVML device: gres.conf, device-file minors, MIG caps, config."""

import os
import stat

import pytest
from conftest import need
from fakenvml import FakeClock, FakeNvmlLib, h100, install
from fakenvml.scenario import mig_a100

from ledger.slurmsyntax import SlurmSyntaxError
from ledger.slurmsyntax import expand_hostlist as expand
from slurm_plugin.agent.config import AgentConfig
from slurm_plugin.agent.gpumap import GpuMap, MappingError, char_minor
from slurm_plugin.agent.gresconf import parse_gres_conf, parse_mig_minors
from slurm_plugin.nvml import Nvml

GRES = """
# site gres.conf
AutoDetect=off
NodeName=gpu[01-02] Name=gpu Type=h100 File=/dev/nvidia[2-3]
NodeName=gpu[01-02] Name=gpu Type=h100 File=/dev/nvidia0,/dev/nvidia1  # second pair
NodeName=gpu03 Name=gpu File=/dev/nvidia0
Name=mps Count=100
NodeName=gpu01 Name=shard Count=8
"""

MIG_MINORS = """config 1
monitor 2
gpu0/gi1/access 21
gpu0/gi1/ci0/access 22
gpu0/gi2/access 30
gpu0/gi2/ci0/access 31
"""


def fake_stat(table):
    """stat() for device files: path -> (is_char, minor)."""

    def _stat(path):
        if path not in table:
            raise FileNotFoundError(2, "No such file or directory", path)
        is_char, minor = table[path]
        mode = (stat.S_IFCHR if is_char else stat.S_IFREG) | 0o666
        return _Result(mode, os.makedev(195 if is_char else 0, minor))

    return _stat


class _Result:
    def __init__(self, mode, rdev):
        self.st_mode, self.st_rdev = mode, rdev


def test_expand_host_and_file_lists():
    assert expand("gpu[01-03,7],login") == ["gpu01", "gpu02", "gpu03", "gpu7", "login"]
    assert expand("/dev/nvidia[0-1]") == ["/dev/nvidia0", "/dev/nvidia1"]
    assert expand("n[1-2]-x[3-4]") == ["n1-x3", "n1-x4", "n2-x3", "n2-x4"]
    with pytest.raises(SlurmSyntaxError):  # Slurm's ranges are numbers (src/common/hostlist.c)
        expand("n[1-2]-[a,b]")


def test_gres_conf_order_for_this_node():
    assert parse_gres_conf(GRES, "gpu02") == [
        ("/dev/nvidia2",), ("/dev/nvidia3",), ("/dev/nvidia0",), ("/dev/nvidia1",)]
    assert parse_gres_conf(GRES, "gpu03") == [("/dev/nvidia0",)]
    assert parse_gres_conf(GRES, "other") == []
    multi = "Name=gpu MultipleFiles=/dev/nvidia0,/dev/nvidia-caps/nvidia-cap[21-22]"
    assert parse_gres_conf(multi, "x") == [
        ("/dev/nvidia0", "/dev/nvidia-caps/nvidia-cap21", "/dev/nvidia-caps/nvidia-cap22")]


def test_mig_minors():
    assert parse_mig_minors(MIG_MINORS) == {21: (0, 1), 22: (0, 1), 30: (0, 2), 31: (0, 2)}


def devices_of(gpus):
    with install(FakeNvmlLib(gpus, FakeClock())), Nvml() as n:
        return n.devices()


def test_slurm_order_is_not_nvml_order():
    # NVML enumerates by PCI order; minors 3,2,1,0 -> Slurm index 0 is /dev/nvidia2
    devs = devices_of([h100(3), h100(2), h100(1), h100(0)])
    table = {f"/dev/nvidia{i}": (True, i) for i in range(4)}
    m = GpuMap(devs, parse_gres_conf(GRES, "gpu01"), stat=fake_stat(table))
    assert [m.bind(i).uuid for i in range(4)] == [
        "GPU-h100-0002", "GPU-h100-0003", "GPU-h100-0000", "GPU-h100-0001"]
    assert all(m.bind(i).measured for i in range(4))


def test_mapping_failures_are_unmeasured_with_reason(caplog):
    devs = devices_of([h100(0)])
    specs = [("/dev/nvidia0",), ("/dev/nvidia1",), ("/dev/nvidia9",), ("/dev/fake",),
             ("GPU-missing",), ("/dev/nvidia0", "/dev/nvidia1")]
    table = {"/dev/nvidia0": (True, 0), "/dev/nvidia1": (False, 1), "/dev/nvidia9": (True, 9)}
    m = GpuMap(devs, specs, stat=fake_stat(table))
    b = [m.bind(i) for i in range(7)]
    assert b[0].measured and b[0].uuid == "GPU-h100-0000"
    reasons = [x.reason for x in b[1:]]
    assert not any(x.measured for x in b[1:])
    assert "not a character device" in reasons[0]
    assert "no NVML device with minor 9" in reasons[1]
    assert "expected one /dev/nvidiaN" in reasons[2]
    assert "NVML has no device GPU-missing" in reasons[3]
    assert "expected one /dev/nvidiaN" in reasons[4]
    assert "no gres.conf device for index 6" in reasons[5]
    assert "gpuledger-agent: GPU index 1 not mapped" in caplog.text


def test_mig_slice_by_caps_minor_and_by_uuid():
    devs = devices_of([mig_a100()])
    table = {"/dev/nvidia0": (True, 0), "/dev/nvidia-caps/nvidia-cap30": (True, 30),
             "/dev/nvidia-caps/nvidia-cap31": (True, 31), "/dev/nvidia-caps/nvidia-cap99": (True, 99)}
    specs = [("/dev/nvidia0", "/dev/nvidia-caps/nvidia-cap30", "/dev/nvidia-caps/nvidia-cap31"),
             ("MIG-a100-gi1",), ("/dev/nvidia0", "/dev/nvidia-caps/nvidia-cap99"), ("/dev/nvidia0",)]
    m = GpuMap(devs, specs, mig_minors=parse_mig_minors(MIG_MINORS), stat=fake_stat(table))
    assert m.bind(0).uuid == "MIG-a100-gi2"
    assert m.bind(1).uuid == "MIG-a100-gi1"
    assert not m.bind(2).measured and "no MIG instance" in m.bind(2).reason
    assert m.bind(3).uuid == "GPU-a100-0000"  # whole GPU


def test_real_character_device_minor(tmp_path):
    need(os.geteuid() == 0, "root (mknod)")
    p = tmp_path / "nvidia5"
    os.mknod(p, stat.S_IFCHR | 0o600, os.makedev(195, 5))
    assert char_minor(str(p)) == 5
    with pytest.raises(MappingError):
        char_minor(str(tmp_path / "missing"))


def test_config_file_and_overrides(tmp_path):
    gres = tmp_path / "gres.conf"
    gres.write_text(GRES)
    cfg_file = tmp_path / "agent.toml"
    cfg_file.write_text(f'[agent]\ngres_conf = "{gres}"\nnode_name = "gpu03"\ninterval = 2.0\n')
    cfg = AgentConfig.load(str(cfg_file), interval=0.5, socket=None)
    assert cfg.interval == 0.5 and cfg.specs() == [("/dev/nvidia0",)]
    cfg.devices = ["GPU-a", ["/dev/nvidia0", "/dev/nvidia-caps/nvidia-cap21"]]
    assert cfg.specs() == [("GPU-a",), ("/dev/nvidia0", "/dev/nvidia-caps/nvidia-cap21")]
    cfg_file.write_text("[agent]\nbogus = 1\n")
    with pytest.raises(ValueError, match=r"agent.toml: \[agent\]: unknown setting\(s\) bogus"):
        AgentConfig.load(str(cfg_file))
    cfg_file.write_text("[agent]\nintervall = 2\n")
    with pytest.raises(ValueError, match=r"intervall \(did you mean interval\?\)"):
        AgentConfig.load(str(cfg_file))
    cfg_file.write_text('[database]\nurl = "x"\n')  # a shared gpuledger.toml: no [agent]
    assert AgentConfig.load(str(cfg_file)).interval == 1.0
    cfg_file.write_text('[ledger]\nurl = "x"\n')  # a table gpuledger.toml does not have
    with pytest.raises(ValueError, match=r"unknown section\(s\) ledger"):
        AgentConfig.load(str(cfg_file))
