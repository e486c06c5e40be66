"""The hooks' exit-0 contract is structural: the sh entry and the stdlib-only hookmain.

slurmd drains a node whose Prolog/Epilog exits non-zero, so with the package missing, broken
or half-upgraded — or with a job environment that cannot be read — both hooks must exit 0
and say why. PrologSlurmctld alone may exit non-zero, when it asks Slurm to requeue a job.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from slurm_plugin import hookcodes, hookmain

REPO = Path(__file__).resolve().parents[1]
ENTRY = REPO / "slurm_plugin" / "hooks" / "gpuledger-hook"
GPU_JOB = {"SLURM_JOB_ID": "4242", "SLURM_JOB_GPUS": "0", "SLURMD_NODENAME": "n1",
           "SLURM_JOB_USER": "alice"}


def entry(hook: str, venv: Path | str, tmp_path: Path, **env: str):
    log = tmp_path / "hooks.log"
    full = {"PATH": "/usr/bin:/bin", "GPULEDGER_VENV": str(venv),
            "GPULEDGER_HOOK_LOG": str(log), "GPULEDGER_CONFIG": str(tmp_path / "none.toml"),
            **GPU_JOB, **env}
    out = subprocess.run(["/bin/sh", str(ENTRY), hook], env=full, capture_output=True,
                         text=True, timeout=60, check=False)
    return out, (log.read_text() if log.exists() else "")


def fake_venv(tmp_path: Path, package_init: str) -> Path:
    """A venv-shaped directory whose python finds a broken ``slurm_plugin`` package."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    site = tmp_path / "site"
    (site / "slurm_plugin").mkdir(parents=True)
    (site / "slurm_plugin" / "__init__.py").write_text(package_init)
    py = venv / "bin" / "python"
    # -I is passed through; PYTHONPATH is ignored under -I, so put the fake site first by hand.
    py.write_text(f'#!/bin/sh\nexec {sys.executable} -c "import sys, runpy; '
                  f"sys.path.insert(0, '{site}'); sys.argv = sys.argv[1:]; "
                  f"runpy.run_module(sys.argv[0], run_name='__main__')\" \"$3\" \"$4\"\n")
    py.chmod(0o755)
    return venv


@pytest.mark.parametrize("hook", ["prolog", "epilog", "prolog-slurmctld", "epilog-slurmctld"])
def test_missing_install_exits_0_and_says_why(tmp_path, hook):
    out, log = entry(hook, tmp_path / "gone", tmp_path)
    assert out.returncode == 0
    assert f"gpuledger-{hook}[4242]: no Python at {tmp_path}/gone/bin/python" in out.stderr
    assert "gpuledger not installed, or being upgraded" in log


@pytest.mark.parametrize("hook", ["prolog", "epilog"])
def test_broken_package_exits_0_and_logs_the_import_error(tmp_path, hook):
    venv = fake_venv(tmp_path, 'raise ImportError("half-upgraded: cannot import name x")\n')
    out, log = entry(hook, venv, tmp_path)
    assert out.returncode == 0, out.stderr
    assert "exited 1" in log and "ImportError: half-upgraded: cannot import name x" in log


def test_python_that_dies_exits_0(tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("#!/bin/sh\nkill -SEGV $$\n")
    (venv / "bin" / "python").chmod(0o755)
    for hook in ("prolog", "epilog", "prolog-slurmctld"):
        out, log = entry(hook, venv, tmp_path)
        assert out.returncode == 0 and f"gpuledger-{hook}[4242]: the Python hook exited" in log


def test_only_prolog_slurmctld_passes_a_requeue_on(tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text(f"#!/bin/sh\nexit {hookcodes.REQUEUE}\n")
    (venv / "bin" / "python").chmod(0o755)
    assert entry("prolog-slurmctld", venv, tmp_path)[0].returncode == 1
    for hook in ("prolog", "epilog", "epilog-slurmctld"):
        assert entry(hook, venv, tmp_path)[0].returncode == 0


def test_foreign_jobs_never_start_an_interpreter(tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    marker = tmp_path / "started"
    (venv / "bin" / "python").write_text(f"#!/bin/sh\ntouch {marker}\nexit 3\n")
    (venv / "bin" / "python").chmod(0o755)
    out, _ = entry("epilog", venv, tmp_path, SLURM_JOB_GPUS="")
    assert out.returncode == 0 and not marker.exists()
    out, _ = entry("nonsense", venv, tmp_path)
    assert out.returncode == 0 and "unknown hook 'nonsense'" in out.stderr


@pytest.mark.parametrize("hook", ["prolog", "epilog"])
def test_real_install_with_a_garbled_gpu_list_exits_0_and_says_so(tmp_path, hook):
    venv = Path(sys.executable).parent.parent
    cfg = tmp_path / "gpuledger.toml"
    cfg.write_text(f'[database]\nurl = "sqlite:///{tmp_path}/l.db"\n[hooks]\n'
                   f'state_dir = "{tmp_path}/jobs"\nlog_file = "{tmp_path}/hooks.log"\n'
                   'syslog = false\n')
    out, log = entry(hook, venv, tmp_path, SLURM_JOB_GPUS="gpu0,oops",
                     GPULEDGER_CONFIG=str(cfg))
    assert out.returncode == 0, out.stderr
    assert "SLURM_JOB_GPUS='gpu0,oops' is not a list of GPU indices" in log, (log, out.stderr)


def test_console_scripts_exit_0_when_the_hook_module_cannot_import(monkeypatch, capsys):
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_JOB_GPUS", "0")
    monkeypatch.setitem(sys.modules, "slurm_plugin.prolog", None)  # import fails
    monkeypatch.setitem(sys.modules, "slurm_plugin.epilog", None)
    with pytest.raises(SystemExit) as exit_:
        hookmain.prolog_main()
    assert exit_.value.code == 0
    with pytest.raises(SystemExit) as exit_:
        hookmain.epilog_main()
    assert exit_.value.code == 0
    assert "gpuledger-epilog[7]: cannot run (ModuleNotFoundError" in capsys.readouterr().err


def test_hookmain_imports_only_the_standard_library():
    stdlib = sysconfig.get_paths()["stdlib"]
    code = ("import sys; before = set(sys.modules); import slurm_plugin.hookmain; "
            "print('\\n'.join(sorted(set(sys.modules) - before)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    loaded = [m for m in out.stdout.split() if m.split(".")[0] not in ("slurm_plugin",)]
    for name in loaded:
        mod_file = getattr(sys.modules.get(name), "__file__", None) or ""
        assert not mod_file or mod_file.startswith(stdlib), (name, mod_file)


def test_controller_hooks_need_only_the_standard_library():
    """PrologSlurmctld/EpilogSlurmctld run as SlurmUser, possibly on a bare system Python."""
    code = ("import sys; before = set(sys.modules); import slurm_plugin.ctld; "
            "print('\\n'.join(sorted(m.split('.')[0] for m in set(sys.modules) - before)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    third_party = {m for m in out.stdout.split()
                   if m not in sys.stdlib_module_names and m not in ("ledger", "slurm_plugin")
                   and not m.startswith("_")}
    assert third_party == set(), third_party
