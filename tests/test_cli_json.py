"""One JSON contract: every command of the ``gpuledger`` tree declares what its ``--json``
prints (or why it has none), docs/cli-json.md is those declarations, and every command's
output, run here on a real SQLite ledger with activity (and the daemon's commands against a
live daemon), matches its declaration field for field: no unknown or missing key, numbers
as numbers, one timestamp format. Tables take ``-n``, ``-p`` and ``-P``."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from daemon_helpers import LiveDaemon

from ledger.cli import jsondoc, shapes
from ledger.views import HoldRequest
from slurm_plugin.climain import cli

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "cli-json.md"
ALL = jsondoc.leaves(cli)


def test_docs_cli_json_md_is_the_declarations():
    assert DOC.read_text() == jsondoc.reference(cli), (
        "docs/cli-json.md is out of step with the commands: run "
        "`gpuledger json-reference > docs/cli-json.md`")


@pytest.mark.parametrize("path,cmd", ALL, ids=[p for p, _ in ALL])
def test_every_command_has_json_or_says_why_not(path, cmd):
    """A new command without ``@json_output`` (and a shape in the docs) or ``@no_json``
    fails here."""
    shape, why = jsondoc.shape_of(cmd), jsondoc.exempt(cmd)
    assert (shape is None) != (why is None), f"{path}: declare @json_output(...) or @no_json"
    opts = {o for p in cmd.params for o in getattr(p, "opts", ())}
    assert ("--json" in opts) == (shape is not None), path
    if shape is not None:
        assert f"| `{path}` |" in DOC.read_text()
        shapes.objects_in(shape)  # every object it names is declared


def test_every_table_command_takes_the_table_flags():
    """Commands that print a table (they call echo_table) have -n/-p/-P."""
    import inspect

    for path, cmd in ALL:
        fn = inspect.unwrap(cmd.callback)
        if "echo_table(" in inspect.getsource(fn):
            opts = {o for p in cmd.params for o in getattr(p, "opts", ())}
            assert {"-n", "--noheader", "-p", "--parsable", "-P", "--parsable2"} <= opts, path


# -- every command's output against its declaration ---------------------------------------------

class FakeSlurm:
    """Slurm with no jobs (reconcile), read by the reconciler and receipts."""

    def job(self, job_id):
        return None

    def live_jobs(self):
        return []

    def finished_jobs(self, since, job_ids=None):
        return []

    def stepped_runs(self, job_ids):
        return set()

    def cancel(self, job_id, reason):
        raise AssertionError("nothing is cancelled here")

    def owners(self, job_ids):
        return {}


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A ledger with a quarter's kinds of activity, through the CLI, and a live daemon."""
    tmp = tmp_path_factory.mktemp("site")
    config = tmp / "etc" / "gpuledger.toml"
    runner = CliRunner()

    def run(*args, ok=True):
        r = runner.invoke(cli, ["--config", str(config), *args])
        if ok is not None:
            assert (r.exit_code == 0) == ok, (args, r.output, r.exception)
        return r

    def js(*args):
        return json.loads(run(*args, "--json").stdout)

    run("init")
    from ledger import schema

    config.write_text(schema.set_keys(config.read_text(), {"idle": {"flag_after_s": 600}}))
    run("keys", "generate", "--kid", "k1")
    run("keys", "generate", "--kid", "a1", "--purpose", "attest")
    for name in ("physics", "chemistry"):
        run("account", "create", name)
    run("account", "set", "physics", "--report-to", "pi@example.org")
    for gpu, rate in (("h100", "1"), ("a100", "0.5"), ("default", "0.5")):
        run("rates", "set", gpu, rate)
    run("tiers", "set", "partition", "scavenger", "0.25")
    run("tiers", "set", "offpeak", "22:00-06:00", "0.5")
    main = js("token", "mint", "--account", "physics", "--hours", "10", "--out",
              str(tmp / "main.tok"))["view"]["id"]
    other = js("token", "mint", "--account", "physics", "--hours", "5")["view"]["id"]
    child = js("token", "split", main, "--hours", "1", "--users", "root")["view"]["id"]
    run("transfer", "--from", other, "--to", child, "--hours", "1", "--reason", "help")
    posted = js("hold", "reserve", f"@{tmp / 'main.tok'}", "--gpus", "1", "--gpu-type", "h100",
                "--minutes", "60", "--user", "alice")["id"]
    run("hold", "post", posted, "--gpu-seconds", "1800")
    run("refund", posted, "--hours", "0.1", "--reason", "idle node")
    voided = js("hold", "reserve", f"@{tmp / 'main.tok'}", "--gpus", "1", "--minutes", "30")["id"]
    run("hold", "void", voided)
    run("token", "revoke", other, "--reason", "left the group")
    run("account", "pool", "burn", "physics", "--hours", "1", "--reason", "policy")

    from ledger import config as config_mod
    from ledger import db
    from ledger.charging import charge_gpus
    from ledger.service import Ledger
    from reports import idle, sendlog

    cfg = config_mod.load(config)
    past = datetime.now(UTC) - timedelta(days=3)
    then = Ledger.from_config(cfg, clock=lambda: past)
    then.mint("chemistry", 3600, expires=past + timedelta(days=1))  # expired since
    now = Ledger.from_config(cfg)
    token, _ = now.mint("chemistry", 36_000)
    big = now.reserve(token, HoldRequest(gpus=1, seconds=9 * 3600, gpu_type="h100",
                                         user="carol"), job_id="4242")
    hour = 3_600_000  # a GPU held 9 h, idle for 2 of them in one stretch
    usage = charge_gpus([{"index": 0, "uuid": "GPU-0", "held_ms": 9 * hour,
                          "busy_ms": 7 * hour, "energy_mj": 5, "peak_mem_bytes": 2**30,
                          "measured": True, "idle_ms": 2 * hour, "idle_max_ms": 2 * hour}],
                        {0: "h100"}, now.rates(), big.rate_ppm, "allocated", source="agent",
                        node="node1", restart=0)
    now.post(big.id, usage.amount, usage=usage, key="4242:0:node1", job_id="4242",
             node="node1", restart=0)
    with db.read(now.engine) as conn:
        flagged = idle.scan(conn, cfg.idle, past)
    assert idle.record(now, cfg.idle, flagged) == 1
    sendlog.record(now.engine, kind="report", scope="physics", period=now.clock().strftime(
        "%Y-%m"), results={"pi@example.org": None}, message_id="<1@example.org>",
        now=now.clock())
    daemon = LiveDaemon(now, accounts=lambda user: frozenset({"physics", "chemistry"})).start()
    yield {"run": run, "tmp": tmp, "ids": {"main": main, "child": child, "posted": posted,
                                             "voided": voided}, "socket": str(daemon.path)}
    daemon.close()
    then.engine.dispose()
    now.engine.dispose()


