"""The Ansible roles: playbooks pass --syntax-check, every variable a role uses is
defined (and commented) in its defaults/main.yml with the role's prefix, and the
settings the roles share have the same defaults everywhere.

YAML is read with the Python that runs Ansible (PyYAML comes with ansible-core);
without ansible-playbook these tests skip, and fail under CI=true.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import jinja2
import jinja2.meta
import pytest

from conftest import need

REPO = Path(__file__).resolve().parent.parent
ANSIBLE = REPO / "ansible"
ROLES = ("gpuledger_controller", "gpuledger_node", "gpuledger_reports")
SHORT = {"gpuledger_controller": "controller", "gpuledger_node": "node", "gpuledger_reports": "reports"}
# Names a role may use without defining them: Ansible's own.
BUILTIN = {
    "item", "omit", "ansible_check_mode", "ansible_service_mgr", "ansible_managed",
    "ansible_hostname", "playbook_dir", "inventory_hostname", "lookup", "query", "dict",
    "ansible_os_family", "ansible_distribution_major_version", "ansible_pkg_mgr", "role_path",
    "group_names", "groups", "hostvars",
    "range", "true", "false", "none", "True", "False", "None",
}
# Task keys whose strings are Jinja expressions without {{ }}.
BARE = {"when", "changed_when", "failed_when", "that", "until"}


def _ansible_playbook() -> str:
    path = shutil.which("ansible-playbook")
    need(path is not None, "ansible (ansible-playbook)")
    return path


@cache
def _yaml_python() -> str:
    """The interpreter of ansible-playbook (it has PyYAML)."""
    first = Path(_ansible_playbook()).read_text().splitlines()[0]
    return first[2:].strip().split()[-1] if first.startswith("#!") else "python3"


@cache
def load_yaml(path: Path):
    code = "import json, sys, yaml; print(json.dumps(yaml.safe_load(open(sys.argv[1]))))"
    out = subprocess.run([_yaml_python(), "-c", code, str(path)], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out)


def _env() -> dict[str, str]:
    return dict(os.environ, ANSIBLE_LOCALHOST_WARNING="false",
                ANSIBLE_INVENTORY_UNPARSED_WARNING="false", ANSIBLE_NOCOLOR="1")


@pytest.mark.parametrize("playbook", ["site.yml", "single-node.yml"])
def test_playbook_syntax(playbook):
    exe = _ansible_playbook()
    inventory = str(ANSIBLE / "inventory.example.ini") if playbook == "site.yml" else "localhost,"
    r = subprocess.run([exe, "--syntax-check", "-i", inventory, str(ANSIBLE / playbook)],
                       cwd=ANSIBLE, env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_site_uses_the_roles():
    plays = load_yaml(ANSIBLE / "site.yml")
    used = {r if isinstance(r, str) else r["role"] for p in plays for r in p.get("roles", [])}
    assert set(ROLES) <= used


# -- variables ---------------------------------------------------------------------------


class _Any(dict):
    """Every filter/test name exists (only variable names matter here)."""

    def __contains__(self, key):
        return True

    def __missing__(self, key):
        return _noop

    def get(self, key, default=None):
        return super().get(key, _noop)


def _noop(*args, **kwargs):
    return None


def _jinja_names(text: str, bare: bool = False) -> set[str]:
    if not isinstance(text, str):
        return set()
    if bare:
        text = "{{ " + text + " }}"
    elif "{{" not in text and "{%" not in text:
        return set()
    env = jinja2.Environment(extensions=["jinja2.ext.do", "jinja2.ext.loopcontrols"])
    env.filters, env.tests = _Any(env.filters), _Any(env.tests)  # Ansible's filters and tests
    return set(jinja2.meta.find_undeclared_variables(env.parse(text)))


def _walk(node, key: str | None = None):
    """(key, string) for every string in a task structure; key is the mapping key above it."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, k)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v, key)
    elif isinstance(node, str):
        yield key, node


def _defined_in_tasks(data) -> set[str]:
    """register:, set_fact keys, task/include vars: and loop_var names."""
    names: set[str] = set()

    def visit(node):
        if isinstance(node, dict):
            if isinstance(node.get("register"), str):
                names.add(node["register"])
            for k in ("ansible.builtin.set_fact", "set_fact", "vars"):
                if isinstance(node.get(k), dict):
                    names.update(node[k])
            lc = node.get("loop_control")
            if isinstance(lc, dict) and "loop_var" in lc:
                names.add(lc["loop_var"])
            for v in node.values():
                visit(v)
        elif isinstance(node, list):
            for v in node:
                visit(v)

    visit(data)
    return names


