"""One rule, one place: pricing and token liveness agree on every path; the module graph
has no cycle inside ``ledger`` and the ledger never imports the reports; what job_submit.lua
still decides (the CPU-job shortcut, free accounts while the daemon is away) is decided the
same way by the job-request reader."""

from __future__ import annotations

import ast
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger.errors import Reason, Refusal
from ledger.views import HoldRequest

H = 3600
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("gpu_type", [None, "", " "])
def test_untyped_request_is_quoted_and_held_at_the_highest_rate(ledger, gpu_type):
    """h100 1.0, a100 0.6, default 0.5: a request naming no type holds 1 GPU-h at h100's rate
    — in the quote, on the fast path (rich token) and on the checked path (poor token)."""
    req = HoldRequest(gpus=1, seconds=H, gpu_type=gpu_type)
    assert ledger.price(req) == (H, 1_000_000)
    rich, _ = ledger.mint("physics", 10 * H)
    assert ledger.reserve(rich, req).amount == H
    poor, _ = ledger.mint("physics", H - 1)  # cannot pay the highest rate
    with pytest.raises(Refusal) as exc:
        ledger.reserve(poor, req)
    assert exc.value.reason is Reason.INSUFFICIENT and exc.value.needed == H
    exact, _ = ledger.mint("physics", H)
    assert ledger.reserve(exact, req).rate_ppm == 1_000_000


def test_typed_request_prices_the_same_on_every_path(ledger):
    """Own rate, else default — quote, fast path and checked path agree."""
    for gpu_type, rate in (("a100", 600_000), ("v100", 500_000)):
        req = HoldRequest(gpus=2, seconds=H, gpu_type=gpu_type)
        need = 2 * H * rate // 1_000_000
        assert ledger.price(req) == (need, rate)
        rich, _ = ledger.mint("physics", 10 * need)
        assert ledger.reserve(rich, req).amount == need
        poor, _ = ledger.mint("physics", need)
        ledger.transfer(poor, rich, 1, reason="make it short")
        with pytest.raises(Refusal) as exc:
            ledger.reserve(poor, req)
        assert exc.value.needed == need


def test_no_default_rate_refuses_an_unknown_type_on_both_paths(tmp_path, clock):
    from conftest import make_ledger
    lg = make_ledger(f"sqlite:///{tmp_path / 'l.db'}", tmp_path / "keys", clock)
    lg.generate_key("k1")
    lg.create_account("physics")
    lg.set_rate("h100", 1_000_000)
    tok, _ = lg.mint("physics", 10 * H)
    for amount in (10 * H, 1):  # fast path, then the checked path of a poor token
        with pytest.raises(Refusal) as exc:
            lg.reserve(tok, HoldRequest(gpus=1, seconds=H, gpu_type="v100"))
        assert exc.value.reason is Reason.UNKNOWN_GPU_TYPE
        if amount == 10 * H:
            other, _ = lg.mint("physics", 1)
            lg.transfer(tok, other, 10 * H - 1, reason="drain")
    lg.engine.dispose()


def test_pricing_rule_unit():
    from ledger.pricing import RateCandidates, gpu_rate, hold_rate
    rates = {"h100": 1_000_000, "a100": 600_000, "default": 500_000}
    for gpu_type, want in ((None, 1_000_000), ("", 1_000_000), ("a100", 600_000),
                           ("v100", 500_000)):
        assert hold_rate(gpu_type, RateCandidates.from_rates(rates, gpu_type)) == want
    assert hold_rate("v100", RateCandidates.from_rates({"h100": 1}, "v100")) is None
    assert hold_rate(None, RateCandidates.from_rates({}, None)) is None
    # settlement: each GPU at its allocated type's rate; unknown type pays the hold's rate
    assert gpu_rate("a100", rates, 1_000_000) == 600_000
    assert gpu_rate("v100", rates, 1_000_000) == 500_000
    assert gpu_rate(None, rates, 777) == 777 and gpu_rate("", rates, 777) == 777


