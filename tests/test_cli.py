"""The admin CLI end to end on a SQLite ledger: exact output and error text."""

from __future__ import annotations

import json
import os
import stat

import pytest
from click.testing import CliRunner

from slurm_plugin.climain import cli


@pytest.fixture
def run(tmp_path):
    config = tmp_path / "etc" / "gpuledger.toml"
    runner = CliRunner()

    def invoke(*args, ok=True, input=None):
        result = runner.invoke(cli, ["--config", str(config), *args], input=input)
        if ok is not None:
            assert (result.exit_code == 0) == ok, (args, result.output, result.exception)
        return result

    invoke("init")
    invoke("keys", "generate", "--kid", "k1")
    invoke("account", "create", "physics")
    invoke("rates", "set", "h100", "1.0")
    invoke.config = config
    return invoke


def test_init_writes_config_and_migrates(tmp_path):
    config = tmp_path / "c" / "gpuledger.toml"
    result = CliRunner().invoke(cli, ["--config", str(config), "init"])
    assert result.exit_code == 0, result.output
    from ledger import migrate
    assert result.output.splitlines() == [
        f"Wrote {config}",
        (f"Wrote {config.parent / 'job_submit.conf'} (from [submit]: `gpuledger config "
         "render-submit-conf` after editing it)"),
        f"Ledger sqlite:///{tmp_path}/c/ledger.db at schema {migrate.head()} (was empty)",
    ]
    again = CliRunner().invoke(cli, ["--config", str(config), "init"])
    assert again.output.startswith(f"Config {config} exists; keeping it.")
    assert "(was" not in again.output


def test_flow_init_keys_account_mint_split_reserve_post_verify(run, tmp_path):
    out = tmp_path / "tok"
    result = run("token", "mint", "--account", "physics", "--hours", "10", "--users", "alice",
                 "--expires", "2099-12-31", "--out", str(out))
    token = out.read_text().strip()
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600
    tid = json.loads(run("token", "inspect", f"@{out}", "--json").output)["id"]
    assert result.output == f"{tid} 10.000 GPU-h written to {out}\n"
    child = run("token", "split", tid, "--hours", "2.5", "--users", "alice").output.strip()
    assert child.startswith("glt1.")
    info = json.loads(run("token", "inspect", token, "--json").output)
    assert (info["face_hours"], info["remaining_hours"], info["held_hours"]) == (10.0, 7.5, 0.0)
    assert info["status"] == "active" and info["scopes"] == {"users": ["alice"]}
    assert info["expires"] == "2099-12-31T23:59:59Z"  # a date: through the end of that day
    hold = json.loads(run("hold", "reserve", f"@{out}", "--gpus", "2", "--gpu-type", "h100",
                          "--minutes", "60", "--user", "alice", "--json").output)
    assert (hold["held_hours"], hold["state"]) == (2.0, "pending")
    posted = run("hold", "post", hold["id"], "--gpu-seconds", "1800").output
    assert "charged   0.500 GPU-h" in posted and "returned  1.500 GPU-h" in posted
    verify = run("verify").output
    assert verify.startswith("OK: ") and " journal rows, head " in verify
    listing = run("token", "list").output.splitlines()
    assert listing[0].split() == ["TOKEN", "ACCOUNT", "STATUS", "FACE", "GPU-H", "REMAINING",
                                  "HELD", "EXPIRES"]
    assert len(listing) == 3


def test_refusal_and_errors_are_one_line(run):
    token = run("token", "mint", "--account", "physics", "--hours", "1").output.strip()
    r = run("hold", "reserve", token, "--gpus", "2", "--gpu-type", "h100", "--minutes", "60",
            ok=False)
    tid = json.loads(run("token", "inspect", token, "--json").output)["id"]
    assert r.output == (f"Error: needs 2.000 GPU-h (2 x h100 x 1:00:00), token {tid} has "
                        "1.000 GPU-h left: 1.000 GPU-h short; -t 0:30:00 would fit\n")
    cases = [
        (("token", "inspect", "garbage"),
         "Error: malformed token: not a gpuledger token (expected prefix glt1.)\n"),
        (("token", "mint", "--account", "nope", "--hours", "1"), "Error: unknown account 'nope'\n"),
        (("token", "mint", "--account", "physics", "--hours", "-1"),
         "Error: hours must be positive, got -1.000\n"),
        (("token", "mint", "--account", "physics", "--hours", "abc"),
         "Error: not a number of hours: 'abc' (a decimal such as 2.5)\n"),
        (("token", "mint", "--account", "physics", "--hours", "0.0001"),
         "Error: 0.0001 hours is not a whole number of GPU-seconds\n"),
        (("account", "create", "physics"), "Error: account physics already exists\n"),
        (("keys", "generate", "--kid", "k1"), "Error: key k1 is already registered in the ledger\n"),
        (("hold", "void", "hold_nope"), "Error: unknown hold hold_nope\n"),
        (("rates", "set", "h100", "0"),
         "Error: a rate of 0 would make h100 free; to remove its rate: gpuledger rates unset "
         "h100\n"),
        (("token", "revoke", tid, "--reason", " "), "Error: revoking a token needs a reason\n"),
        (("token", "inspect", "@/nonexistent"),
         "Error: cannot open /nonexistent: No such file or directory\n"),
    ]
    for args, expected in cases:
        assert run(*args, ok=False).output == expected, args