def _role_files(role: str) -> list[Path]:
    base = ANSIBLE / "roles" / role
    return sorted(p for d in ("tasks", "handlers", "vars") for p in (base / d).glob("*.yml"))


def _included_roles_files(role: str) -> list[Path]:
    """Task files of other roles this role runs with include_role tasks_from."""
    out = []
    for path in _role_files(role):
        for task in load_yaml(path) or []:
            inc = task.get("ansible.builtin.include_role") if isinstance(task, dict) else None
            if inc:
                out.append(ANSIBLE / "roles" / inc["name"] / "tasks" / inc.get("tasks_from", "main.yml"))
    return out


def _defaults(role: str) -> dict:
    return load_yaml(ANSIBLE / "roles" / role / "defaults" / "main.yml") or {}


def _used_and_defined(role: str) -> tuple[dict[str, set[str]], set[str]]:
    used: dict[str, set[str]] = {}
    defined = set(_defaults(role))
    for path in _role_files(role):
        data = load_yaml(path)
        if path.parent.name == "vars":
            defined.update(data or {})
        defined |= _defined_in_tasks(data)
        for key, text in _walk(data):
            for name in _jinja_names(text, bare=key in BARE):
                used.setdefault(name, set()).add(str(path.relative_to(ANSIBLE)))
    for path in (ANSIBLE / "roles" / role / "templates").glob("*.j2"):
        for name in _jinja_names(path.read_text()):
            used.setdefault(name, set()).add(str(path.relative_to(ANSIBLE)))
    # Variables of defaults that refer to others count as uses too.
    for key, text in _walk(_defaults(role)):
        for name in _jinja_names(text):
            used.setdefault(name, set()).add(f"roles/{role}/defaults/main.yml")
    for path in _included_roles_files(role):
        defined |= _defined_in_tasks(load_yaml(path))
    return used, defined


@pytest.mark.parametrize("role", ROLES)
def test_every_variable_is_defined_and_prefixed(role):
    _ansible_playbook()
    used, defined = _used_and_defined(role)
    undefined = {n: sorted(w) for n, w in used.items() if n not in defined and n not in BUILTIN}
    assert not undefined, f"{role} uses variables it does not define: {undefined}"
    unprefixed = sorted(n for n in defined if not n.startswith("gpuledger_"))
    assert not unprefixed, f"{role} defines variables without the gpuledger_ prefix: {unprefixed}"


@pytest.mark.parametrize("role", ROLES)
def test_defaults_are_prefixed_and_commented(role):
    _ansible_playbook()
    other = {f"gpuledger_{s}_" for r, s in SHORT.items() if r != role}
    for name in _defaults(role):
        assert name.startswith("gpuledger_"), name
        assert not any(name.startswith(p) for p in other), f"{role} defines another role's {name}"
    # Each group of top-level keys (no blank line between them) starts under a comment.
    lines = (ANSIBLE / "roles" / role / "defaults" / "main.yml").read_text().splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"^([a-z0-9_]+):", line)
        if not m:
            continue
        j = i - 1
        while j >= 0 and lines[j].strip() and not lines[j].lstrip().startswith("#"):
            j -= 1  # keys and their continuation lines above, in the same group
        assert j >= 0 and lines[j].lstrip().startswith("#"), \
            f"{role} defaults: {m.group(1)} (line {i + 1}) has no comment above it"


@pytest.mark.parametrize("role", ROLES)
def test_role_variables_are_listed_in_the_readme(role):
    _ansible_playbook()
    readme = (ANSIBLE / "README.md").read_text()
    missing = [n for n in _defaults(role) if f"`{n}`" not in readme]
    assert not missing, f"ansible/README.md does not list {missing}"


def test_shared_defaults_agree():
    """gpuledger_* settings shared by the roles have one default (the controller's)."""
    _ansible_playbook()
    role_prefixes = tuple(f"gpuledger_{s}_" for s in SHORT.values())
    owner = _defaults("gpuledger_controller")
    for role in ROLES[1:]:
        for name, value in _defaults(role).items():
            if name.startswith(role_prefixes):
                continue
            assert name in owner, f"{role} shares {name}, which gpuledger_controller does not define"
            assert value == owner[name], f"{role}'s default of {name} differs from the controller's"


