"""The README is checked by tests: its `gpuledger …` commands parse against the real CLI,
the quickstart is two commands that exist, its links lead somewhere, its config examples
load, and what it shows users (a refusal, a receipt, the monthly email) is what the code
prints."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from conftest import need

from slurm_plugin.climain import cli

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
LINKED_DOCS = [README, ROOT / "docs" / "architecture.md"]
IDS = re.compile(r"\b(tok|hold)_[0-9a-f]{20}\b")


def blocks(kind: str, text: str | None = None) -> list[str]:
    return re.findall(rf"```{kind}\n(.*?)```", README.read_text() if text is None else text,
                      re.DOTALL)


def readme_commands() -> list[str]:
    """`gpuledger …` lines of the sh blocks, and `$ gpuledger …` lines of console blocks."""
    lines = [line.split("#")[0].strip() for b in blocks("sh") for line in b.splitlines()]
    lines += [line[2:].strip() for b in blocks("console") for line in b.splitlines()
              if line.startswith("$ ")]
    # a command substitution stands for one word (`head-$(date +%F).json`)
    return [re.sub(r"\$\([^)]*\)", "X", line) for line in lines
            if line.startswith("gpuledger ")]


def console(command: str) -> str:
    """The output the README shows under ``$ command``."""
    for b in blocks("console"):
        head, _, out = b.partition("\n")
        if head == f"$ {command}":
            return out
    raise AssertionError(f"README shows no `$ {command}`")


def test_readme_has_commands():
    assert len(readme_commands()) >= 30


@pytest.mark.parametrize("line", readme_commands())
def test_readme_command_parses(line):
    args = shlex.split(line)[1:]
    command: click.Command = cli
    ctx = click.Context(cli, info_name="gpuledger")
    while isinstance(command, click.Group):
        name, args = args[0], args[1:]
        sub = command.get_command(ctx, name)
        assert sub is not None, f"{line}: no command {name!r}"
        command = sub
    command.make_context(command.name, list(args))  # raises on unknown options / missing args


def test_quickstart_is_two_commands_that_exist():
    text = README.read_text()
    block = re.search(r"## Quickstart.*?```sh\n(.*?)```", text, re.DOTALL).group(1)
    commands = [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]
    assert len(commands) == 2
    for c in commands:
        assert (ROOT / c).is_file() and (ROOT / c).stat().st_mode & 0o111, c


def test_the_readme_leads_with_users_then_quickstart_install_configure_operate():
    heads = re.findall(r"^## (.+)$", README.read_text(), re.MULTILINE)
    assert heads[:6] == ["What users see", "Quickstart", "Install on an existing cluster",
                         "Configure", "Operate", "More"], heads


def test_every_component_command_is_registered():
    for name in ("serve", "balance", "quote", "jobs", "reconcile", "job", "agent", "report",
                 "alerts", "spool", "verify", "db"):
        assert cli.get_command(click.Context(cli), name) is not None, name


def anchor(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("doc", LINKED_DOCS, ids=lambda p: p.name)
def test_every_link_leads_somewhere(doc):
    text = doc.read_text()
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert links
    for link in links:
        if re.match(r"[a-z]+:", link):
            continue
        path, _, frag = link.partition("#")
        target = (doc.parent / path).resolve() if path else doc
        assert target.exists(), f"{doc.name}: {link} does not exist"
        if frag:
            heads = re.findall(r"^#+ (.+)$", target.read_text(), re.MULTILINE)
            assert frag in {anchor(h) for h in heads}, f"{doc.name}: no heading for #{frag}"
    for path in re.findall(r"`((?:docs|ansible|slurm_plugin|tests|benchmarks)/[\w./-]+)`", text):
        assert (ROOT / path).exists(), f"{doc.name} names {path}, which does not exist"


def test_config_examples_load_with_every_check(tmp_path):
    from ledger import config
    from slurm_plugin.agent.config import AgentConfig

    examples = blocks("toml")
    assert len(examples) == 3
    for text in examples:
        first = text.splitlines()[0]
        path = tmp_path / "example.toml"
        path.write_text(text)
        if "agent.toml" in first:
            cfg = AgentConfig.load(str(path))
            assert cfg.interval == 1.0 and cfg.idle.flag_after_s == 3600
        else:
            cfg = config.load(path)
            assert cfg.cluster == "hpc1"
            if "compute node" in first:  # nothing secret, no database on a node
                assert cfg.database.url is None and cfg.hooks.daemon == "ctl:6830"
            else:
                assert cfg.daemon.node_listen == "0.0.0.0:6830"
                assert cfg.database.url.startswith("sqlite:////var/lib/gpuledger/")


# -- what users see is what the code prints ----------------------------------------------------


def test_the_refusal_is_what_job_submit_lua_tells_the_user(sqlite_ledger, tmp_path):
    from daemon_helpers import LiveDaemon
    from test_daemon_lua import CODES, Lua, lua_available

    need(lua_available(), "lua5.1 with lua-socket (apt install lua5.1 lua-socket)")
    shown = console("sbatch --gpu-token=@~/.gpu-token --gres=gpu:h100:2 -t 10:00:00 train.sh")
    refusal, failed = shown.splitlines()
    token, _ = sqlite_ledger.mint("physics", 10 * 3600)
    daemon = LiveDaemon(sqlite_ledger).start()
    lua = Lua(tmp_path, socket=daemon.path, timeout=1.0)
    try:
        r = lua.submit(token=token, tres_per_node=f"{lua.prefix}gpu:h100:2", time_limit=600)
    finally:
        lua.close()
        daemon.close()
    assert r["rc"] == CODES["policy"], r
    assert IDS.sub("ID", refusal) == IDS.sub("ID", f"sbatch: error: {r['user']}")
    # Slurm's own line for ESLURM_ACCOUNTING_POLICY (pinned on the real cluster by
    # tests/e2e/test_submit_cluster.py::test_refusal_messages)
    assert failed == ("sbatch: error: Batch job submission failed: Job violates accounting/QOS "
                      "policy (job submit limit, user's size and/or time limits)")


def settle_demo_job(config_path: Path, token: str) -> None:
    """What the quickstart's job goes through, minus Slurm: job_submit.lua's reserve,
    PrologSlurmctld's bind and link, the epilog's record (the node agent's figures over the
    fake NVML library: 90 % busy for 6 s of 9 s on GPU 0) priced by the daemon, and
    EpilogSlurmctld's close."""
    from ledger import config as config_mod
    from ledger import settlement
    from ledger.nodecharge import GpuUse, NodeCharge
    from ledger.service import Ledger
    from ledger.views import HoldRequest

    cfg = config_mod.load(config_path)
    ledger = Ledger.from_config(cfg)
    try:
        hold = ledger.reserve(token, HoldRequest(gpus=1, seconds=300, gpu_type="h100",
                                                 account="physics", user="alice",
                                                 partition="gpu"))
        ledger.bind(hold.id, "4242", user="alice", account="physics", partition="gpu")
        ledger.link_job(hold.id, "4242", 0, user="alice", account="physics")
        start = 1_790_000_000.0
        use = GpuUse(index=0, held_ms=9010, busy_ms=5403, energy_mj=3_512_140,
                     peak_mem_bytes=40 << 30, measured=True, uuid="GPU-fake-h100-0000",
                     idle_ms=2811, idle_max_ms=1870)
        rec = NodeCharge(job_id="4242", restart=0, node="lab1", start=start, end=start + 9.01,
                         user="alice", partition="gpu", owners=("4242",), gpus=(0,),
                         gpu_types={0: "h100"}, usage=(use,), source="agent", cluster="lab")
        assert settlement.charge_node(ledger, rec, cfg.charge.policy, cfg.charge.floor).charged
        assert settlement.finish(ledger, ["4242"], "4242", ["lab1"])[0] == "closed"
    finally:
        ledger.engine.dispose()