def commands(site) -> dict[str, list[str]]:
    """Arguments that make each declared command print its JSON (state changes last)."""
    tmp, ids, sock = site["tmp"], site["ids"], site["socket"]
    month = datetime.now(UTC).strftime("%Y-%m")
    return {
        "gpuledger balance": ["--socket", sock],
        "gpuledger quote": ["--socket", sock, "--gres=gpu:h100:1", "-t", "1:00:00", "--token",
                            f"@{tmp / 'main.tok'}"],
        "gpuledger jobs": ["--socket", sock, "--user", "alice"],
        "gpuledger token inspect": [ids["main"]],
        "gpuledger token list": [],
        "gpuledger hold list": [],
        "gpuledger hold show": [ids["posted"]],
        "gpuledger account list": [],
        "gpuledger account show": ["physics"],
        "gpuledger keys list": [],
        "gpuledger rates list": [],
        "gpuledger tiers list": [],
        "gpuledger journal": [],
        "gpuledger db current": [],
        "gpuledger config check": [],
        "gpuledger job show": ["4242"],
        "gpuledger alerts list": [],
        "gpuledger idle list": [],
        "gpuledger report log": ["--month", month],
        "gpuledger report render": ["--month", month, "--out", str(tmp / "reports")],
        "gpuledger report send": ["--month", month, "--dry-run", "--out", str(tmp / "mail")],
        "gpuledger alerts send": ["--dry-run", "--out", str(tmp / "alerts")],
        "gpuledger idle send": ["--dry-run", "--out", str(tmp / "idle")],
        "gpuledger reconcile": ["--dry-run"],
        "gpuledger verify": ["--export-head", str(tmp / "head.json")],
        "gpuledger init": [],
        "gpuledger db upgrade": [],
        "gpuledger account create": ["biology"],
        "gpuledger account set": ["biology", "--report-to", "bio@example.org"],
        "gpuledger keys generate": ["--kid", "k2"],
        "gpuledger keys retire": ["k2"],
        "gpuledger rates set": ["v100", "0.4"],
        "gpuledger rates unset": ["v100"],
        "gpuledger tiers set": ["qos", "premium", "2"],
        "gpuledger tiers unset": ["qos", "premium"],
        "gpuledger token mint": ["--account", "biology", "--hours", "2", "--expires",
                                 "2099-06-30"],
        "gpuledger token split": [ids["main"], "--hours", "0.5", "--out", str(tmp / "s.tok")],
        "gpuledger transfer": ["--from", ids["main"], "--to", ids["child"], "--hours", "0.5",
                               "--reason", "share"],
        "gpuledger hold reserve": [f"@{tmp / 'main.tok'}", "--gpus", "1", "--minutes", "10"],
        "gpuledger hold post": [ids["voided"], "--gpu-seconds", "0"],
        "gpuledger hold void": ["@last-reserve"],
        "gpuledger refund": [ids["posted"], "--hours", "0.1", "--reason", "again"],
        "gpuledger token revoke": [ids["child"], "--reason", "done"],
        "gpuledger account pool burn": ["physics", "--reason", "the rest"],
        "gpuledger expire": [],
        "gpuledger spool list": [],
        "gpuledger spool flush": [],
        "gpuledger status": [],  # no daemon runs here: exit 1, its JSON says why
    }


