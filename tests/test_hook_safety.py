"""The root hooks against a hostile node: symlinks, unsafe directories, oversized environment.

The prolog/epilog run as root. Where a site left one of their directories writable by users,
a planted symlink must not make root overwrite or append to another file; such a directory is
refused with one log line and the hook still exits 0. Every value read from the environment
is bounded before it is expanded (a 14 KB ``SLURM_JOB_GPUS`` once cost 2.4 GB). The sh entry
runs nothing found through the caller's ``PATH``.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slurm_plugin import hookenv, hooklog, jobstate, prolog
from slurm_plugin.agent.spool import Spool

REPO = Path(__file__).resolve().parents[1]
ENTRY = REPO / "slurm_plugin" / "hooks" / "gpuledger-hook"
VICTIM_TEXT = "root:do-not-touch\n"
ROOT = os.geteuid() == 0


def victim(tmp_path: Path) -> Path:
    v = tmp_path / "outside" / "victim"
    v.parent.mkdir()
    v.write_text(VICTIM_TEXT)
    return v


def config(tmp_path: Path, state_dir: Path, log_file: Path) -> Path:
    cfg = tmp_path / "gpuledger.toml"
    cfg.write_text(f'[database]\nurl = "sqlite:///{tmp_path}/l.db"\n[hooks]\n'
                   f'state_dir = "{state_dir}"\nlog_file = "{log_file}"\nsyslog = false\n'
                   f'agent_socket = "{tmp_path}/no-agent.sock"\n'
                   f'agent_spool = "{tmp_path}/no-spool"\n'
                   f'gres_conf = "{tmp_path}/no-gres.conf"\n')
    return cfg


def run_prolog(tmp_path, monkeypatch, state_dir: Path, log_file: Path, **env: str) -> int:
    monkeypatch.setenv("GPULEDGER_CONFIG", str(config(tmp_path, state_dir, log_file)))
    full = {"SLURM_JOB_ID": "4242", "SLURM_JOB_GPUS": "0,1", "SLURMD_NODENAME": "n1",
            "SLURM_JOB_USER": "alice", **env}
    return hookenv.run("gpuledger-prolog", prolog.prolog, full)


# -- item 8: files root writes ----------------------------------------------------------------


def test_a_symlink_at_the_records_temp_name_does_not_replace_the_victim(tmp_path, monkeypatch):
    v = victim(tmp_path)
    jobs = tmp_path / "jobs"
    jobs.mkdir(mode=0o700)
    (jobs / "4242.0.tmp").symlink_to(v)  # the old fixed temp name
    assert run_prolog(tmp_path, monkeypatch, jobs, tmp_path / "hooks.log") == 0
    assert v.read_text() == VICTIM_TEXT and not v.is_symlink()
    run = jobstate.load(jobs, "4242")
    assert run is not None and run.gpus == [0, 1]
    assert not (jobs / "4242.0.json").is_symlink()


def test_a_symlink_at_the_records_name_is_replaced_not_followed(tmp_path):
    v = victim(tmp_path)
    jobs = tmp_path / "jobs"
    jobs.mkdir(mode=0o700)
    (jobs / "7.0.json").symlink_to(v)
    jobstate.save(jobs, jobstate.NodeRun(job_id="7", restart=0, node="n1", start=1.0))
    assert v.read_text() == VICTIM_TEXT
    assert not (jobs / "7.0.json").is_symlink() and jobstate.load(jobs, "7").node == "n1"


@pytest.mark.parametrize("mode", [0o777, 0o1777, 0o770, 0o702])
def test_a_state_dir_others_can_write_is_refused_with_a_log_line(tmp_path, monkeypatch,
                                                                 capsys, mode):
    v = victim(tmp_path)
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    jobs.chmod(mode)
    (jobs / "4242.0.tmp").symlink_to(v)
    log = tmp_path / "hooks.log"
    assert run_prolog(tmp_path, monkeypatch, jobs, log) == 0
    assert v.read_text() == VICTIM_TEXT
    assert not (jobs / "4242.0.json").exists()
    text = log.read_text()
    assert "gpuledger-prolog[4242]: " in text and "writable by group or others" in text, text
    assert "refused" in text


@pytest.mark.skipif(not ROOT, reason="chown needs root")
def test_a_state_dir_owned_by_another_uid_is_refused(tmp_path, monkeypatch):
    jobs = tmp_path / "jobs"
    jobs.mkdir(mode=0o700)
    os.chown(jobs, 65534, 65534)
    log = tmp_path / "hooks.log"
    assert run_prolog(tmp_path, monkeypatch, jobs, log) == 0
    assert os.listdir(jobs) == []
    assert "owned by uid 65534" in log.read_text()


@pytest.mark.skipif(not ROOT, reason="chown needs root")
def test_a_state_dir_under_a_parent_owned_by_another_uid_is_refused(tmp_path, monkeypatch):
    user = tmp_path / "user"
    user.mkdir(mode=0o755)
    os.chown(user, 65534, 65534)
    log = tmp_path / "hooks.log"
    assert run_prolog(tmp_path, monkeypatch, user / "jobs", log) == 0
    assert not (user / "jobs").exists()
    assert "owned by uid 65534" in log.read_text()


def test_a_symlinked_state_dir_is_refused(tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    (tmp_path / "jobs").symlink_to(elsewhere)
    log = tmp_path / "hooks.log"
    assert run_prolog(tmp_path, monkeypatch, tmp_path / "jobs", log) == 0
    assert os.listdir(elsewhere) == []
    assert "refused" in log.read_text()


def test_the_epilog_refuses_an_unsafe_state_dir_and_exits_0(tmp_path, monkeypatch):
    from slurm_plugin import epilog

    jobs = tmp_path / "jobs"
    jobs.mkdir(mode=0o700)
    jobstate.save(jobs, jobstate.NodeRun(job_id="4242", restart=0, node="n1", start=1.0))
    jobs.chmod(0o777)
    log = tmp_path / "hooks.log"
    monkeypatch.setenv("GPULEDGER_CONFIG", str(config(tmp_path, jobs, log)))
    rc = hookenv.run("gpuledger-epilog", epilog.epilog,
                     {"SLURM_JOB_ID": "4242", "SLURM_JOB_GPUS": "0", "SLURMD_NODENAME": "n1"})
    assert rc == 0
    assert "writable by group or others" in log.read_text()
    assert (jobs / "4242.0.json").exists()  # nothing removed through it either


def test_a_symlinked_hook_log_is_not_appended_to(tmp_path, monkeypatch, capsys):
    v = victim(tmp_path)
    logs = tmp_path / "logs"
    logs.mkdir(mode=0o755)
    (logs / "hooks.log").symlink_to(v)
    jobs = tmp_path / "jobs"
    assert run_prolog(tmp_path, monkeypatch, jobs, logs / "hooks.log") == 0
    assert v.read_text() == VICTIM_TEXT
    err = capsys.readouterr().err
    assert "gpuledger-prolog[4242]: hook log" in err and "refused" in err, err
    assert jobstate.load(jobs, "4242") is not None  # the hook itself went on


def test_a_hook_log_in_a_directory_others_can_write_is_refused(tmp_path, capsys):
    logs = tmp_path / "logs"
    logs.mkdir()
    logs.chmod(0o777)
    log = hooklog.setup("gpuledger-epilog", "9", logs / "hooks.log", use_syslog=False)
    log.info("hello")
    assert not (logs / "hooks.log").exists()
    err = capsys.readouterr().err
    assert "gpuledger-epilog[9]: hello" in err and "writable by group or others" in err


def test_a_hardlinked_hook_log_is_not_appended_to(tmp_path, capsys):
    v = victim(tmp_path)
    logs = tmp_path / "logs"
    logs.mkdir(mode=0o755)
    os.link(v, logs / "hooks.log")
    hooklog.setup("gpuledger-epilog", "9", logs / "hooks.log", use_syslog=False).info("x")
    assert v.read_text() == VICTIM_TEXT
    assert "refused" in capsys.readouterr().err


def test_the_hook_log_is_still_written_where_it_is_safe(tmp_path):
    log_file = tmp_path / "new" / "hooks.log"
    hooklog.setup("gpuledger-epilog", "9", log_file, use_syslog=False).info("hello")
    for h in hooklog.logging.getLogger("gpuledger").handlers:
        h.flush()
    assert "gpuledger-epilog[9]: hello" in log_file.read_text()


def test_a_symlink_at_the_spools_temp_name_does_not_replace_the_victim(tmp_path):
    v = victim(tmp_path)
    sp = Spool(tmp_path / "spool")
    sp.ensure()
    (tmp_path / "spool" / f".job-5.1.json.{os.getpid()}.tmp").symlink_to(v)
    sp.write(5, 1, {"a": 1})
    assert v.read_text() == VICTIM_TEXT and sp.read(5, 1) == {"a": 1}


def test_a_spool_dir_others_can_write_is_refused(tmp_path):
    v = victim(tmp_path)
    d = tmp_path / "spool"
    d.mkdir()
    d.chmod(0o777)
    (d / "job-5.1.json").symlink_to(v)
    sp = Spool(d)
    with pytest.raises(OSError, match="writable by group or others"):
        sp.write(5, 1, {"a": 1})
    assert sp.read(5, 1) is None and sp.load_all() == [] and sp.prune(0, 1e12) == 0
    assert v.read_text() == VICTIM_TEXT and v.exists()


def test_a_symlinked_spool_dir_is_not_chmodded_through(tmp_path):
    target = tmp_path / "target"
    target.mkdir(mode=0o755)
    (tmp_path / "spool").symlink_to(target)
    with pytest.raises(OSError):
        Spool(tmp_path / "spool").ensure()
    assert oct(target.stat().st_mode & 0o777) == oct(0o755)


def test_a_symlinked_spool_file_is_not_read(tmp_path):
    v = tmp_path / "outside.json"
    v.write_text('{"secret": 1}')
    sp = Spool(tmp_path / "spool")
    sp.ensure()
    (tmp_path / "spool" / "job-5.1.json").symlink_to(v)
    assert sp.read(5, 1) is None and sp.load_all() == []


# -- item 9: bounded environment --------------------------------------------------------------


def _peak_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def test_a_14_kb_gpu_list_is_refused_without_expanding_it():
    hostile = ",".join(["0-4096"] * 2000)  # 14 KB, 8.2 million indices once expanded
    before, t0 = _peak_kib(), time.perf_counter()
    e = hookenv.HookEnv.from_env({"SLURM_JOB_ID": "1", "SLURM_JOB_GPUS": hostile})
    assert time.perf_counter() - t0 < 0.5
    assert _peak_kib() - before < 20_000  # KiB
    assert e.gpus == []
    assert len(e.problems) == 1 and "SLURM_JOB_GPUS" in e.problems[0]
    assert len(e.problems[0]) < 200


@pytest.mark.parametrize("text", ["0-4096", "0-999999999999", "0-600,0-600", "0," * 1100 + "0"])
def test_short_gpu_lists_that_expand_too_far_are_refused_before_expanding(text):
    t0 = time.perf_counter()
    gpus, why = hookenv.env_indices(text)
    assert time.perf_counter() - t0 < 0.1
    assert gpus == [] and why and "SLURM_JOB_GPUS" in why


def test_ordinary_gpu_lists_still_expand():
    assert hookenv.env_indices("0-1,3") == ([0, 1, 3], None)
    assert hookenv.env_indices("0-1023")[0] == list(range(1024))
    assert hookenv.env_indices("N/A") == ([], None)


def test_a_node_list_that_expands_too_far_is_refused():
    t0 = time.perf_counter()
    e = hookenv.HookEnv.from_env({"SLURM_JOB_ID": "1", "SLURM_JOB_NODELIST": "n[0-999999]",
                                  "SLURM_JOB_GPUS": "0"})
    assert time.perf_counter() - t0 < 0.5
    assert e.nodes == [] and any("SLURM_JOB_NODELIST" in p for p in e.problems)
    ok = hookenv.HookEnv.from_env({"SLURM_JOB_ID": "1", "SLURM_JOB_NODELIST": "gpu[01-03,7],x"})
    assert ok.nodes == ["gpu01", "gpu02", "gpu03", "gpu7", "x"] and ok.problems == ()


@pytest.mark.parametrize("name", ["SLURMD_NODENAME", "SLURM_JOB_USER", "SLURM_JOB_PARTITION",
                                  "SLURM_JOB_ACCOUNT", "SPANK_GPULEDGER_TOKEN",
                                  "SLURM_JOB_RESTART_COUNT", "SLURM_JOB_SLUID"])
def test_every_value_read_from_the_environment_is_bounded(name):
    e = hookenv.HookEnv.from_env({"SLURM_JOB_ID": "1", "SLURM_JOB_GPUS": "0",
                                  name: "x" * 100_000})
    assert any(name in p for p in e.problems), e.problems
    for value in (e.node, e.user, e.partition, e.account, e.token, e.sluid):
        assert value is None or len(value) <= 4096
    assert all(len(p) < 200 for p in e.problems)


def test_an_overlong_job_id_is_not_a_job_id():
    e = hookenv.HookEnv.from_env({"SLURM_JOB_ID": "9" * 5000, "SLURM_JOB_GPUS": "0"})
    assert e.job_id == "" and any("SLURM_JOB_ID" in p for p in e.problems)


def test_the_token_bound_admits_every_valid_token():
    from ledger.tokens import MAX_TOKEN_LENGTH

    token = "t" * (MAX_TOKEN_LENGTH + 64)
    e = hookenv.HookEnv.from_env({"SLURM_JOB_ID": "1", "SPANK_GPULEDGER_TOKEN": token})
    assert e.token == token and e.problems == ()


def test_the_prolog_with_a_14_kb_gpu_list_logs_one_short_line_and_exits_0(tmp_path,
                                                                        monkeypatch):
    log = tmp_path / "hooks.log"
    rc = run_prolog(tmp_path, monkeypatch, tmp_path / "jobs", log,
                    SLURM_JOB_GPUS=",".join(["0-4096"] * 2000))
    assert rc == 0
    text = log.read_text()
    assert len(text) < 2000 and "SLURM_JOB_GPUS" in text and "4242" in text


# -- the sh entry under a hostile PATH --------------------------------------------------------

TOOLS = ["logger", "date", "sed", "tail", "head", "cut", "dirname", "basename", "id", "stat",
         "python3", "python", "cat", "printf", "echo", "test", "[", "env", "sh", "find", "ls",
         "mkdir", "touch"]


def evil_dir(tmp_path: Path) -> tuple[Path, Path]:
    evil = tmp_path / "evil"
    evil.mkdir()
    marker = tmp_path / "pwned"
    for tool in TOOLS:
        f = evil / tool
        f.write_text(f"#!/bin/sh\necho \"$0 $*\" >> {marker}\nexit 0\n")
        f.chmod(0o755)
    return evil, marker


def run_entry(tmp_path: Path, venv: Path, path: str, cwd: Path, **env: str):
    log = tmp_path / "logs" / "hooks.log"
    log.parent.mkdir(exist_ok=True, mode=0o755)
    full = {"PATH": path, "GPULEDGER_VENV": str(venv), "GPULEDGER_HOOK_LOG": str(log),
            "SLURM_JOB_ID": "4242", "SLURM_JOB_GPUS": "0", **env}
    out = subprocess.run(["/bin/sh", str(ENTRY), "prolog"], env=full, capture_output=True,
                         text=True, timeout=60, check=False, cwd=cwd)
    return out, (log.read_text() if log.exists() else "")


def dying_venv(tmp_path: Path) -> Path:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("#!/bin/sh\necho 'Traceback: boom' >&2\nexit 3\n")
    (venv / "bin" / "python").chmod(0o755)
    return venv


@pytest.mark.parametrize("which", ["prefixed", "empty", "relative"])
@pytest.mark.parametrize("case", ["no-python", "python-fails"])
def test_the_sh_entry_runs_nothing_from_a_hostile_path(tmp_path, which, case):
    evil, marker = evil_dir(tmp_path)
    path = {"prefixed": f"{evil}:/usr/bin:/bin", "empty": "", "relative": ".:/usr/bin"}[which]
    venv = tmp_path / "gone" if case == "no-python" else dying_venv(tmp_path)
    out, log = run_entry(tmp_path, venv, path, cwd=evil)
    assert out.returncode == 0, out.stderr
    assert not marker.exists(), marker.read_text()
    want = "no Python at" if case == "no-python" else "the Python hook exited 3"
    assert f"gpuledger-prolog[4242]: {want}" in out.stderr
    assert want in log, (log, out.stderr)


def test_the_sh_entry_gives_python_a_fixed_path(tmp_path):
    evil, _ = evil_dir(tmp_path)
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    seen = tmp_path / "seen"
    (venv / "bin" / "python").write_text(f"#!/bin/sh\necho \"$PATH\" > {seen}\nexit 0\n")
    (venv / "bin" / "python").chmod(0o755)
    out, _ = run_entry(tmp_path, venv, f"{evil}:/usr/bin", cwd=tmp_path)
    assert out.returncode == 0
    assert str(evil) not in seen.read_text() and "/usr/bin" in seen.read_text()


def test_the_sh_entry_does_not_append_through_a_symlinked_log(tmp_path):
    v = victim(tmp_path)
    (tmp_path / "logs").mkdir(mode=0o755)
    (tmp_path / "logs" / "hooks.log").symlink_to(v)
    out, _ = run_entry(tmp_path, tmp_path / "gone", "/usr/bin:/bin", cwd=tmp_path)
    assert out.returncode == 0 and "no Python at" in out.stderr
    assert v.read_text() == VICTIM_TEXT


def test_the_sh_entry_refuses_a_log_dir_others_can_write(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    logs.chmod(0o777)
    out, log = run_entry(tmp_path, tmp_path / "gone", "/usr/bin:/bin", cwd=tmp_path)
    assert out.returncode == 0 and "no Python at" in out.stderr
    assert log == "" and "hook log" in out.stderr and "refused" in out.stderr


def test_the_sh_entry_bounds_what_it_keeps_of_pythons_stderr(tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text(
        f"#!/bin/sh\n{sys.executable} -c \"import sys; sys.stderr.write('x' * 5_000_000)\"\n"
        "exit 4\n")
    (venv / "bin" / "python").chmod(0o755)
    out, log = run_entry(tmp_path, venv, "/usr/bin:/bin", cwd=tmp_path)
    assert out.returncode == 0 and "exited 4" in log
    assert len(out.stderr) < 100_000 and len(log) < 2_000


def test_the_sh_entry_tags_lines_with_a_bounded_job_id(tmp_path):
    out, _ = run_entry(tmp_path, tmp_path / "gone", "/usr/bin:/bin", cwd=tmp_path,
                       SLURM_JOB_ID="1; " + "x" * 10_000)
    assert out.returncode == 0 and "gpuledger-prolog[-]: no Python at" in out.stderr
    assert len(out.stderr) < 1000


def test_the_agent_refuses_a_socket_dir_others_can_write(tmp_path):
    import asyncio

    from slurm_plugin.agent.server import AgentServer

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    run_dir.chmod(0o777)
    server = AgentServer(object(), str(run_dir / "agent.sock"), 1.0)
    with pytest.raises(OSError, match="writable by group or others"):
        asyncio.run(asyncio.wait_for(server.serve(), 5))
    assert os.listdir(run_dir) == []


@pytest.mark.skipif(not ROOT, reason="chown needs root")
def test_root_still_appends_to_a_log_the_slurm_user_owns_in_roots_directory(tmp_path):
    """The controller's hooks.log belongs to the SlurmUser (PrologSlurmctld writes it); on a
    node that is also the controller the root prolog appends to it too."""
    logs = tmp_path / "logs"
    logs.mkdir(mode=0o755)
    (logs / "hooks.log").write_text("")
    os.chown(logs / "hooks.log", 65534, 65534)
    hooklog.setup("gpuledger-prolog", "9", logs / "hooks.log", use_syslog=False).info("hi")
    assert "gpuledger-prolog[9]: hi" in (logs / "hooks.log").read_text()
    out, log = run_entry(tmp_path, tmp_path / "gone", "/usr/bin:/bin", cwd=tmp_path)
    assert out.returncode == 0 and "no Python at" in log


def test_hookmain_drops_working_directory_entries_from_path_and_bounds_its_tag(
        monkeypatch, capsys):
    from slurm_plugin import hookmain

    monkeypatch.setenv("PATH", ":.:bin:/usr/bin::")
    monkeypatch.setenv("SLURM_JOB_ID", "1" * 5000)
    monkeypatch.setenv("SLURM_JOB_GPUS", "0")
    monkeypatch.setitem(sys.modules, "slurm_plugin.prolog", None)  # import fails: complain
    assert hookmain.run("prolog") == 0
    assert os.environ["PATH"] == "/usr/bin"
    err = capsys.readouterr().err
    assert "gpuledger-prolog[-]: cannot run" in err and len(err) < 500
    monkeypatch.setenv("PATH", "")
    hookmain.run("prolog")
    assert os.environ["PATH"] == hookmain.SAFE_PATH
