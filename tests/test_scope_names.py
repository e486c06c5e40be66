"""One rule per kind of name, checked where names enter the ledger: token scopes (the CLI's
options, Scopes.parse, mint and split by hand), a job's user in a hold request, and the
daemon's fields. An empty scope list is an error, never a token for everyone."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from ledger.daemon.auth import Peer, Policy
from ledger.daemon.handlers import Handlers
from ledger.errors import InvalidInput
from ledger.names import check_user_name, is_user_name
from ledger.tokens import SCOPE_KEYS, Scopes
from ledger.views import HoldRequest
from slurm_plugin.climain import cli

SCOPE_FLAGS = ["--users", "--gpu-types", "--partitions", "--clusters"]
EMPTY = ["", " ", ",", " , ", ",,"]
GOOD_USERS = ["alice", "bob", "alice_x", "xalice", "a.b-c", "u1001", "_svc",
              "bob@ad.example", "A" * 64]
BAD_USERS = ["", " alice", "alice ", "a b", "carol+x:y", "x:y", "<eve>", "eve>", "a,b",
             "a\r\nb", "a\nBcc: y@example.org", "a\tb", "a\x00", "-alice", ".alice",
             "a@b@c", "'a'", '"a"', "a;b", "a/b", "é", "A" * 65]


# -- the rule ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", GOOD_USERS)
def test_good_user_names_pass(name):
    assert is_user_name(name) and check_user_name(name) == name


@pytest.mark.parametrize("name", BAD_USERS)
def test_bad_user_names_are_refused(name):
    assert not is_user_name(name)
    with pytest.raises(InvalidInput, match="invalid user name"):
        check_user_name(name)


# -- Scopes.parse: the library's parser, the same error for every caller ---------------------


@pytest.mark.parametrize("key", SCOPE_KEYS)
@pytest.mark.parametrize("text", EMPTY)
def test_an_empty_scope_list_is_an_error(key, text):
    with pytest.raises(InvalidInput, match=f"--{key.replace('_', '-')} is empty"):
        Scopes.parse(**{key: text})


def test_absent_scopes_restrict_nothing_and_given_ones_are_kept():
    assert Scopes.parse() == Scopes.parse(users=None, gpu_types=None) == Scopes()
    s = Scopes.parse(users=" bob , alice ", gpu_types="h100", partitions="gpu,debug",
                     clusters="hpc1")
    assert s == Scopes(users=("alice", "bob"), gpu_types=("h100",),
                       partitions=("debug", "gpu"), clusters=("hpc1",))


@pytest.mark.parametrize("key,text", [
    ("users", "alice,,bob"), ("users", "alice, ,bob"), ("gpu_types", "h100,"),
    ("partitions", ",gpu"),
])
def test_an_empty_name_in_a_scope_list_is_an_error(key, text):
    with pytest.raises(InvalidInput, match="has an empty name"):
        Scopes.parse(**{key: text})


@pytest.mark.parametrize("key,text", [
    ("users", "carol+x:y"), ("users", "alice,a\r\nb"), ("users", "<eve>"),
    ("users", "a b"), ("gpu_types", "h1\n00"), ("gpu_types", "<h100>"),
    ("partitions", "gpu:x"), ("partitions", "a b"), ("clusters", "c<1>"),
    ("clusters", "hp\r\nc"),
])
def test_a_bad_name_in_a_scope_is_an_error(key, text):
    with pytest.raises(InvalidInput, match=f"invalid name in --{key.replace('_', '-')}"):
        Scopes.parse(**{key: text})


def test_an_unknown_scope_is_an_error_not_no_restriction():
    with pytest.raises(InvalidInput, match="unknown scope 'user'"):
        Scopes.parse(user="alice")


def test_a_claim_with_an_empty_scope_list_is_refused():
    with pytest.raises(ValueError, match="scope users is an empty list"):
        Scopes.from_dict({"users": []})
    assert Scopes.from_dict({"users": ["alice"]}).users == ("alice",)


# -- mint and split by hand (a caller other than the CLI) --------------------------------


@pytest.mark.parametrize("scopes", [
    Scopes(users=("carol+x:y",)), Scopes(users=("a\r\nb",)), Scopes(users=("",)),
    Scopes(users=("alice", "<eve>")), Scopes(gpu_types=("h100\n",)),
    Scopes(partitions=("gpu:x",)), Scopes(clusters=("",)), Scopes(users=["alice"]),
])
def test_mint_and_split_refuse_bad_scopes_built_by_hand(sqlite_ledger, scopes):
    with pytest.raises(InvalidInput):
        sqlite_ledger.mint("physics", 3600, scopes=scopes)
    assert sqlite_ledger.list_tokens() == []
    parent, view = sqlite_ledger.mint("physics", 3600)
    with pytest.raises(InvalidInput):
        sqlite_ledger.split(parent, 600, scopes=scopes)
    assert [t.id for t in sqlite_ledger.list_tokens()] == [view.id]
    assert sqlite_ledger.inspect(view.id).remaining == 3600


def test_mint_takes_good_scopes(sqlite_ledger):
    _, view = sqlite_ledger.mint("physics", 3600, scopes=Scopes.parse(users="bob@ad.example"))
    assert view.scopes == {"users": ["bob@ad.example"]}


# -- a job's user: refused where it enters the library, not only in the daemon ---------------


@pytest.mark.parametrize("user", ["a\r\nb", "carol+x:y", "x:y", "<eve>", "a b", ""])
def test_a_hold_request_refuses_a_bad_user_name(sqlite_ledger, user):
    token, view = sqlite_ledger.mint("physics", 3600)
    with pytest.raises(InvalidInput, match="invalid user name"):
        sqlite_ledger.reserve(token, HoldRequest(gpus=1, seconds=60, user=user))
    assert sqlite_ledger.holds() == [] and sqlite_ledger.inspect(view.id).held == 0


def test_a_hold_request_takes_a_good_user_name(sqlite_ledger):
    sqlite_ledger.set_rate("h100", 1_000_000)
    token, _ = sqlite_ledger.mint("physics", 3600)
    hold = sqlite_ledger.reserve(token, HoldRequest(gpus=1, seconds=60, gpu_type="h100",
                                                    user="bob@ad.example"))
    assert hold.user == "bob@ad.example"


# -- the daemon: the same rule ---------------------------------------------------------------


SLURM = Peer(2, 64030, 64030, "slurm", True)


@pytest.mark.parametrize("field,value,reason", [
    ("user", "carol+x:y", "bad_request"), ("user", "x:y", "bad_request"),
    ("user", "a+b", "bad_request"), ("account", "Physics", "bad_request"),
    ("account", "phys:ics", "bad_request"), ("user", "bob@ad.example", None),
])
def test_the_daemon_checks_user_and_account_by_the_same_rule(sqlite_ledger, field, value,
                                                              reason):
    sqlite_ledger.set_rate("h100", 1_000_000)
    token, _ = sqlite_ledger.mint("physics", 3600)
    h = Handlers(sqlite_ledger, Policy("slurm"), accounts=lambda u: frozenset())
    fields = {"op": "reserve", "token": token, "gpus": "1", "type": "h100", "seconds": "60",
              "user": "alice", "account": "physics", "key": "k1", field: value}
    resp = h.handle(SLURM, fields)
    if reason is None:
        assert resp["ok"] == 1 and sqlite_ledger.hold(resp["hold"]).user == value
    else:
        assert resp["ok"] == 0 and resp["reason"] == reason, resp
        assert f"field {field} is not a valid" in resp["message"]
        assert sqlite_ledger.holds() == []


# -- the CLI: Error: …, exit 1, and no token --------------------------------------------------


@pytest.fixture
def run(tmp_path):
    config = tmp_path / "etc" / "gpuledger.toml"
    runner = CliRunner()

    def invoke(*args):
        return runner.invoke(cli, ["--config", str(config), *args])

    for args in (["init"], ["keys", "generate", "--kid", "k1"],
                 ["account", "create", "physics"]):
        assert invoke(*args).exit_code == 0
    return invoke


def _tokens(run) -> list[dict]:
    result = run("token", "list", "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


@pytest.mark.parametrize("flag", SCOPE_FLAGS)
@pytest.mark.parametrize("value", ["", " , ", ","])
def test_cli_mint_with_an_empty_scope_is_an_error_and_mints_nothing(run, flag, value):
    result = run("token", "mint", "--account", "physics", "--hours", "1", flag, value)
    assert result.exit_code == 1, result.output
    assert result.output == f"Error: {flag} is empty: name at least one, or leave it out " \
                            "for no restriction\n"
    assert _tokens(run) == []


@pytest.mark.parametrize("flag", SCOPE_FLAGS)
@pytest.mark.parametrize("value", ["", " , ", ","])
def test_cli_split_with_an_empty_scope_is_an_error_and_splits_nothing(run, flag, value):
    minted = run("token", "mint", "--account", "physics", "--hours", "2")
    assert minted.exit_code == 0, minted.output
    (parent,) = _tokens(run)
    result = run("token", "split", parent["id"], "--hours", "1", flag, value)
    assert result.exit_code == 1, result.output
    assert result.output.startswith(f"Error: {flag} is empty")
    assert _tokens(run) == [parent]


@pytest.mark.parametrize("value", ["carol+x:y", "alice,a\r\nb"])
def test_cli_mint_with_a_bad_user_is_an_error_and_mints_nothing(run, value):
    result = run("token", "mint", "--account", "physics", "--hours", "1", "--users", value)
    assert result.exit_code == 1 and result.output.startswith(
        "Error: invalid name in --users: invalid user name"), result.output
    assert _tokens(run) == []