def test_tasks_use_builtin_modules_and_named_sentences():
    _ansible_playbook()
    for role in ROLES:
        for path in _role_files(role):
            if path.parent.name == "vars":
                continue
            for task in load_yaml(path) or []:
                modules = [k for k in task if "." in k]
                assert modules and all(m.startswith("ansible.builtin.") for m in modules), (path, task)
                name = task.get("name", "")
                assert name[:1].isupper(), (path, name)
                if path.parent.name == "tasks":
                    assert name.endswith("."), (path, name)


def test_ansible_lint_production_profile():
    """ansible-lint (from the test extras) passes on every role and playbook, profile production."""
    exe = Path(sys.executable).parent / "ansible-lint"
    need(exe.exists(), "ansible-lint (pip install -e '.[test]')")
    r = subprocess.run([str(exe), "--nocolor"], cwd=ANSIBLE, capture_output=True, text=True,
                       timeout=600, env={**os.environ, "ANSIBLE_LOCAL_TEMP": "/tmp"})
    assert r.returncode == 0, (r.stdout[-4000:], r.stderr[-4000:])
    assert "Profile 'production' was required, and it passed" in r.stderr + r.stdout


# -- operating systems, drop-ins, nodes without secrets ------------------------------------

FIXTURES = REPO / "tests" / "fixtures" / "ansible"
FAMILY_ROLES = ("gpuledger_controller", "gpuledger_node", "slurm_single_node")
CONTROLLER_SECRET = "controller-db-secret"  # render.yml's gpuledger_database_password


@pytest.mark.parametrize("role", FAMILY_ROLES)
def test_roles_load_vars_per_os_family_and_install_with_package(role):
    """vars/Debian.yml and vars/RedHat.yml define the same names; tasks/variables.yml loads
    them with first_found; packages are installed with ansible.builtin.package (apt only
    refreshes its cache)."""
    _ansible_playbook()
    base = ANSIBLE / "roles" / role
    debian, redhat = (load_yaml(base / "vars" / f"{f}.yml") for f in ("Debian", "RedHat"))
    assert set(debian) == set(redhat) and debian, (sorted(debian), sorted(redhat))
    loader = load_yaml(base / "tasks" / "variables.yml")
    inc = [t["ansible.builtin.include_vars"] for t in loader if "ansible.builtin.include_vars" in t]
    assert inc and "first_found" in inc[0] and "ansible_os_family" in json.dumps(loader)
    main = load_yaml(base / "tasks" / "main.yml")
    assert main[0].get("ansible.builtin.include_tasks") == "variables.yml", main[0]
    for path in sorted((base / "tasks").glob("*.yml")):
        for task in load_yaml(path) or []:
            apt = task.get("ansible.builtin.apt")
            assert apt is None or "name" not in apt, f"{path.name}: {task['name']} installs with apt"
            if "ansible.builtin.package" in task:  # on Debian still without recommends
                defaults = task.get("module_defaults", {}).get("ansible.builtin.apt", {})
                assert defaults.get("install_recommends") is False, f"{path.name}: {task['name']}"


def _play(playbook: Path, root: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**_env(), "ANSIBLE_ROLES_PATH": str(ANSIBLE / "roles"), "ANSIBLE_LOCAL_TEMP": "/tmp",
           "GPULEDGER_RENDER_VENV": sys.prefix}  # its bin/gpuledger renders job_submit.conf
    return subprocess.run([_ansible_playbook(), "-i", "localhost,", "-c", "local", str(playbook),
                           "-e", f"render_root={root}", *args],
                          env=env, capture_output=True, text=True, timeout=300)


def _recap(out: str) -> dict[str, int]:
    m = re.search(r"^localhost\s+:\s+(.*)$", out, re.M)
    assert m, out[-3000:]
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", m.group(1))}


