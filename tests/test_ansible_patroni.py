"""The Patroni roles: gpuledger_patroni (a HAProxy that follows the Patroni primary, for a
ledger on an existing cluster) and patroni_lab (the test cluster tests/ha/lab builds).
The playbook passes --syntax-check, every variable is defined in the role's defaults with
the role's prefix, the shared setting has the controller's default, and the rendered
HAProxy configuration routes by Patroni's ``GET /primary``, cuts a dead member's sessions
and passes ``haproxy -c``. The lab itself runs in tests/lanes/patroni.
"""

from __future__ import annotations

import shutil
import subprocess

import jinja2
import pytest
from conftest import need
from test_ansible import (
    ANSIBLE,
    BUILTIN,
    _ansible_playbook,
    _defaults,
    _env,
    _used_and_defined,
)

PREFIX = {"gpuledger_patroni": "gpuledger_", "patroni_lab": "patroni_lab_"}


def test_lab_playbook_syntax():
    r = subprocess.run([_ansible_playbook(), "--syntax-check", "-i", "localhost,",
                        str(ANSIBLE / "patroni-lab.yml")], cwd=ANSIBLE, env=_env(),
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("role", PREFIX)
def test_every_variable_is_defined_and_prefixed(role):
    _ansible_playbook()
    used, defined = _used_and_defined(role)
    undefined = {n: sorted(w) for n, w in used.items() if n not in defined and n not in BUILTIN}
    assert not undefined, f"{role} uses variables it does not define: {undefined}"
    # patroni_lab hands gpuledger_patroni's tasks their inputs (include_role vars:)
    own = [n for n in defined if not (role == "patroni_lab" and n.startswith("gpuledger_"))]
    unprefixed = sorted(n for n in own if not n.startswith(PREFIX[role]))
    assert not unprefixed, f"{role} defines variables without its prefix: {unprefixed}"
    readme = (ANSIBLE / "README.md").read_text()
    missing = [n for n in _defaults(role) if f"`{n}`" not in readme
               and n != "gpuledger_service_mode"]
    assert not missing, f"ansible/README.md does not list {missing}"


def test_the_shared_service_mode_is_the_controllers():
    _ansible_playbook()
    assert _defaults("gpuledger_patroni")["gpuledger_service_mode"] == \
        _defaults("gpuledger_controller")["gpuledger_service_mode"]


def render_haproxy(**overrides) -> str:
    _ansible_playbook()
    values = {k: v for k, v in _defaults("gpuledger_patroni").items()
              if k.startswith("gpuledger_patroni_")}
    values.update(overrides)
    template = (ANSIBLE / "roles" / "gpuledger_patroni" / "templates" / "haproxy.cfg.j2")
    return jinja2.Template(template.read_text()).render(**values)


MEMBERS = [{"name": "pg1", "host": "db1.example.org", "port": 5432, "api_port": 8008},
           {"name": "pg2", "host": "db2.example.org", "port": 5432, "api_port": 8008}]


def test_haproxy_follows_the_primary_and_cuts_a_dead_members_sessions(tmp_path):
    cfg = render_haproxy(gpuledger_patroni_members=MEMBERS)
    assert "bind 127.0.0.1:5433" in cfg
    assert "option httpchk GET /primary" in cfg
    assert "http-check expect status 200" in cfg
    assert "default-server inter 1000ms fall 2 rise 1 on-marked-down shutdown-sessions" in cfg
    for m in MEMBERS:
        assert f"server {m['name']} {m['host']}:5432 check port 8008" in cfg
    tls = render_haproxy(gpuledger_patroni_members=MEMBERS,
                         gpuledger_patroni_api_ca_file="/etc/ssl/patroni-ca.pem")
    assert "check-ssl verify required ca-file /etc/ssl/patroni-ca.pem" in tls
    haproxy = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin")
    need(haproxy is not None, "haproxy (apt install haproxy)")
    path = tmp_path / "haproxy.cfg"
    path.write_text(cfg.replace("db1.example.org", "127.0.0.1").replace("db2.example.org",
                                                                        "127.0.0.1"))
    r = subprocess.run([haproxy, "-c", "-f", str(path)], capture_output=True, text=True,
                       timeout=30, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
