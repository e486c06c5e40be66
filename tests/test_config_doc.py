"""One configuration schema (ledger/config.py): docs/config.md is generated from it, every
reader uses it, unknown sections and keys are named errors, and job_submit.conf is rendered
from [submit] in the form job_submit.lua reads."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner

from ledger import config, configfiles, schema
from ledger.cli import cli
from ledger.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "config.md"
LUA = ROOT / "slurm_plugin" / "lua" / "job_submit.lua"


def test_docs_config_md_is_the_schema():
    assert DOC.read_text() == configfiles.reference(), (
        "docs/config.md is out of step with ledger/config.py: "
        "run `gpuledger config reference > docs/config.md`")


def test_every_setting_has_a_kind_a_doc_and_a_default_in_the_docs():
    text = DOC.read_text()
    for section in config.SECTIONS:
        assert section.cls.__doc__, section.name
        assert (f"## [{section.name}]" if section.name else "## Top level") in text
        for item in schema.items(section.cls):
            assert item.spec.doc and item.spec.kind.name, (section.name, item.key)
            assert f"| `{item.key}` | {item.spec.kind.name} |" in text, (section.name, item.key)


def write(tmp_path, text):
    path = tmp_path / "gpuledger.toml"
    path.write_text(text + '\n[database]\nurl = "sqlite:///x.db"\n')
    return path


@pytest.mark.parametrize("text, says", [
    ("[sumbit]\ntimeout = 2\n", r"unknown section\(s\) sumbit \(did you mean submit\?\)"),
    ("[daemon]\nsockte = \"/x\"\n",
     r"\[daemon\]: unknown setting\(s\) sockte \(did you mean socket\?\)"),
    ("[charge]\npartitions = {}\n", r"\[charge\]: unknown setting\(s\) partitions"),
    ("clustre = \"a\"\n", r"unknown top-level key\(s\) clustre \(did you mean cluster\?\)"),
    ("[submit]\ntimeout = \"1\"\n", r"\[submit\]: timeout has the wrong type \(str"),
    ("[submit]\ntimeout = 31\n", r"\[submit\]: timeout must be between 0 and 30 seconds"),
    ("[submit]\non_ledger_unavailable = \"maybe\"\n",
     r"on_ledger_unavailable must be one of reject, accept"),
    ("[submit]\nfree_accounts = [\"ok\", \"Bad Name\"]\n", r"free_accounts names no Slurm"),
    ("cluster = \"a#b\"\n", r"top level: cluster must be one line without #"),
    ("[hooks]\ngrace_seconds = -1\n", r"\[hooks\]: grace_seconds must be a whole number"),
    ("[smtp]\nport = 70000\n", r"\[smtp\]: port must be between 1 and 65535"),
    ("[reports]\nadmins = \"a@b.example\"\n", r"\[reports\]: admins has the wrong type"),
    ("[agent]\ninterval = 0\n", r"\[agent\]: interval must be between 0.05 and 3600"),
])
def test_a_bad_file_is_an_error_naming_file_section_and_key(tmp_path, text, says):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=says) as exc:
        config.load(path)
    assert str(exc.value).startswith(str(path))


def test_a_missing_database_url_is_named_where_the_ledger_is_opened(tmp_path):
    """A compute node's file has no database; opening the ledger from it says why it can't."""
    from ledger import db

    path = tmp_path / "gpuledger.toml"
    path.write_text("[hooks]\ndaemon = \"ctl1:6830\"\n")
    cfg = config.load(path)
    with pytest.raises(ConfigError, match=r"\[database\] url is not set: no ledger on this host"):
        db.resolve_url(cfg)


def test_the_file_init_writes_lists_every_section_and_reads_back_as_the_defaults(tmp_path):
    text = configfiles.render("sqlite:///ledger.db", "hpc1")
    for section in config.SECTIONS[1:]:
        assert re.search(rf"^(# )?\[{section.name}\]$", text, re.MULTILINE), section.name
        for item in schema.items(section.cls):
            assert re.search(rf"^(# )?{item.key} =", text, re.MULTILINE), (section.name, item.key)
    cfg = config.parse(tomllib.loads(text), tmp_path / "gpuledger.toml")
    defaults = config.Config(path=cfg.path, database=cfg.database, keys_dir=tmp_path / "keys",
                             cluster="hpc1")
    assert cfg == defaults
    # every commented example is a valid value: uncommented, the file still reads
    opened = re.sub(r"^# (\[?[a-z_]+\]?( = .+)?)$", r"\1", text, flags=re.MULTILINE)
    opened = "\n".join(line for line in opened.splitlines() if not line.endswith(" ="))
    full = config.parse(tomllib.loads(opened), tmp_path / "gpuledger.toml")
    assert full.smtp is not None and full.smtp.host == "smtp.example.org"


def lua_reads(text: str) -> dict[str, str]:
    """job_submit.lua's load_conf: '#' starts a comment, then key = value, trimmed."""
    out = {}
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        m = re.fullmatch(r"(\w+)\s*=\s*(.*)", line)
        if m:
            out[m.group(1)] = m.group(2).strip()
        else:
            assert not line, f"job_submit.lua would ignore {line!r}"
    return out