def test_broken_and_missing_config(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[database\nurl=")
    r = CliRunner().invoke(cli, ["--config", str(bad), "account", "list"])
    assert r.exit_code == 1 and r.output.startswith(f"Error: {bad} is not valid TOML: ")
    r = CliRunner().invoke(cli, ["--config", str(tmp_path / "none.toml"), "account", "list"])
    assert r.output == (f"Error: no configuration at {tmp_path / 'none.toml'} (run `gpuledger "
                        "init`, or pass --config / set $GPULEDGER_CONFIG)\n")
    inline = tmp_path / "inline.toml"
    inline.write_text('[database]\nurl = "postgresql+psycopg://u:secret@h/db"\n')
    r = CliRunner().invoke(cli, ["--config", str(inline), "account", "list"])
    assert r.output == (f"Error: {inline}: [database] url must not contain a password; "
                        "use password_file\n")


def test_database_down_is_a_clear_error(tmp_path):
    config = tmp_path / "pg.toml"
    config.write_text('[database]\nurl = "postgresql+psycopg://postgres@127.0.0.1:1/none"\n')
    r = CliRunner().invoke(cli, ["--config", str(config), "account", "list"])
    assert r.exit_code == 1
    assert r.output.startswith("Error: the ledger database is unavailable: ")


def test_read_only_sqlite_via_uri(run, tmp_path):
    db = run.config.parent / "ledger.db"
    ro = tmp_path / "ro.toml"
    ro.write_text(f'[database]\nurl = "sqlite:///file:{db}?mode=ro&uri=true"\n'
                  f'[keys]\ndir = "{run.config.parent / "keys"}"\n')
    r = CliRunner().invoke(cli, ["--config", str(ro), "account", "create", "chem"])
    assert r.exit_code == 1 and r.output.startswith("Error: the ledger database is read-only: ")
    assert "chem" not in run("account", "list").output


def test_journal_and_json_listings(run):
    run("token", "mint", "--account", "physics", "--hours", "1")
    rows = json.loads(run("journal", "--json").output)
    assert [r["kind"] for r in rows] == ["key_add", "account_create", "rate_set", "mint"]
    assert rows[-1]["from"] == "system:issuance" and rows[-1]["amount"] == 3600
    assert json.loads(run("rates", "list", "--json").output) == [
        {"gpu_type": "h100", "rate": 1, "rate_ppm": 1_000_000}]
    accounts = json.loads(run("account", "list", "--json").output)
    assert accounts[0]["name"] == "physics" and accounts[0]["remaining_hours"] == 1.0
    assert json.loads(run("keys", "list", "--json").output)[0]["kid"] == "k1"


def test_verify_exports_and_checks_heads_signed_by_an_attestation_key(run, tmp_path):
    head = tmp_path / "head.json"
    r = run("verify", "--export-head", str(head), ok=False)
    assert r.output == ("Error: no head-attestation key on this host (run `gpuledger keys "
                        "generate --purpose attest`); heads are never signed with a "
                        "token-minting key\n")
    assert not head.exists()
    out = run("keys", "generate", "--purpose", "attest", "--kid", "att1").output
    assert out.startswith("Generated attest key att1 (") and "public key " in out
    kinds = {line.split()[0]: line.split()[1] for line in run("keys", "list").output.splitlines()[1:]}
    assert kinds == {"k1": "token", "att1": "head-attestation"}
    out = run("verify", "--export-head", str(head)).output
    assert out.startswith("OK: ") and out.endswith(f"; signed head written to {head}\n")
    exported = json.loads(head.read_text())
    assert (exported["kid"], exported["purpose"]) == ("att1", "head-attestation")
    assert stat.S_IMODE(os.stat(head).st_mode) == 0o644
    assert run("verify", "--against", str(head)).output.startswith("OK: ")
    altered = tmp_path / "altered.json"
    altered.write_text(json.dumps({**exported, "seq": exported["seq"] - 1}))
    r = run("verify", "--against", str(altered), ok=False)
    assert r.output.splitlines()[0] == (f"Error: journal verification failed: {altered}: the "
                                        "signature does not verify (the head file was altered)")
    (tmp_path / "junk.json").write_text("{")
    r = run("verify", "--against", str(tmp_path / "junk.json"), ok=False)
    assert r.output == (f"Error: {tmp_path / 'junk.json'} is not JSON (expected a head written "
                        "by `gpuledger verify --export-head`)\n")