def test_every_command_prints_what_it_declares(site, monkeypatch):
    import slurm_plugin.cli as plugin_cli

    monkeypatch.setattr(plugin_cli, "CommandReader", lambda *a, **k: FakeSlurm())
    table = commands(site)
    declared = {path for path, cmd in ALL if jsondoc.shape_of(cmd)}
    assert set(table) == declared, "add the new command to commands() with arguments"
    by_path = dict(ALL)
    seen_times = 0
    last_hold = None
    for path, args in table.items():
        if path == "gpuledger hold post":
            r = site["run"](*path.split()[1:], *args, "--json", ok=False)  # already voided
            assert r.exit_code == 1 and r.stdout == ""
            assert r.stderr.count("Error:") == 1 and r.stderr.startswith("Error: hold ")
            continue
        args = [last_hold if a == "@last-reserve" else a for a in args]
        r = site["run"](*path.split()[1:], *args, "--json",
                        ok=None if path == "gpuledger status" else True)
        if r.exit_code:
            assert r.exit_code == 1 and r.stderr.count("\n") == 1, (path, r.output)
            assert r.stderr.startswith("Error: "), (path, r.stderr)
        data = json.loads(r.stdout)
        problems = shapes.check(data, jsondoc.shape_of(by_path[path]))
        assert not problems, (path, problems[:5])
        assert data not in ([], {}), f"{path}: run it where it has something to show"
        seen_times += len(re.findall(r'"\d{4}-\d{2}-\d{2}T[^"]*"', r.stdout))
        if path == "gpuledger hold reserve":
            last_hold = data["id"]
    assert seen_times > 50


def test_hold_post_json(site):
    tmp = site["tmp"]
    run = site["run"]
    hold = json.loads(run("hold", "reserve", f"@{tmp / 'main.tok'}", "--gpus", "1",
                          "--minutes", "10", "--json").stdout)
    data = json.loads(run("hold", "post", hold["id"], "--gpu-seconds", "60", "--json").stdout)
    assert not shapes.check(data, "hold") and data["charged"] == 60


def test_timestamps_are_one_format_everywhere(site):
    """Keys, journal rows, tokens, holds: ``YYYY-MM-DDTHH:MM:SSZ``, nothing else (a journal
    row's ``data`` is what was recorded and hashed, shown as it is)."""
    run = site["run"]
    text = "".join(run(*c, "--json").stdout for c in (
        ("keys", "list"), ("token", "list"), ("hold", "list"), ("account", "list")))
    text += json.dumps([{k: v for k, v in r.items() if k != "data"}
                        for r in json.loads(run("journal", "--json").stdout)])
    times = re.findall(r'"(\d{4}-\d{2}-\d{2}[T ][^"]*)"', text)
    assert times and all(shapes.TIMESTAMP.match(t) for t in times), \
        {t for t in times if not shapes.TIMESTAMP.match(t)}


def test_tables_noheader_and_parsable(site):
    run = site["run"]
    full = run("rates", "list").stdout.splitlines()
    assert full[0].split() == ["GPU", "TYPE", "RATE"]
    assert run("rates", "list", "-n").stdout.splitlines() == full[1:]
    assert run("rates", "list", "--parsable").stdout.splitlines()[:2] == [
        "GPU TYPE|RATE|", "a100|0.5|"]
    assert run("rates", "list", "-P", "--noheader").stdout.splitlines()[0] == "a100|0.5"
    rows = run("journal", "-P").stdout.splitlines()
    head = rows[0].split("|")
    assert head[:3] == ["SEQ", "TIME", "KIND"] and all(
        len(r.split("|")) == len(head) for r in rows)
    rate = next(r.split("|") for r in rows[1:] if r.split("|")[2] == "rate_set")
    assert rate[head.index("DETAIL")] == "h100: unset -> 1"