def test_liveness_is_decided_once(ledger, clock):
    """Not yet valid, expired before the sweep, revoked: the same answer on reserve (fast and
    checked path), resize, split/transfer, the shown status and where remainders go."""
    from ledger.liveness import Liveness, liveness
    now = clock.now
    assert liveness("active", now, now + timedelta(1), now) is Liveness.ACTIVE
    assert liveness("active", now + timedelta(1), now + timedelta(2), now) \
        is Liveness.NOT_YET_VALID
    assert liveness("active", now - timedelta(2), now, now) is Liveness.EXPIRED
    assert liveness("revoked", now - timedelta(2), now, now) is Liveness.REVOKED

    later, _ = ledger.mint("physics", 10 * H, not_before=now + timedelta(days=1),
                           expires=now + timedelta(days=3))
    with pytest.raises(Refusal) as exc:
        ledger.reserve(later, HoldRequest(gpus=1, seconds=60, gpu_type="h100"))
    assert exc.value.reason is Reason.NOT_YET_VALID
    tok, view = ledger.mint("physics", 10 * H, expires=now + timedelta(days=1))
    hold = ledger.reserve(tok, HoldRequest(gpus=1, seconds=H, gpu_type="h100"))
    clock.advance(days=1)  # expired, not swept yet
    assert ledger.inspect(view.id).status == "expired"
    for ref in (tok,):
        with pytest.raises(Refusal) as exc:
            ledger.reserve(ref, HoldRequest(gpus=1, seconds=60, gpu_type="h100"))
        assert exc.value.reason is Reason.EXPIRED
    with pytest.raises(Refusal) as exc:
        ledger.resize(hold.id, seconds=2 * H)
    assert exc.value.reason is Reason.EXPIRED
    before = ledger.wallet_balance("system:expired")
    ledger.void(hold.id)
    assert ledger.wallet_balance("system:expired") == before + H


def _ledger_modules() -> list[str]:
    out = []
    for path in sorted((ROOT / "ledger").rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        if "migrations" in parts:
            continue  # run by Alembic, not importable on their own
        out.append(".".join(parts))
    return out


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_no_module_under_ledger_imports_reports():
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "ledger").rglob("*.py")
                 if any(n == "reports" or n.startswith("reports.") for n in _imports(p))]
    assert offenders == []


@pytest.mark.parametrize("module", ["ledger.holds", "ledger.reserve", "ledger.token_ops",
                                    "ledger.service", "ledger.migrate", "ledger.charge_record",
                                    "ledger.daemon.cli"])