def test_the_receipt_is_what_job_show_prints(tmp_path):
    conf = tmp_path / "gpuledger.toml"

    def gl(*args: str) -> str:
        res = CliRunner().invoke(cli, ["--config", str(conf), *args])
        assert res.exit_code == 0, res.output
        return res.output

    gl("init", "--cluster", "lab")
    gl("keys", "generate", "--kid", "k2026")
    gl("account", "create", "physics")
    gl("rates", "set", "h100", "1.0")
    gl("rates", "set", "a100", "0.6")
    gl("token", "mint", "--account", "physics", "--hours", "10", "--users", "alice",
       "--out", str(tmp_path / "alice.tok"))
    settle_demo_job(conf, (tmp_path / "alice.tok").read_text().strip())
    assert IDS.sub("ID", console("gpuledger job show 4242")) == IDS.sub("ID", gl("job", "show",
                                                                               "4242"))


def test_the_email_is_the_sample_report():
    """The README's excerpt is the start of docs/sample-report's text part, which
    tests/test_sample_report.py holds to what the reports render."""
    (excerpt,) = [b for b in blocks("text") if b.startswith("GPU budget report")]
    sample = (ROOT / "docs" / "sample-report" / "physics-2026-11.txt").read_text()
    assert len(excerpt.splitlines()) >= 20 and sample.startswith(excerpt)