def test_journal_limit_is_the_newest_rows(site):
    run = site["run"]
    every = json.loads(run("journal", "--json").stdout)
    last = json.loads(run("journal", "--limit", "2", "--json").stdout)
    assert [r["seq"] for r in last] == [r["seq"] for r in every[-2:]]
    r = run("journal", "--limit", "0", ok=False)
    assert r.exit_code == 1 and r.stderr == (
        "Error: Invalid value for '--limit': 0 is not in the range x>=1. (see `cli journal "
        "--help`)\n")


def test_rate_and_tier_changes_are_shown_in_the_journal(site):
    run = site["run"]
    run("rates", "set", "l40s", "0.3")
    run("rates", "set", "l40s", "0.35")
    run("rates", "unset", "l40s")
    run("tiers", "set", "qos", "low", "0.5")
    run("tiers", "set", "qos", "low", "0.75")
    rows = json.loads(run("journal", "--limit", "5", "--json").stdout)
    assert [r["detail"] for r in rows] == [
        "l40s: unset -> 0.3", "l40s: 0.3 -> 0.35", "l40s: 0.35 -> unset",
        "qos low: x1 -> x0.5", "qos low: x0.5 -> x0.75"]


def test_quote_json_is_typed_and_a_refusal_exits_1(site):
    run, sock, tmp = site["run"], site["socket"], site["tmp"]
    ok = json.loads(run("quote", "--socket", sock, "--gres=gpu:h100:1", "-t", "30",
                        "--token", f"@{tmp / 'main.tok'}", "--json").stdout)
    assert ok["covers"] is True and ok["ok"] is True and ok["amount"] == 1800
    assert ok["rate"] == 1 and ok["hours"] == 0.5 and isinstance(ok["remaining"], int)
    big = run("quote", "--socket", sock, "--gres=gpu:h100:8", "-t", "10:00:00", "--token",
              f"@{tmp / 'main.tok'}", "--json", ok=False)
    assert big.exit_code == 1
    data = json.loads(big.stdout)
    assert data["covers"] is False and data["reason"] == "insufficient"
    assert not shapes.check(data, "quote")
    assert big.stderr.count("\n") == 1 and big.stderr == f"Error: {data['message']}\n"
    text = run("quote", "--socket", sock, "--gres=gpu:h100:8", "-t", "10:00:00", "--token",
               f"@{tmp / 'main.tok'}", ok=False)
    assert text.exit_code == 1 and "covers" in text.stdout and text.stderr == big.stderr
    untyped = run("quote", "--socket", sock, "--gres=gpu:1", "-t", "1:00:00", "--json")
    assert json.loads(untyped.stdout)["covers"] is None  # no token given


def test_refusal_json_of_hold_reserve(site):
    run, tmp = site["run"], site["tmp"]
    r = run("hold", "reserve", f"@{tmp / 'main.tok'}", "--gpus", "64", "--gpu-type", "h100",
            "--minutes", "600", "--json", ok=False)
    assert r.exit_code == 1 and r.stderr.startswith("Error: needs 640.000 GPU-h")
    data = json.loads(r.stdout)
    assert not shapes.check(data, "refusal") and data["ok"] is False
    assert data["reason"] == "insufficient" and data["needed"] == 640 * 3600


def test_users_balance_has_no_pool(site):
    run, sock = site["run"], site["socket"]
    data = json.loads(run("balance", "--socket", sock, "--json").stdout)
    assert data["accounts"] and all("pool" not in a for a in data["accounts"])
    assert "POOL" not in run("balance", "--socket", sock).stdout


def test_shape_check_names_what_departs():
    shapes.obj("probe", "a test object", [("n", "integer", ""), ("t", "timestamp", ""),
                                          ("o?", "string?", "")])
    assert shapes.check({"n": 1, "t": "2027-06-30T23:59:59Z"}, "probe") == []
    assert shapes.check({"n": "1", "t": "2027-06-30T23:59:59+00:00", "x": 1}, "probe") == [
        "$: 'x' is not a field of probe",
        "$.n: expected integer, got string '1'",
        "$.t: expected timestamp, got string '2027-06-30T23:59:59+00:00'"]
    assert shapes.check({"n": True}, "probe") == [
        "$.n: expected integer, got boolean True", "$: probe lacks field 't'"]
    with pytest.raises(ValueError):
        shapes.obj("probe", "another", [("n", "string", "")])
    with pytest.raises(ValueError):
        shapes.obj("bad-shape", "x", [("n", "List of x", "")])


def test_a_command_without_declaration_is_found():
    @click.command("new-thing")
    def new_thing():
        """A command someone forgot to declare."""

    group = click.Group("gpuledger", commands={"new-thing": new_thing})
    assert "- `gpuledger new-thing`: (undeclared)" in jsondoc.reference(group)
    assert jsondoc.shape_of(new_thing) is None and jsondoc.exempt(new_thing) is None