def test_ledger_module_imports_alone_in_a_fresh_interpreter(module):
    """No import cycle (holds ↔ service was one, and daemon.cli ↔ cli): each module imports
    first, on its own, and importing every ledger module loads nothing from reports (the
    ``gpuledger`` command loads its optional components when it runs)."""
    code = ("import sys, importlib\n"
            f"importlib.import_module({module!r})\n"
            f"for m in {_ledger_modules()!r}:\n"
            "    importlib.import_module(m)\n"
            "bad = sorted(m for m in sys.modules if m == 'reports' or m.startswith('reports.'))\n"
            "assert not bad, bad\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_an_expired_token_cannot_be_revoked(ledger, clock):
    """Its remainder belongs to system:expired (found by the model test: revoke after the
    sweep paid a closed token's holds to the pool, and verify named the row)."""
    from ledger.errors import StateError
    tok, view = ledger.mint("physics", 10 * H, expires=clock.now + timedelta(days=1))
    hold = ledger.reserve(tok, HoldRequest(gpus=1, seconds=H, gpu_type="h100"))
    clock.advance(days=1)
    with pytest.raises(StateError):  # expired, not swept yet
        ledger.revoke(view.id, "too late")
    ledger.expire()
    with pytest.raises(StateError):
        ledger.revoke(view.id, "too late")
    before = ledger.wallet_balance("system:expired")
    ledger.void(hold.id)
    assert ledger.wallet_balance("system:expired") == before + H
    assert ledger.verify_journal().ok


# -- what job_submit.lua still decides, and the reader decides the same ---------------------

TRES_ITEMS = st.one_of(
    st.tuples(st.sampled_from(["", "gres:", "gres/", "gres", "gres:gres:", " "]),
              st.sampled_from(["gpu", "shard", "mps", "gpunic", "nic", "Gpu", "gpu.x", "mpsx"]),
              st.sampled_from(["", ":h100", ":3g.40gb", ":0g", "=a100", "(x)"]),
              st.sampled_from(["", ":0", ":00", ":1", ":10", "=0", "=2", ":0:", "0"])).map("".join),
    st.text("gresgpushardmpnic:/=,0123 .+-()", max_size=14))


def test_the_cpu_job_shortcut_is_one_rule_in_lua_and_python(tmp_path):
    """What "asks for a GPU" means, decided by job_submit.lua before it contacts anyone and by
    the reader (ledger.jobrequest.asks_gpu) first: the same answer on generated GRES
    strings. The Lua runs against no daemon: a job it lets pass is accepted untouched, one
    it stops is refused as the ledger being away."""
    from conftest import need
    from test_daemon_lua import CODES, Lua, lua_available

    from ledger import jobrequest as jr

    need(lua_available(), "lua5.1 with lua-socket")
    lua = Lua(tmp_path, socket=tmp_path / "nothing.sock", timeout=0.2)

    @settings(max_examples=300, deadline=None)
    @given(st.dictionaries(st.sampled_from(jr.TRES_FIELDS),
                           st.lists(TRES_ITEMS, min_size=1, max_size=3).map(",".join),
                           max_size=3))
    def agree(tres):
        r = lua.submit(token="tok", time_limit=5, **tres)
        passed = r["rc"] == CODES["ok"] and r["admin_comment"] == ""
        assert passed or "ledger is unavailable" in r["user"], (tres, r)
        assert passed == (not jr.asks_gpu(jr.SlurmJob(**tres))), tres

    try:
        agree()
    finally:
        lua.close()


def test_free_accounts_are_one_list_for_the_reader_and_the_luas_fallback(tmp_path):
    """[submit] free_accounts: the daemon's reader decides from it, and job_submit.conf —
    rendered from it — is what job_submit.lua falls back on while the daemon is away. Both
    free the same accounts, found the same way (-A, else the user's default account)."""
    from conftest import need
    from test_daemon_lua import Lua, lua_available

    from ledger import config, configfiles
    from ledger.daemon.auth import Peer, Policy
    from ledger.daemon.handlers import Handlers

    need(lua_available(), "lua5.1 with lua-socket")
    path = tmp_path / "gpuledger.toml"
    path.write_text('[database]\nurl = "sqlite:///x.db"\n[submit]\n'
                    'free_accounts = ["ops", "teaching"]\n')
    cfg = config.load(path)
    conf = dict(line.split(" = ", 1) for line in configfiles.render_submit_conf(cfg).splitlines()
                if " = " in line and not line.startswith("#"))
    lua = Lua(tmp_path, socket=tmp_path / "nothing.sock", timeout=0.2,
              free_accounts=conf["free_accounts"])
    daemon = Handlers(None, Policy("slurm"), free_accounts=cfg.submit.free_accounts)
    slurm = Peer(2, 64030, 64030, "slurm", True)
    try:
        for how in ("account", "default_account"):
            for account in ("ops", "teaching", "physics", "op"):
                r = lua.submit(tres_per_node="gres:gpu:1", time_limit=5, **{how: account})
                lua_free = r["rc"] == 0
                answer = daemon.handle(slurm, {"op": "reserve", "tres_per_node": "gres:gpu:1",
                                               "time_limit": "5", "account": account})
                assert lua_free == (answer.get("result") == "free") == (
                    account in ("ops", "teaching")), (how, account, r, answer)
    finally:
        lua.close()
