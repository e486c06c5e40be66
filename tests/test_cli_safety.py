"""Admin commands that cannot lose value: every error path of issue 24's first section ends
in exactly one ``Error:`` line and exit status 1, and nothing was minted, journaled or
written (the database and the files are compared before and after). Then what was added
so that mistakes can be undone: ``rates unset``, the pool's burn and mint, the caps, the
expiry rule, ``--config`` anywhere."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner

from ledger import config as config_mod
from ledger.service import Ledger
from ledger.views import HoldRequest
from slurm_plugin.climain import cli

H = 3600


@pytest.fixture
def run(tmp_path):
    config = tmp_path / "etc" / "gpuledger.toml"
    runner = CliRunner()

    def invoke(*args, ok=True, env=None):
        r = runner.invoke(cli, ["--config", str(config), *args], env=env)
        if ok is not None:
            assert (r.exit_code == 0) == ok, (args, r.output, r.exception)
        return r

    invoke("init")
    invoke("keys", "generate", "--kid", "k1")
    invoke("account", "create", "physics")
    invoke("rates", "set", "h100", "1")
    invoke("rates", "set", "a100", "0.5")
    invoke.config = config
    invoke.tmp = tmp_path
    return invoke


def ledger_of(run) -> Ledger:
    return Ledger.from_config(config_mod.load(run.config))


def state(run) -> tuple:
    """What an error must leave as it was: every journal row, token and file under tmp."""
    lg = ledger_of(run)
    try:
        rows = [(r["seq"], r["hash"]) for r in lg.journal()]
        tokens = [(t.id, t.remaining) for t in lg.list_tokens()]
    finally:
        lg.engine.dispose()
    files = {}
    for p in sorted(run.tmp.rglob("*")):
        if p.is_file() and not p.name.startswith("ledger.db"):
            files[str(p)] = (stat.S_IMODE(p.stat().st_mode),
                             hashlib.sha256(p.read_bytes()).hexdigest())
    return rows, tokens, files


def refused(run, *args, says: str, env=None):
    """The command fails with one ``Error:`` line (exit 1) and changes nothing."""
    before = state(run)
    r = run(*args, ok=False, env=env)
    assert r.exit_code == 1, (args, r.output)
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("Error: "), (args, r.stderr)
    assert says in r.stderr, (args, r.stderr)
    assert "Traceback" not in r.output
    assert state(run) == before, args
    return r


def mint(run, *args) -> dict:
    return json.loads(run("token", "mint", "--account", "physics", *args, "--json").stdout)


# -- the token file --------------------------------------------------------------------------

def test_mint_never_overwrites_a_token_file_and_issues_nothing_when_refused(run):
    out = run.tmp / "alice.tok"
    first = mint(run, "--hours", "10", "--out", str(out))
    assert first["token"] is None and first["file"] == str(out) and first["backup"] is None
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    refused(run, "token", "mint", "--account", "physics", "--hours", "5", "--out", str(out),
            says=f"Error: {out} exists; refusing to overwrite a token file (pass --force")
    tid = first["view"]["id"]
    refused(run, "token", "split", tid, "--hours", "1", "--out", str(out), says="exists")


def test_force_keeps_the_old_token_recoverable(run):
    out = run.tmp / "alice.tok"
    mint(run, "--hours", "10", "--out", str(out))
    old = out.read_text()
    again = run("token", "mint", "--account", "physics", "--hours", "5", "--out", str(out),
                "--force")
    assert again.stdout.endswith(f"written to {out} (old file kept as {out}.~1~)\n")
    assert Path(f"{out}.~1~").read_text() == old and out.read_text() != old
    third = mint(run, "--hours", "1", "--out", str(out), "--force")
    assert third["backup"] == f"{out}.~2~"
    for p in (out, Path(f"{out}.~1~"), Path(f"{out}.~2~")):
        assert stat.S_IMODE(p.stat().st_mode) == 0o600
    ids = {json.loads(run("token", "inspect", f"@{p}", "--json").stdout)["id"]
           for p in (out, Path(f"{out}.~1~"), Path(f"{out}.~2~"))}
    assert len(ids) == 3  # three tokens, each still in a file


@pytest.mark.parametrize("where,says", [
    ("missing-dir/tok", "No such file or directory"),
    ("a-dir", "is a directory"),
    ("/sys/gpuledger-test.tok", "Permission denied"),  # no one may create files there
])
def test_an_unwritable_out_mints_nothing(run, where, says):
    (run.tmp / "a-dir").mkdir()
    refused(run, "token", "mint", "--account", "physics", "--hours", "1", "--out",
            str(run.tmp / where), says=says)
    assert not [p for p in run.tmp.rglob("*.tmp")] and not Path(where).exists()


def test_a_mint_that_fails_after_the_file_was_written_leaves_no_file(run, monkeypatch):
    """The file is written inside the mint's transaction; if the transaction fails after,
    the file goes too (no token on disk that the ledger does not know)."""
    from ledger import token_ops

    out = run.tmp / "t.tok"
    publish_after = token_ops.TokenOps.mint

    def mint_then_fail(self, *a, publish=None, **k):
        def publish_and_fail(token):
            publish(token)
            assert out.exists()
            raise RuntimeError("commit failed")
        return publish_after(self, *a, publish=publish_and_fail, **k)

    monkeypatch.setattr(token_ops.TokenOps, "mint", mint_then_fail)
    r = refused(run, "token", "mint", "--account", "physics", "--hours", "1", "--out",
                str(out), says="Error: internal error (RuntimeError: commit failed)")
    assert not out.exists() and r.stdout == ""


def test_the_cli_reads_token_files_by_the_spank_plugins_rule(run):
    out = run.tmp / "t.tok"
    mint(run, "--hours", "1", "--out", str(out))
    out.chmod(0o644)
    refused(run, "token", "inspect", f"@{out}",
            says=f"Error: {out} is readable by others (mode 0644); chmod 600 it")
    out.chmod(0o640)
    refused(run, "token", "inspect", f"@{out}", says="is readable by group (mode 0640)")
    refused(run, "token", "inspect", f"@{run.tmp}", says=f"{run.tmp} is not a regular file")


# -- caps, rates, tiers ----------------------------------------------------------------------

def test_caps_on_hours_and_rates_are_config_settings(run):
    refused(run, "token", "mint", "--account", "physics", "--hours", "99999999999",
            says="above the largest token value, 1000000.000 GPU-h ([limits] "
                 "max_token_hours)")
    refused(run, "rates", "set", "a100", "101", says="rate 101 is above the largest rate, "
                                                     "100 ([limits] max_rate)")
    refused(run, "tiers", "set", "qos", "premium", "11",
            says="multiplier 11 is above the largest multiplier, 10 ([limits] max_multiplier)")
    from ledger import schema

    run.config.write_text(schema.set_keys(run.config.read_text(), {"limits": {
        "max_token_hours": 2_000_000, "max_rate": "200"}}))
    assert mint(run, "--hours", "1500000")["view"]["face_hours"] == 1_500_000
    run("rates", "set", "a100", "150")
    refused(run, "token", "mint", "--account", "physics", "--hours", "1e3",
            says="not a number of hours: '1e3' (a decimal such as 2.5)")


@pytest.mark.parametrize("args,says", [
    (("rates", "set", "a100", "-1"), "Error: rate must be a positive number, got -1"),
    (("rates", "set", "a100", "1e3"), "Error: not a rate: '1e3' (a decimal such as 0.5)"),
    (("rates", "set", "a100", "inf"), "Error: not a rate: 'inf'"),
    (("rates", "set", "h100", "0"), "rates unset h100"),
    (("rates", "set", "H100", "2"), "use 'h100'"),
    (("rates", "unset", "v100"), "Error: no rate for GPU type 'v100' (rates: a100, h100)"),
    (("tiers", "set", "qos", "low", "-0.5"), "Error: multiplier must be a positive number"),
    (("tiers", "unset", "qos", "low"), "Error: no qos multiplier 'low'"),
])
def test_bad_rates_are_one_line_errors(run, args, says):
    refused(run, *args, says=says)


def test_a_mistyped_rate_is_undone_by_rates_unset(run):
    """An extra rate raises what untyped jobs are held at (the highest); unset restores."""
    lg = ledger_of(run)
    untyped = HoldRequest(gpus=2, seconds=4 * H)
    assert lg.price(untyped)[0] == 8 * H
    r = run("rates", "set", "l40", "2")
    assert r.stdout == ("Rate of l40: 2 (new); applies to new holds (undo: gpuledger rates "
                        "unset l40)\n")
    assert lg.price(untyped)[0] == 16 * H
    assert run("rates", "unset", "l40").stdout == (
        "Rate of l40: 2 -> unset (new holds price it at 'default')\n")
    assert lg.price(untyped)[0] == 8 * H
    assert run("rates", "set", "h100", "1.5").stdout.startswith(
        "Rate of h100: 1 -> 1.5; applies to new holds (undo: gpuledger rates set h100 1)")
    assert lg.verify_journal().ok
    lg.engine.dispose()


# -- the pool --------------------------------------------------------------------------------

def test_revoked_value_is_burned_or_minted_again_never_lost(run):
    tok = mint(run, "--hours", "10")
    run("token", "revoke", tok["view"]["id"], "--reason", "leaked in a repo")
    assert json.loads(run("account", "show", "physics", "--json").stdout)["pool"] == 10 * H
    refused(run, "account", "pool", "burn", "physics", "--hours", "11", "--reason", "x",
            says="the pool of account physics holds 10.000 GPU-h; cannot burn 11.000 GPU-h")
    refused(run, "token", "mint", "--account", "physics", "--hours", "11", "--from-pool",
            says="the pool of account physics holds 10.000 GPU-h; cannot mint 11.000 GPU-h")
    again = mint(run, "--hours", "4", "--from-pool", "--reason", "re-issued to alice")
    burn = json.loads(run("account", "pool", "burn", "physics", "--hours", "2", "--reason",
                          "policy: revoked value expires", "--json").stdout)
    assert (burn["amount"], burn["pool"]) == (2 * H, 4 * H)
    assert run("account", "pool", "burn", "physics", "--reason", "the rest").stdout == (
        "Burned 4.000 GPU-h of account physics's pool; 0.000 GPU-h left in it\n")
    refused(run, "account", "pool", "burn", "physics", "--reason", "x",
            says="the pool of account physics is empty")
    rows = json.loads(run("journal", "--json").stdout)
    moves = [(r["kind"], r["from"], r["to"], r["amount"]) for r in rows[-4:]]
    assert moves == [
        ("revoke", f"token:{tok['view']['id']}", "account:physics", 10 * H),
        ("mint", "account:physics", f"token:{again['view']['id']}", 4 * H),
        ("burn", "account:physics", "system:issuance", 2 * H),
        ("burn", "account:physics", "system:issuance", 4 * H)]
    lg = ledger_of(run)
    assert lg.verify_journal().ok
    assert lg.wallet_balance("system:issuance") == -10 * H + 2 * H + 4 * H
    lg.engine.dispose()


# -- the other tracebacks ------------------------------------------------------------------

def test_reconcile_when_slurm_cannot_be_read(run, tmp_path):
    refused(run, "reconcile", env={"PATH": str(tmp_path / "nothing-here")},
            says="Error: reconcile stopped: cannot read Slurm (squeue is not installed)")


def test_sacct_nothing_found_is_no_jobs():
    """sacct --json on 22.05 prints an ESLURM_REST_EMPTY_RESULT error for an empty window."""
    from slurm_plugin import slurmjson
    from slurm_plugin.slurm import SlurmError

    empty = json.dumps({"errors": [{"description": "Nothing found", "error_number": 9003,
                                    "error": "Nothing found with query",
                                    "source": "slurmdb_jobs_get"}], "jobs": []})
    assert slurmjson.parse_sacct(empty) == []
    other = json.dumps({"errors": [{"error_number": 9001, "error": "bad"}], "jobs": []})
    with pytest.raises(SlurmError):
        slurmjson.parse_sacct(other)


def test_export_head_to_a_bad_path_records_no_export(run):
    run("keys", "generate", "--kid", "a1", "--purpose", "attest")
    good = run.tmp / "head.json"
    run("verify", "--export-head", str(good))
    refused(run, "verify", "--export-head", str(run.tmp / "no" / "head.json"),
            says=f"Error: cannot write {run.tmp / 'no' / 'head.json'}: No such file")
    refused(run, "verify", "--export-head", str(run.tmp), says="is a directory")
    assert run("verify", "--against", str(good)).stdout.startswith("OK: ")


def test_report_render_and_db_upgrade_errors(run):
    (run.tmp / "file").write_text("x")
    refused(run, "report", "render", "--month", "2026-11", "--out", str(run.tmp / "file" / "r"),
            says=f"Error: cannot write reports to {run.tmp / 'file' / 'r'}: Not a directory")
    refused(run, "db", "upgrade", "--revision", "nosuch",
            says="Error: unknown schema revision 'nosuch' (this version knows 0001")


# -- config ----------------------------------------------------------------------------------

def test_config_after_the_command_and_a_missing_named_config(run, tmp_path):
    r = CliRunner().invoke(cli, ["account", "list", "--config", str(run.config), "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)[0]["name"] == "physics"
    r = CliRunner().invoke(cli, ["--config", str(run.config), "token", "list", "--config",
                                 str(tmp_path / "other.toml")])
    assert r.exit_code == 1 and r.stderr.startswith("Error: --config given twice")
    missing = tmp_path / "none.toml"
    r = CliRunner().invoke(cli, ["balance"], env={"GPULEDGER_CONFIG": str(missing)})
    assert r.exit_code == 1 and r.stderr == (
        f"Error: no configuration at {missing} (run `gpuledger init`, or pass --config / set "
        "$GPULEDGER_CONFIG)\n")
    text = run.config.read_text()
    assert "\n# [smtp]\n" in text and "\n[reports]\n" in text and "\n[limits]\n" in text
    run.config.write_text(text + "\n[sumbit]\ntimeout = 2\n")
    r = run("account", "list", ok=False)
    assert r.exit_code == 1 and r.stderr == (
        f"Error: {run.config}: unknown section(s) sumbit (did you mean submit?)\n")


# -- expiry ----------------------------------------------------------------------------------

def test_an_expiry_date_is_shown_as_given_and_the_default_is_365_days(run):
    given = mint(run, "--hours", "1", "--expires", "2027-06-30")["view"]
    assert given["expires"] == "2027-06-30T23:59:59Z"
    assert run("token", "list").stdout.splitlines()[1].split()[-1] == "2027-06-30"
    default = mint(run, "--hours", "1")["view"]
    start = datetime.fromisoformat(default["not_before"])
    assert datetime.fromisoformat(default["expires"]) - start == timedelta(days=365)
    at = mint(run, "--hours", "1", "--expires", "2027-06-30T12:00:00+02:00")["view"]
    assert at["expires"] == "2027-06-30T10:00:00Z"
    refused(run, "token", "mint", "--account", "physics", "--hours", "1", "--expires",
            "30/06/2027", says="not an ISO date or time: '30/06/2027' (e.g. 2027-06-30")
    assert datetime.now(UTC) < datetime.fromisoformat(given["expires"])


def test_the_token_docs_commands_parse():
    """docs/tokens.md: each ``gpuledger`` command in it exists with those options."""
    import re
    import shlex

    import click

    text = (Path(__file__).resolve().parents[1] / "docs" / "tokens.md").read_text()
    lines = [ln.strip() for block in re.findall(r"```sh\n(.*?)```", text, re.DOTALL)
             for ln in block.splitlines()]
    lines += re.findall(r"`(gpuledger [^`]*)`", text)
    checked = 0
    for line in lines:
        args = shlex.split(re.split(r" [<|] ", line)[0].replace("…", "x"))[1:]
        command, ctx = cli, click.Context(cli, info_name="gpuledger")
        while isinstance(command, click.Group) and args:
            command, args = command.get_command(ctx, args[0]), args[1:]
            assert command is not None, line
        if isinstance(command, click.Group):
            continue
        try:  # an unknown option or a bad value fails here
            command.make_context(command.name, list(args))
        except click.MissingParameter:
            continue  # a fragment in prose (`gpuledger token split`)
        checked += 1
    assert checked >= 5