def test_job_submit_conf_is_rendered_from_submit(tmp_path):
    path = write(tmp_path, 'cluster = "hpc1"\n[daemon]\nprivileged_socket = "/run/p.sock"\n'
                 '[submit]\ntimeout = 2.5\non_ledger_unavailable = "accept"\n'
                 'free_accounts = ["ops", "teaching"]\n')
    cfg = config.load(path)
    assert lua_reads(configfiles.render_submit_conf(cfg)) == {
        "socket": "/run/p.sock", "timeout": "2.5", "on_ledger_unavailable": "accept",
        "free_accounts": "ops,teaching", "cluster": "hpc1"}
    path.write_text('[database]\nurl = "sqlite:///x.db"\n[submit]\nsocket = "/run/s.sock"\n')
    assert lua_reads(configfiles.render_submit_conf(config.load(path)))["socket"] == "/run/s.sock"


def test_the_luas_defaults_are_the_schemas():
    block = re.search(r"^local conf = \{\n(.*?)^\}", LUA.read_text(), re.MULTILINE | re.DOTALL).group(1)
    lua = dict(re.findall(r"^\s*(\w+) = (.*?),$", block, re.MULTILINE))
    d = config.Config(path=Path("x"), database=config.DatabaseConfig("sqlite://"),
                      keys_dir=Path("k"), cluster=None)
    assert lua["socket"] == f'"{d.submit_socket}"'
    assert float(lua["timeout"]) == d.submit.timeout
    assert lua["on_ledger_unavailable"] == f'"{d.submit.on_ledger_unavailable}"'
    assert lua["free_accounts"] == "{}" and not d.submit.free_accounts
    assert set(lua) == set(lua_reads(configfiles.render_submit_conf(d)))


def test_render_submit_conf_command_writes_only_a_change(tmp_path):
    path = write(tmp_path, "")
    out = tmp_path / "job_submit.conf"
    run = CliRunner()
    args = ["--config", str(path), "config", "render-submit-conf", "--output", str(out)]
    r = run.invoke(cli, [*args, "--check"])
    assert r.exit_code == 0 and r.output == f"{out} would change\n" and not out.exists()
    assert run.invoke(cli, args).output == f"{out} written\n"
    assert out.stat().st_mode & 0o777 == 0o644
    assert out.read_text() == configfiles.render_submit_conf(config.load(path))
    assert run.invoke(cli, args).output == f"{out} unchanged\n"
    printed = run.invoke(cli, ["--config", str(path), "config", "render-submit-conf"]).output
    assert printed == out.read_text()
    r = run.invoke(cli, ["--config", str(path), "config", "check"])
    assert r.exit_code == 0 and r.output == f"{path}: ok\n"


def test_a_missing_config_named_by_the_environment_is_an_error(tmp_path, monkeypatch):
    missing = tmp_path / "none.toml"
    monkeypatch.setenv(config.ENV_VAR, str(missing))
    monkeypatch.delenv("GPULEDGER_SOCKET", raising=False)
    r = CliRunner().invoke(cli, ["balance"])
    assert r.exit_code == 1 and f"no configuration at {missing}" in r.output


def test_the_agents_module_defaults_are_the_schemas():
    from slurm_plugin.agent import gresconf, server, spool

    d = config.AgentSection()
    assert (server.DEFAULT_SOCKET, spool.DEFAULT_SPOOL) == (d.socket, d.spool)
    assert (gresconf.DEFAULT_GRES_CONF, gresconf.DEFAULT_MIG_MINORS) == (d.gres_conf,
                                                                          d.mig_minors)