def _slurm_conf(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _keys(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines()
                if "=" in line and not line.startswith("#"))


def _render_fixture(root: Path) -> None:
    """A configless controller whose slurm.conf has an earlier gpuledger's hook paths, and
    a node that runs jobstats' prolog.d (and holds the db.password an earlier version copied)."""
    _slurm_conf(root / "controller/slurm/slurm.conf",
                "ClusterName=hpc1\nSlurmctldParameters=enable_configless,idle_on_node_suspend\n"
                "Prolog=/usr/local/sbin/gpuledger-prolog\nepilog = /usr/local/sbin/gpuledger-epilog\n"
                "PrologFlags=Alloc\n")
    _slurm_conf(root / "node/slurm/slurm.conf",
                f"ClusterName=hpc1\nProlog={root}/node/slurm/prolog.d/*\nPrologFlags=Alloc\n")
    jobstats = root / "node/slurm/prolog.d/gpustats_helper.sh"
    jobstats.parent.mkdir()
    jobstats.write_text("#!/bin/sh\nexit 0\n")
    (root / "node/etc").mkdir(parents=True)
    (root / "node/etc/db.password").write_text(CONTROLLER_SECRET + "\n")


@pytest.mark.parametrize("family", ["Debian", "RedHat"])
def test_roles_render_per_os_family_and_a_dry_run_changes_nothing(family, tmp_path):
    """render.yml plays the configuration tasks of the roles with this family's variables
    (RedHat forced on this Debian host), then again with --check: nothing left to change."""
    root = tmp_path / "r"
    _render_fixture(root)
    forced = ["-e", f"ansible_os_family={family}"]
    r = _play(FIXTURES / "render.yml", root, *forced)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    dry = _play(FIXTURES / "render.yml", root, "--check", "--diff", *forced)
    assert dry.returncode == 0, dry.stdout[-4000:] + dry.stderr[-2000:]
    assert _recap(dry.stdout)["changed"] == 0, dry.stdout[-4000:]

    values = json.loads((root / "vars.json").read_text())
    if family == "RedHat":
        assert values["gpuledger_node_build_packages"] == ["make", "gcc", "slurm-devel"]
        assert values["gpuledger_node_slurm_plugin_dir"] == "/usr/lib64/slurm"
        assert values["gpuledger_python_packages"] == ["python3.12"]
        assert values["gpuledger_controller_lua_packages"] == ["lua-socket"]
        assert {"slurm-slurmctld", "slurm-slurmd", "slurm-slurmdbd", "munge", "lua-socket"} \
            <= set(values["slurm_single_node_packages"])
        assert values["slurm_single_node_lua"] == "lua"
    else:
        assert "libslurm-dev" in values["gpuledger_node_build_packages"]
        assert values["gpuledger_packages"] == ["python3-venv"]
        assert values["gpuledger_controller_lua_packages"] == ["lua-socket"]
        assert values["slurm_single_node_lua"] == "lua5.1"


def test_prolog_and_epilog_are_drop_ins_that_chain_with_the_sites(tmp_path):
    root = tmp_path / "r"
    _render_fixture(root)
    r = _play(FIXTURES / "render.yml", root)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    for side in ("controller", "node"):
        slurm, sbin = root / side / "slurm", root / side / "sbin"
        for hook in ("prolog", "epilog"):
            link = slurm / f"{hook}.d" / f"gpuledger-{hook}"
            assert link.is_symlink() and link.resolve() == (sbin / "gpuledger-hook").resolve()
            assert os.access(link, os.X_OK)
        conf = _keys(slurm / "slurm.conf")
        conf = {k.strip().lower(): v.strip() for k, v in conf.items()}
        assert conf["prolog"] == f"{slurm}/prolog.d/*", conf
        assert conf["epilog"] == f"{slurm}/epilog.d/*", conf
        assert conf["prologslurmctld"] == f"{sbin}/gpuledger-prolog-slurmctld"
        assert conf["epilogslurmctld"] == f"{sbin}/gpuledger-epilog-slurmctld"
        assert conf["jobsubmitplugins"] == "lua" and conf["prologflags"] == "Alloc"
        text = (slurm / "slurm.conf").read_text()
        assert len(re.findall(r"(?im)^\s*prolog\s*=", text)) == 1, text
        assert len(re.findall(r"(?im)^\s*epilog\s*=", text)) == 1, text
    # jobstats' script is still there, next to gpuledger's drop-in
    assert (root / "node/slurm/prolog.d/gpustats_helper.sh").read_text().startswith("#!/bin/sh")
    # configless: the controller's plugstack.conf (which the nodes fetch) lists the plugin
    assert (root / "controller/slurm/plugstack.conf").read_text().splitlines() == ["required gpuledger.so"]


def test_a_foreign_prolog_stops_the_play_and_is_kept(tmp_path):
    root = tmp_path / "r"
    _render_fixture(root)
    site = "ClusterName=hpc1\nProlog=/etc/slurm/site-prolog.sh\nPrologSlurmctld=/opt/site/ctld.sh\n"
    _slurm_conf(root / "node/slurm/slurm.conf", site)
    r = _play(FIXTURES / "render.yml", root)
    assert r.returncode != 0
    out = r.stdout + r.stderr
    assert "Prolog=/etc/slurm/site-prolog.sh" in out and "PrologSlurmctld=/opt/site/ctld.sh" in out
    assert "gpuledger does not replace them" in out
    assert (root / "node/slurm/slurm.conf").read_text() == site


def test_a_configless_node_gets_no_slurm_conf(tmp_path):
    root = tmp_path / "r"
    _render_fixture(root)
    (root / "node/slurm/slurm.conf").unlink()
    r = _play(FIXTURES / "render.yml", root)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert not (root / "node/slurm/slurm.conf").exists()
    assert (root / "node/slurm/prolog.d/gpuledger-prolog").is_symlink()


def test_no_node_file_holds_the_database_password(tmp_path):
    """The node's gpuledger.toml has what the hooks need and nothing of the controller's
    secrets; the db.password an earlier version copied there is gone."""
    root = tmp_path / "r"
    _render_fixture(root)
    r = _play(FIXTURES / "render.yml", root)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert CONTROLLER_SECRET in (root / "controller/etc/db.password").read_text()  # the probe works
    leaks = [p for p in (root / "node").rglob("*")
             if p.is_file() and CONTROLLER_SECRET in p.read_text(errors="replace")]
    assert not leaks, leaks
    assert not (root / "node/etc/db.password").exists()
    from ledger import config, configfiles

    code = "import json, sys, tomllib; print(json.dumps(tomllib.load(open(sys.argv[1], 'rb'))))"
    node = json.loads(subprocess.run([sys.executable, "-c", code, str(root / "node/etc/gpuledger.toml")],
                                     check=True, capture_output=True, text=True).stdout)
    # no database at all: the epilog sends what it measured to the daemon (MUNGE over TCP)
    assert set(node) == {"cluster", "daemon", "hooks"}, node
    assert node["cluster"] == "hpc1"
    assert node["hooks"] == {"daemon": "localhost:6830",
                             "spool_dir": str(root / "node/spool/charges")}
    spool = root / "node/spool/charges"
    assert spool.is_dir() and (spool.stat().st_mode & 0o777) == 0o700
    named = [p for p in (root / "node").rglob("*")  # nothing names the database server
             if p.is_file() and "db.example.org" in p.read_text(errors="replace")]
    assert not named, named
    from slurm_plugin.hookconf import hook_config

    node_cfg = config.load(root / "node/etc/gpuledger.toml")
    assert hook_config(node_cfg).daemon == "localhost:6830"
    ctl = (root / "controller/etc/gpuledger.toml").read_text()
    assert "[smtp]" in ctl and "password_file" in ctl and "[keys]" in ctl
    # the controller (idle digests) and the nodes' agent (idle counting, cancel) read one
    # [idle] table from the same role variables, through the same parser
    from ledger.idle import IdlePolicy
    from slurm_plugin.agent.config import AgentConfig

    agent = AgentConfig.load(str(root / "node/etc/agent.toml"))
    assert agent.idle == IdlePolicy() and "[idle]" in ctl
    controller = config.load(root / "controller/etc/gpuledger.toml")  # the real parser
    assert controller.daemon.node_listen is None  # no compute node besides this host
    assert controller.idle == IdlePolicy() and controller.daemon.fast_reserve is False
    # job_submit.lua's settings are rendered from the controller's [submit]
    submit = (root / "controller/etc/job_submit.conf").read_text()
    assert submit == configfiles.render_submit_conf(controller)
    lines = submit.splitlines()
    assert {"on_ledger_unavailable = reject", "cluster = hpc1", "timeout = 1.0",
            "socket = /run/gpuledger/gpuledger-slurm.sock"} <= set(lines), lines


def test_python_of_at_least_3_11_is_found_or_the_play_says_what_to_install(tmp_path):
    r = _play(FIXTURES / "python.yml", tmp_path, "-e", '{"gpuledger_python_packages": []}')
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    exe = (tmp_path / "python.txt").read_text().strip()
    out = subprocess.run([exe, "-c", "import sys; print(sys.version_info >= (3, 11))"],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "True", exe
    # One only root can reach (root's pyenv, a 0700 directory) is skipped: the SlurmUser
    # runs the controller hooks with the virtualenv's interpreter.
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    (private / "python3").write_text("#!/bin/sh\nexec /usr/bin/python3 \"$@\"\n")
    (private / "python3").chmod(0o755)
    r = _play(FIXTURES / "python.yml", tmp_path, "-e", json.dumps(
        {"gpuledger_python_packages": [], "gpuledger_python_candidates": [str(private / "python3"), "python3"]}))
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert (tmp_path / "python.txt").read_text().strip() in ("/usr/local/bin/python3", "/usr/bin/python3")
    r = _play(FIXTURES / "python.yml", tmp_path, "-e",
              '{"gpuledger_python_packages": [], "gpuledger_python_candidates": ["python3-none", "sh"]}')
    assert r.returncode != 0
    assert "gpuledger needs Python 3.11 or newer" in r.stdout and "python3-none, sh" in r.stdout


@pytest.mark.parametrize("slurmd_v, lines", [
    ("slurm-wlm 24.11.5", ["CgroupPlugin=disabled"]),  # Debian 13
    ("slurm 24.05.2", ["CgroupPlugin=disabled"]),
    ("slurm-wlm 22.05.8", []),  # Debian 12: no cgroup.conf, as before
    ("", []),  # slurmd not installed yet (--check on a fresh host)
])
def test_single_node_cgroup_conf_default_follows_the_slurm_version(tmp_path, slurmd_v, lines):
    """slurmd from 24.05 on loads a cgroup plugin even with proctrack/linuxproc and does not
    start on a host without a clean cgroup v2; the one-node cluster uses no cgroup, so the
    role's default is CgroupPlugin=disabled there, and no file before 24.05 ("disabled" is
    not a value 22.05 knows)."""
    exe = _ansible_playbook()
    defaults = ANSIBLE / "roles" / "slurm_single_node" / "defaults" / "main.yml"
    out = tmp_path / "lines.json"
    play = [{"hosts": "localhost", "gather_facts": False, "tasks": [
        {"name": "Read the defaults.", "ansible.builtin.include_vars": str(defaults)},
        {"name": "Write the cgroup.conf lines.", "ansible.builtin.copy": {
            "dest": str(out), "content": "{{ slurm_single_node_cgroup_conf_lines | to_json }}"}}]}]
    (tmp_path / "play.yml").write_text(json.dumps(play))
    extra = json.dumps({"slurm_single_node_slurmd_version": {"stdout": slurmd_v, "rc": 0}})
    r = subprocess.run([exe, "-i", "localhost,", "-c", "local", str(tmp_path / "play.yml"),
                        "-e", extra], env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads(out.read_text()) == lines


def test_each_clusters_nodes_send_charges_to_their_own_controller():
    """inventory.clusters.example.ini (two clusters on one ledger): every node's
    gpuledger_node_daemon is its own cluster's controller, from the role's default."""
    env = {**_env(), "ANSIBLE_ROLES_PATH": str(ANSIBLE / "roles"), "ANSIBLE_LOCAL_TEMP": "/tmp",
           "ANSIBLE_FORKS": "2"}
    out = subprocess.run([_ansible_playbook(), "-i", str(ANSIBLE / "inventory.clusters.example.ini"),
                          str(FIXTURES / "clusters.yml"), "--limit",
                          "gpu-a01.example.org,gpu-b08.example.org,login1.example.org"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    shown = dict((h, (c, d)) for h, c, d in
                 re.findall(r'"msg": "daemon (\S+) (\S+) (\S+)"', out.stdout))
    assert shown == {"gpu-a01.example.org": ("alpha", "ctl-alpha.example.org:6830"),
                     "gpu-b08.example.org": ("beta", "ctl-beta.example.org:6830"),
                     "login1.example.org": ("alpha", "ctl-alpha.example.org:6830")}
