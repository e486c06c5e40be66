"""job_submit.lua under lua5.1/5.3/5.4 with a stub ``slurm`` table, against a live daemon.

The stub mimics what slurmctld hands the script (fields measured on the 22.05 test
cluster: NO_VAL for unset numbers, ``spank_job_env`` indexed from 0, partitions keyed
by name with ``default_time``/``max_time``/``flag_default``), in the shape of one Slurm
release (fixtures/slurm/<release>/lua.json: the ``slurm`` table's codes, whether log_user
reaches the user from slurm_job_modify, the GRES prefix; 24.11 unless a test says).
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import need
from daemon_helpers import LiveDaemon

from ledger.daemon.protocol import decode, encode

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "slurm_plugin" / "lua" / "job_submit.lua"
NUMERIC = {"time_limit", "min_nodes", "max_nodes", "num_tasks", "ntasks_per_node",
           "sockets_per_node", "user_id", "job_id"}
FIX = REPO / "tests" / "fixtures" / "slurm"
RELEASES = ["22.05", "23.02", "23.11", "24.05", "24.11", "25.05", "25.11", "26.05"]


def release_info(version: str) -> dict:
    return json.loads((FIX / version / "lua.json").read_text())

DRIVER = r"""
local NUMERIC = { %s }
local user_msgs = {}
local errtab, modify_log_user = arg[2] == "1", arg[3] == "1"
slurm = { SUCCESS = 0, ERROR = -1, ESLURM_ACCESS_DENIED = 2002, ESLURM_ACCOUNTING_POLICY = 2050,
  ESLURM_INVALID_ACCOUNT = 2045, ESLURM_INVALID_TIME_LIMIT = 2051, ESLURM_MISSING_TIME_LIMIT = 8000,
  ESLURM_INVALID_LICENSES = 2048, ESLURM_INVALID_NODE_COUNT = 2006,
  ESLURM_JOB_MISSING_SIZE_SPECIFICATION = 2008,
  log_info = function(...) io.stderr:write("INFO ", string.format(...), "\n") end,
  log_error = function(...) io.stderr:write("ERROR ", string.format(...), "\n") end,
  log_user = function(...) user_msgs[#user_msgs + 1] = string.format(...) end }
if errtab then  -- 23.02+: every ESLURM_* of slurm_errtab (src/lua/slurm_lua.c)
  slurm.ESLURM_INVALID_JOB_ID = 2017; slurm.ESLURM_INVALID_GRES = 2072
  slurm.ESLURM_MISSING_TIME_LIMIT = 2116; slurm.ESLURM_INVALID_QOS = 2066
end
dofile(arg[1])
local socket = require("socket")
local parts = {
  gpu = { name = "gpu", flag_default = 1, default_time = 60, max_time = 1440,
    max_nodes = 4294967295, total_nodes = 4 },
  short = { name = "short", flag_default = 0, default_time = 4294967294, max_time = 240,
    max_nodes = 2, total_nodes = 3 },
  nolimit = { name = "nolimit", flag_default = 0, default_time = 4294967294, max_time = 4294967295 } }
local function unesc(v) return (v:gsub("%%%%(%%x%%x)", function(h) return string.char(tonumber(h, 16)) end)) end
local function esc(v) return (tostring(v):gsub("[^%%w%%-%%._:/@,;=+]", function(c) return string.format("%%%%%%02X", c:byte()) end)) end
local function job(prefix, f)
  local d = { time_limit = 4294967294, min_nodes = 4294967294, max_nodes = 4294967294,
    num_tasks = 4294967294, ntasks_per_node = 65534, sockets_per_node = 65534,
    user_name = "alice", user_id = 1001, default_account = "physics", spank_job_env_size = 0 }
  if prefix == "r_" then d = {} end
  for k, v in pairs(f) do
    if k:sub(1, #prefix) == prefix then
      local name = k:sub(#prefix + 1)
      if v == "" then d[name] = nil
      elseif NUMERIC[name] then d[name] = tonumber(v) + 0.0 else d[name] = v end  -- lua_pushnumber: floats on 5.3+
    end
  end
  if f[prefix .. "token"] then
    d.token = nil
    d.spank_job_env = { [0] = "_SLURM_SPANK_OPTION_gpuledger_gpu_token=x", [1] = "GPULEDGER_TOKEN=" .. f[prefix .. "token"] }
    d.spank_job_env_size = 2
  end
  return d
end
for line in io.lines() do
  local f = {}
  for k, v in line:gmatch("([%%w_]+)=(%%S*)") do f[k] = unesc(v) end
  user_msgs = {}
  local t0 = socket.gettime()
  local d, rc
  if f.call == "modify" then
    d = job("d_", f)
    rc = slurm_job_modify(d, job("r_", f), parts, tonumber(f.uid or "0"))
    if not modify_log_user and #user_msgs > 0 then  -- 22.05 job_submit_lua.c job_modify
      for _, m in ipairs(user_msgs) do
        io.stderr:write("ERROR Use of log.user() in job_modify is not supported. ",
          "Message discarded: (\"", m, "\")\n")
      end
      user_msgs = {}
    end
  else
    d = job("", f)
    rc = slurm_job_submit(d, parts, d.user_id)
  end
  local ms = (socket.gettime() - t0) * 1000
  io.stdout:write(string.format("rc=%%d admin_comment=%%s user=%%s ms=%%.3f\n", rc,
    esc(d.admin_comment or ""), esc(table.concat(user_msgs, "|")), ms))
  io.stdout:flush()
end
""" % ", ".join(f"{n} = true" for n in sorted(NUMERIC))

FREE = ("freebie", "other")
CODES = {"ok": 0, "error": -1, "denied": 2002, "policy": 2050, "account": 2045,
         "bad_time": 2051, "no_time": 2116}


# Debian's slurmctld links Lua 5.1; RHEL-family builds link 5.3 or 5.4, where numbers that
# slurmctld pushes are floats (60.0 .. "" is "60.0") and string.format("%d") is strict.
INTERPRETERS = ("lua5.1", "lua5.3", "lua5.4")


def lua_available(interpreter: str = "lua5.1") -> bool:
    if not shutil.which(interpreter):
        return False
    return subprocess.run([interpreter, "-e", "require('socket.unix')"],
                          capture_output=True).returncode == 0


class Lua:
    """One lua5.1 process = one slurmctld Lua state (persists across calls, like slurmctld)."""

    def __init__(self, tmp: Path, script: Path = SCRIPT, interpreter: str = "lua5.1",
                 release: str = "24.11", **conf: object):
        self.conf = tmp / "job_submit.conf"
        self.conf.write_text("".join(f"{k} = {v}\n" for k, v in conf.items()))
        driver = tmp / "driver.lua"
        driver.write_text(DRIVER)
        info = release_info(release)
        self.prefix = info["gres_prefix"]
        self.proc = subprocess.Popen(
            [interpreter, str(driver), str(script), "1" if info["errtab"] else "0",
             "1" if info["modify_log_user"] else "0"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={"GPULEDGER_JOB_SUBMIT_CONF": str(self.conf)})
        self.log: list[str] = []
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self):
        for line in self.proc.stderr:
            self.log.append(line.rstrip("\n"))

    def _call(self, fields: dict) -> dict:
        self.proc.stdin.write(encode({k: v for k, v in fields.items()}).decode())
        self.proc.stdin.flush()
        out = decode(self.proc.stdout.readline())
        out["rc"] = int(out["rc"])
        out["ms"] = float(out["ms"])
        return out

    def submit(self, **fields) -> dict:
        return self._call({"call": "submit", **fields})

    def modify(self, uid: int = 0, **fields) -> dict:
        return self._call({"call": "modify", "uid": uid, **fields})

    def logged(self, text: str, wait: float = 3.0) -> bool:
        """Whether the script logged ``text`` (stderr is read by a thread: wait a little)."""
        end = time.monotonic() + wait
        while time.monotonic() < end:
            if any(text in line for line in self.log):
                return True
            time.sleep(0.02)
        return False

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(5)


@pytest.fixture
def daemon(sqlite_ledger):
    need(lua_available(), "lua5.1 with lua-socket (apt install lua5.1 lua-socket)")
    # [submit] free_accounts, as the daemon reads it and job_submit.conf is rendered from it
    d = LiveDaemon(sqlite_ledger, free_accounts=FREE).start()
    yield d
    d.close()


@pytest.fixture(params=INTERPRETERS)
def lua(request, daemon, tmp_path):
    need(lua_available(request.param), f"{request.param} with lua-socket "
         f"(apt install {request.param} lua-socket)")
    lu = Lua(tmp_path, socket=daemon.path, timeout=1.0, free_accounts=", ".join(FREE),
             interpreter=request.param)
    yield lu
    lu.close()


@pytest.fixture
def token(sqlite_ledger):
    return sqlite_ledger.mint("physics", 10 * 3600)[0]


def hold_of(result):
    comment = result["admin_comment"]
    assert comment.startswith("gpuledger:hold=hold_") and ";token=tok_" in comment, result
    return comment.split(";")[0].split("=")[1]


def test_non_gpu_job_passes_without_contact(lua, daemon):
    r = lua.submit()
    assert r["rc"] == 0 and r["admin_comment"] == ""
    assert lua.submit(tres_per_node="gres:gpu:0", token="x")["rc"] == 0
    assert "op=" not in daemon.log.getvalue()


@pytest.mark.parametrize("fields,gpus,gtype,seconds", [
    ({"tres_per_node": "gres:gpu:h100:2", "time_limit": 60}, 2, "h100", 3600),
    ({"tres_per_node": "gres/gpu:h100:2", "time_limit": 60}, 2, "h100", 3600),
    ({"tres_per_node": "gres:gpu:2,gres:nic:1", "time_limit": 30}, 2, None, 1800),
    ({"tres_per_job": "gres:gpu:a100:3"}, 3, "a100", 3600),           # partition default 60
    ({"tres_per_node": "gres:gpu:h100:2", "min_nodes": 2, "max_nodes": 2, "time_limit": 10},
     4, "h100", 600),                                                   # --gpus-per-node -N 2
    ({"tres_per_task": "gres:gpu:1", "num_tasks": 3, "time_limit": 10}, 3, None, 600),
    ({"tres_per_task": "gres/gpu:h100:1", "ntasks_per_node": 2, "min_nodes": 2,
      "max_nodes": 2, "time_limit": 10}, 4, "h100", 600),
    ({"tres_per_socket": "gres:gpu:1", "sockets_per_node": 2, "time_limit": 10}, 2, None, 600),
    ({"tres_per_node": "gres:gpu:3g.40gb:2", "time_limit": 60}, 2, "3g.40gb", 3600),  # MIG
    ({"tres_per_node": "gres/gpu:1g.10gb", "time_limit": 60}, 1, "1g.10gb", 3600),
    ({"tres_per_node": "gres:gpu:h100", "partition": "short"}, 1, "h100", 4 * 3600),  # max
    ({"tres_per_node": "gres:gpu:h100", "partition": "short", "time_limit": 600}, 1, "h100",
     4 * 3600),                                                     # clamped to MaxTime
    # the most nodes Slurm may give: -n 3 without -N may be 3 nodes of --gres GPUs each
    ({"tres_per_node": "gres:gpu:1", "num_tasks": 3, "ntasks_per_node": 1, "time_limit": 10},
     3, None, 600),
    ({"tres_per_node": "gres/gpu:2", "num_tasks": 3, "time_limit": 10}, 6, None, 600),
    ({"tres_per_node": "gres:gpu:1", "num_tasks": 8, "time_limit": 10}, 4, None, 600),  # 4 nodes
    ({"tres_per_node": "gres:gpu:1", "num_tasks": 8, "time_limit": 10, "partition": "short"},
     2, None, 600),                                               # short: MaxNodes=2
    ({"tres_per_node": "gres:gpu:1", "num_tasks": 8, "min_nodes": 2, "max_nodes": 2,
      "time_limit": 10}, 2, None, 600),                           # -N 2 -n 8: two nodes
    ({"tres_per_node": "gres:gpu:1", "min_nodes": 1, "max_nodes": 3, "time_limit": 10},
     3, None, 600),                                               # -N 1-3
    # Slurm matches GPU types without case: gpu:H100 runs on an h100 and pays for one
    ({"tres_per_node": "gres:gpu:H100:2", "time_limit": 60}, 2, "h100", 3600),
    ({"tres_per_job": "gres/gpu:A100:1", "time_limit": 60}, 1, "a100", 3600),
])
def test_gpu_request_forms(lua, sqlite_ledger, token, fields, gpus, gtype, seconds):
    r = lua.submit(token=token, **fields)
    assert r["rc"] == 0, r
    hold = sqlite_ledger.hold(hold_of(r))
    assert (hold.gpus, hold.gpu_type, hold.seconds, hold.tasks) == (gpus, gtype, seconds, 1)
    assert hold.user == "alice" and hold.account == "physics"


def test_array_holds_task_count_times_cost(lua, sqlite_ledger, token):
    r = lua.submit(token=token, tres_per_node="gres:gpu:h100:1", time_limit=6, array_inx="0-9")
    hold = sqlite_ledger.hold(hold_of(r))
    assert hold.tasks == 10 and hold.amount == 10 * 360
    r = lua.submit(token=token, tres_per_node="gres:gpu:h100:1", time_limit=6,
                   array_inx="0-9:2,20%2")
    assert sqlite_ledger.hold(hold_of(r)).tasks == 6


def test_refusals_reach_the_user_with_numbers(lua, token):
    r = lua.submit(token=token, tres_per_node="gres:gpu:h100:2", time_limit=8 * 60)
    assert r["rc"] == CODES["policy"]
    assert r["user"].startswith("gpu-token: needs 16.000 GPU-h (2 x h100 x 8:00:00), token tok_")
    assert r["user"].endswith(" has 10.000 GPU-h left: 6.000 GPU-h short; -t 5:00:00 would fit")
    r = lua.submit(token=token, tres_per_node="gres:gpu:1", time_limit=5, account="chemistry")
    assert r["rc"] == CODES["account"] and "belongs to account physics, not chemistry" in r["user"]
    r = lua.submit(token="garbage", tres_per_node="gres:gpu:1", time_limit=5)
    assert r["rc"] == CODES["denied"] and r["user"].startswith("gpu-token: malformed token")


def test_missing_token_and_free_accounts(lua, daemon, sqlite_ledger):
    """The reader decides both: a job without a token is refused with its GPU count, a free
    account's job runs with no hold (job_submit.lua forwards; it holds no such rule)."""
    r = lua.submit(tres_per_node="gres:gpu:1", num_tasks=2, time_limit=5)
    assert r["rc"] == CODES["denied"], r
    assert r["user"].startswith("gpu-token: this job asks for 2 GPU(s) but carries no GPU token")
    assert "--gpu-token" in r["user"]
    free = lua.submit(tres_per_node="gres:gpu:1", time_limit=5, account="freebie")
    assert free["rc"] == 0 and free["admin_comment"] == ""
    default_free = lua.submit(tres_per_node="gres:gpu:1", time_limit=5,
                              default_account="other")  # no -A: the user's default account
    assert default_free["rc"] == 0 and default_free["admin_comment"] == ""
    assert lua.logged("gpuledger: result=refused reason=no_token")
    assert lua.logged("gpuledger: result=free user=alice account=freebie")
    assert lua.logged("gpuledger: result=free user=alice account=other")
    assert sqlite_ledger.holds() == []


def test_free_accounts_and_tokenless_jobs_while_the_ledger_is_down(tmp_path):
    """The daemon away, the script decides alone from the same list: a free account's job
    runs (reject mode too), a job without a token is refused, never deferred."""
    need(lua_available(), "lua5.1 with lua-socket")
    for mode in ("reject", "accept"):
        lua = Lua(tmp_path, socket=tmp_path / "nothing.sock", timeout=0.3,
                  on_ledger_unavailable=mode, free_accounts=", ".join(FREE))
        try:
            free = lua.submit(tres_per_node="gres:gpu:2", time_limit=5, account="freebie")
            assert free["rc"] == 0 and free["admin_comment"] == "", free
            bare = lua.submit(tres_per_node="gres:gpu:2", time_limit=5)
            assert bare["rc"] == CODES["denied"] and "carries no GPU token" in bare["user"]
            assert "ledger is unavailable" in bare["user"] and bare["admin_comment"] == ""
        finally:
            lua.close()


def test_no_time_limit_anywhere_asks_for_t(lua, token):
    r = lua.submit(token=token, tres_per_node="gres:gpu:1", partition="nolimit")
    assert r["rc"] == CODES["bad_time"]
    assert r["user"] == ("gpu-token: partition nolimit has no default or maximum time limit; "
                         "give the job one with -t/--time (e.g. -t 2:00:00)")


def test_connection_is_reused_and_survives_a_daemon_restart(sqlite_ledger, daemon, lua, token):
    a = lua.submit(token=token, tres_per_node="gres:gpu:1", time_limit=1)
    b = lua.submit(token=token, tres_per_node="gres:gpu:1", time_limit=1)
    pids = {line.split(" pid=")[1].split()[0] for line in daemon.log.getvalue().splitlines()
            if "op=reserve" in line}
    assert a["rc"] == b["rc"] == 0 and len(pids) == 1  # one connection for both jobs
    daemon.stop()
    again = LiveDaemon(sqlite_ledger)
    again.path = daemon.path
    again.start()
    try:
        c = lua.submit(token=token, tres_per_node="gres:gpu:1", time_limit=1)
        assert c["rc"] == 0, c  # stale connection noticed, retried on a fresh one
        assert len(sqlite_ledger.holds()) == 3
    finally:
        again.close()


def test_unavailable_reject_mode_refuses_within_timeout(tmp_path, token):
    need(lua_available(), "lua5.1 with lua-socket")
    silent = socket.socket(socket.AF_UNIX)  # accepts, never answers
    silent.bind(str(tmp_path / "silent.sock"))
    silent.listen(8)
    lua = Lua(tmp_path, socket=tmp_path / "silent.sock", timeout=0.3)
    try:
        r = lua.submit(token=token, tres_per_node="gres:gpu:1", time_limit=5)
        assert r["rc"] == CODES["error"]
        assert r["user"].startswith("gpu-token: the GPU ledger is unavailable (timeout)")
        assert 250 <= r["ms"] < 450
        gone = Lua(tmp_path, socket=tmp_path / "nothing.sock", timeout=0.3)
        r = gone.submit(token=token, tres_per_node="gres:gpu:1", time_limit=5)
        assert r["rc"] == CODES["error"] and "ledger is unavailable" in r["user"]
        gone.close()
    finally:
        lua.close()
        silent.close()


def test_a_blank_token_is_no_token_even_when_the_ledger_is_down(tmp_path):
    """A token of spaces is not a token: never deferred (which would run unpaid), refused."""
    need(lua_available(), "lua5.1 with lua-socket")
    lua = Lua(tmp_path, socket=tmp_path / "nothing.sock", timeout=0.3,
              on_ledger_unavailable="accept")
    try:
        for blank in ("   ", "\t"):
            r = lua.submit(token=blank, tres_per_node="gres:gpu:1", time_limit=5)
            assert r["rc"] == CODES["denied"] and "carries no GPU token" in r["user"], r
            assert r["admin_comment"] == ""
    finally:
        lua.close()


def test_unavailable_accept_mode_defers(tmp_path, token):
    need(lua_available(), "lua5.1 with lua-socket")
    lua = Lua(tmp_path, socket=tmp_path / "nothing.sock", timeout=0.3,
              on_ledger_unavailable="accept")
    try:
        r = lua.submit(token=token, tres_per_node="gres:gpu:1", time_limit=5)
        assert r["rc"] == 0 and r["admin_comment"] == "gpuledger:deferred"
        assert lua.logged("result=deferred")
        plain = lua.submit()
        assert plain["rc"] == 0 and plain["admin_comment"] == ""
    finally:
        lua.close()


def test_lua_error_refuses_the_job(daemon, tmp_path, token):
    broken = tmp_path / "job_submit.lua"
    text = SCRIPT.read_text()
    hook = "-- gpuledger:test-hook (tests replace this line to force a Lua error)"
    assert hook in text
    broken.write_text(text.replace(hook, "local x = nil; x = x.boom"))
    lua = Lua(tmp_path, script=broken, socket=daemon.path)
    try:
        r = lua.submit(token=token, tres_per_node="gres:gpu:1", time_limit=5)
        assert r["rc"] == CODES["error"] and "internal error" in r["user"]
        assert lua.logged("lua error, job refused")
    finally:
        lua.close()


def test_a_refusal_without_a_code_still_refuses(daemon, tmp_path, token):
    """Slurm reads a nil return code as SUCCESS: refuse() without a code must not accept."""
    broken = tmp_path / "job_submit.lua"
    text = SCRIPT.read_text()
    hook = "-- gpuledger:test-hook (tests replace this line to force a Lua error)"
    broken.write_text(text.replace(hook, 'refuse("gpu-token: no code given")'))
    lua = Lua(tmp_path, script=broken, socket=daemon.path)
    try:
        r = lua.submit(token=token, tres_per_node="gres:gpu:1", time_limit=5)
        assert r["rc"] == CODES["error"] and "no code given" in r["user"]
    finally:
        lua.close()


def test_modify_resizes_or_refuses(lua, sqlite_ledger, token):
    r = lua.submit(token=token, tres_per_node="gres:gpu:h100:2", time_limit=60)
    hold = hold_of(r)
    rec = {"r_admin_comment": r["admin_comment"], "r_time_limit": 60, "r_job_id": 7,
           "r_tres_per_node": "gres:gpu:h100:2", "r_min_nodes": 1}
    grown = lua.modify(d_time_limit=120, **rec)
    assert grown["rc"] == 0 and sqlite_ledger.hold(hold).amount == 4 * 3600
    refused = lua.modify(d_time_limit=600, **rec)
    assert refused["rc"] == CODES["policy"] and "needs" in refused["user"]
    assert sqlite_ledger.hold(hold).amount == 4 * 3600
    fewer = lua.modify(d_tres_per_node="gres:gpu:h100:1", **rec)
    assert fewer["rc"] == 0 and sqlite_ledger.hold(hold).gpus == 1
    unchanged = lua.modify(d_name="renamed", **rec)
    assert unchanged["rc"] == 0


def test_modify_protects_the_hold_field(lua, token):
    r = lua.submit(token=token, tres_per_node="gres:gpu:1", time_limit=5)
    rec = {"r_admin_comment": r["admin_comment"], "r_time_limit": 5}
    forged = lua.modify(uid=1001, d_admin_comment="gpuledger:hold=hold_00;token=tok_x", **rec)
    assert forged["rc"] == CODES["denied"] and "cannot be changed" in forged["user"]
    wiped = lua.modify(uid=1001, d_admin_comment="mine", **rec)
    assert wiped["rc"] == CODES["denied"]
    by_root = lua.modify(uid=0, d_admin_comment="gpuledger:deferred", **rec)
    assert by_root["rc"] == 0


def test_modify_adding_gpus_to_a_plain_job_is_refused(lua):
    r = lua.modify(uid=1001, d_tres_per_node="gres:gpu:2", r_time_limit=5)
    assert r["rc"] == CODES["denied"] and "GPUs cannot be added" in r["user"]


def test_submit_latency_through_lua_is_small(lua, token):
    times = []
    for _ in range(50):
        r = lua.submit(token=token, tres_per_node="gres:gpu:1", time_limit=1)
        assert r["rc"] == 0
        times.append(r["ms"])
    times.sort()
    assert times[len(times) // 2] < 20  # generous: SQLite commit with fsync on a shared box


# -- shares of a GPU, candidate partitions, updates that move a job (trust issue items 4, 5) --

GRES_CONF = """AutoDetect=off
NodeName=vm Name=gpu Type=h100 File=/dev/nvidia0
NodeName=vm Name=gpu Type=h100 File=/dev/nvidia1
NodeName=vm Name=gpu Type=a100 File=/dev/nvidia2
NodeName=vm Name=shard Count=4 File=/dev/nvidia0
NodeName=vm Name=shard Count=8 File=/dev/nvidia1
NodeName=vm Name=shard Count=4 File=/dev/nvidia2
"""


@pytest.fixture
def shards(sqlite_ledger, tmp_path):
    """The daemon's ledger reads this gres.conf: h100s cut into 4 and 8 shards, an a100 into 4."""
    from ledger.shares import GresFile
    path = tmp_path / "gres.conf"
    path.write_text(GRES_CONF)
    sqlite_ledger.gres = GresFile(path)
    return path


@pytest.mark.parametrize("fields,gres,gtype,gpus,per_node,share,amount", [
    # untyped: the highest rate (h100 1.0) over the fewest shards of a GPU that fits (4)
    ({"tres_per_node": "gres:shard:2"}, "shard", None, 2, 2, 4, 1800),
    ({"tres_per_node": "gres/shard:2"}, "shard", None, 2, 2, 4, 1800),
    # 6 shards fit only the h100 cut into 8
    ({"tres_per_node": "gres:shard:h100:6"}, "shard", "h100", 6, 6, 8, 2700),
    # MPS: a percentage of one GPU (a100 0.6 x 50/100 x 1 h)
    ({"tres_per_node": "gres:mps:a100:50"}, "mps", "a100", 50, 50, 100, 1080),
    # two nodes, two shards each: 4 x 1/4 x 1.0 x 1 h
    ({"tres_per_node": "gres:shard:2", "min_nodes": 2, "max_nodes": 2}, "shard", None, 4, 2,
     4, 3600),
])
def test_shares_of_a_gpu_are_held_as_shares(lua, daemon, sqlite_ledger, shards, token, fields,
                                            gres, gtype, gpus, per_node, share, amount):
    """shard/mps are priced as s/S of a GPU: the worst case over the candidate GPUs."""
    bare = lua.submit(time_limit=60, **fields)
    assert bare["rc"] == CODES["denied"] and "carries no GPU token" in bare["user"], bare
    r = lua.submit(token=token, time_limit=60, **fields)
    assert r["rc"] == 0, r
    hold = sqlite_ledger.hold(hold_of(r))
    assert (hold.gres, hold.gpu_type, hold.gpus, hold.per_node, hold.share, hold.amount) == \
        (gres, gtype, gpus, per_node, share, amount)
    free = lua.submit(time_limit=60, account="freebie", **fields)
    assert free["rc"] == 0 and free["admin_comment"] == ""


@pytest.mark.parametrize("fields,message", [
    ({"tres_per_node": "gres:shard:9"}, "more shards than any GPU has (at most 8 per GPU"),
    ({"tres_per_node": "gres:shard:a100:5"}, "more shards than any a100 GPU has (at most 4"),
    ({"tres_per_node": "gres:mps:150"}, "an MPS share is 1 to 100"),
    ({"tres_per_task": "gres/mps:25", "num_tasks": 2}, "asked per node, with --gres=mps:N"),
    ({"tres_per_job": "gres:shard:h100:4"}, "asked per node, with --gres=shard:N"),
    ({"tres_per_node": "gres:gpu:1,gres:shard:1"}, "not both"),
])
def test_shares_that_cannot_run_are_refused_with_the_reason(lua, daemon, shards, token, fields,
                                                           message):
    r = lua.submit(token=token, time_limit=5, **fields)
    assert r["rc"] != 0 and message in r["user"], r
    assert r["admin_comment"] == ""


def test_a_held_share_job_resizes_at_its_share(lua, daemon, sqlite_ledger, shards, token):
    r = lua.submit(token=token, tres_per_node="gres:shard:h100:2", time_limit=60)
    hold = hold_of(r)
    assert sqlite_ledger.hold(hold).amount == 1800  # 2/4 x 1.0 x 3600
    comment = r["admin_comment"]
    longer = lua.modify(uid=0, d_time_limit=120, r_admin_comment=comment,
                        r_tres_per_node="gres:shard:h100:2")
    assert longer["rc"] == 0, longer
    assert sqlite_ledger.hold(hold).amount == 3600
    more = lua.modify(uid=0, d_tres_per_node="gres:shard:h100:6", r_admin_comment=comment,
                      r_time_limit=120)
    assert more["rc"] == 0, more
    after = sqlite_ledger.hold(hold)
    assert (after.per_node, after.share, after.amount) == (6, 8, 6 * 7200 // 8)


def test_other_gres_named_like_gpu_is_not_a_gpu(lua, daemon):
    r = lua.submit(tres_per_node="gres:gpunic:1", time_limit=5)
    assert r["rc"] == 0 and r["admin_comment"] == ""


def test_modify_adding_shards_to_a_plain_job_is_refused(lua):
    r = lua.modify(uid=1001, d_tres_per_node="gres:shard:2", r_time_limit=5)
    assert r["rc"] == CODES["denied"] and "cannot be added" in r["user"]


@pytest.fixture
def gpu_only_token(sqlite_ledger):
    from ledger.tokens import Scopes
    return sqlite_ledger.mint("physics", 10 * 3600, scopes=Scopes(partitions=("gpu",)))[0]


def test_every_candidate_partition_is_checked(lua, sqlite_ledger, gpu_only_token):
    both = lua.submit(token=gpu_only_token, tres_per_node="gres:gpu:h100:1", time_limit=5,
                      partition="gpu,short")
    assert both["rc"] == CODES["denied"], both
    assert "not valid in partition short (only gpu)" in both["user"]
    reversed_order = lua.submit(token=gpu_only_token, tres_per_node="gres:gpu:h100:1",
                                time_limit=5, partition="short,gpu")
    assert reversed_order["rc"] == CODES["denied"]
    one = lua.submit(token=gpu_only_token, tres_per_node="gres:gpu:h100:1", time_limit=5,
                     partition="gpu")
    assert one["rc"] == 0
    assert not any(h.partition and "short" in h.partition for h in sqlite_ledger.holds())


def test_multi_partition_job_is_held_at_its_most_expensive_candidate(lua, sqlite_ledger, token):
    """Untyped GPUs over several partitions: held at the highest rate, for the longest
    default time of the candidates; the hold records every candidate."""
    r = lua.submit(token=token, tres_per_node="gres:gpu:1", partition="short,gpu")
    hold = sqlite_ledger.hold(hold_of(r))
    assert (hold.partition, hold.seconds, hold.rate_ppm) == ("short,gpu", 4 * 3600, 1_000_000)
    assert hold.amount == 4 * 3600


def _held(lua, token, **fields):
    r = lua.submit(token=token, **fields)
    assert r["rc"] == 0, r
    rec = {"r_admin_comment": r["admin_comment"], "r_time_limit": fields["time_limit"],
           "r_job_id": 7, "r_tres_per_node": fields["tres_per_node"], "r_min_nodes": 1,
           "r_account": "physics", "r_partition": fields.get("partition", "gpu")}
    return hold_of(r), rec


def test_modify_to_a_dearer_gpu_type_reprices_the_hold(lua, sqlite_ledger, token):
    hold, rec = _held(lua, token, tres_per_node="gres:gpu:a100:1", time_limit=60)
    assert sqlite_ledger.hold(hold).amount == 2160  # 0.6 x 3600
    up = lua.modify(uid=1001, d_tres_per_node="gres:gpu:h100:1", **rec)
    assert up["rc"] == 0, up
    h = sqlite_ledger.hold(hold)
    assert (h.gpu_type, h.rate_ppm, h.amount) == ("h100", 1_000_000, 3600)
    untyped = lua.modify(uid=1001, d_tres_per_node="gres:gpu:2", **rec)
    h = sqlite_ledger.hold(hold)
    assert untyped["rc"] == 0 and (h.gpu_type, h.rate_ppm, h.amount) == (None, 1_000_000, 7200)


def test_modify_cannot_leave_the_tokens_scopes(lua, sqlite_ledger, gpu_only_token):
    hold, rec = _held(lua, gpu_only_token, tres_per_node="gres:gpu:h100:1", time_limit=60)
    before = sqlite_ledger.hold(hold)
    moved = lua.modify(uid=1001, d_partition="gpu,short", **rec)
    assert moved["rc"] == CODES["denied"] and "partition short" in moved["user"], moved
    other = lua.modify(uid=1001, d_account="chemistry", **rec)
    assert other["rc"] == CODES["account"] and "not chemistry" in other["user"], other
    assert sqlite_ledger.hold(hold) == before
    fine = lua.modify(uid=1001, d_partition="gpu", **rec)
    assert fine["rc"] == 0


def test_modify_counts_gpus_over_the_jobs_nodes(lua, sqlite_ledger, token):
    """An update that leaves the node count unset keeps the record's; a new count multiplies."""
    r = lua.submit(token=token, tres_per_node="gres:gpu:h100:1", min_nodes=2, max_nodes=2,
                   time_limit=60)
    hold = hold_of(r)
    assert sqlite_ledger.hold(hold).gpus == 2
    rec = {"r_admin_comment": r["admin_comment"], "r_time_limit": 60, "r_job_id": 7,
           "r_tres_per_node": "gres:gpu:h100:1", "r_min_nodes": 2, "r_max_nodes": 2,
           "r_account": "physics"}
    retyped = lua.modify(uid=1001, d_tres_per_node="gres:gpu:h100:2", **rec)
    assert retyped["rc"] == 0 and sqlite_ledger.hold(hold).gpus == 4  # 2 per node x 2 nodes
    wider = lua.modify(uid=1001, d_min_nodes=3, d_max_nodes=3,
                       **{**rec, "r_tres_per_node": "gres:gpu:h100:2"})
    assert wider["rc"] == 0 and sqlite_ledger.hold(hold).gpus == 6
    assert sqlite_ledger.hold(hold).amount == 6 * 3600


def test_modify_of_a_per_task_gpu_job_is_refused(lua, sqlite_ledger, token):
    r = lua.submit(token=token, tres_per_task="gres:gpu:1", num_tasks=2, time_limit=10)
    hold = hold_of(r)
    rec = {"r_admin_comment": r["admin_comment"], "r_time_limit": 10, "r_job_id": 7,
           "r_tres_per_task": "gres:gpu:1", "r_min_nodes": 1, "r_account": "physics"}
    for change in ({"d_min_nodes": 2, "d_max_nodes": 2}, {"d_tres_per_task": "gres:gpu:2"}):
        out = lua.modify(uid=1001, **change, **rec)
        assert out["rc"] == CODES["denied"] and "per task or per socket" in out["user"], out
    assert sqlite_ledger.hold(hold).gpus == 2
    longer = lua.modify(uid=1001, d_time_limit=20, **rec)  # the time alone is fine
    assert longer["rc"] == 0 and sqlite_ledger.hold(hold).seconds == 1200


# -- Slurm releases 22.05 .. 26.05 (fixtures/slurm/<release>/lua.json) -----------------------

@pytest.fixture(params=[(r, i) for r in RELEASES for i in INTERPRETERS],
                ids=lambda p: f"{p[0]}-{p[1]}")
def release_lua(request, daemon, tmp_path):
    release, interpreter = request.param
    need(lua_available(interpreter), f"{interpreter} with lua-socket "
         f"(apt install {interpreter} lua-socket)")
    lu = Lua(tmp_path, socket=daemon.path, timeout=1.0, free_accounts="freebie",
             interpreter=interpreter, release=release)
    lu.release = release_info(release)
    yield lu
    lu.close()


def test_release_request_forms(release_lua, sqlite_ledger, token):
    """sbatch's request forms as each release writes them (gres: before 23.11, gres/ after),
    with a QOS list where the release allows one (24.11+): priced alike everywhere."""
    p = release_lua.prefix
    qos = "normal,high" if release_lua.release["qos_list"] else "normal"
    forms = [
        ({"tres_per_node": f"{p}gpu:h100:2", "time_limit": 60}, 2, "h100", 3600),   # --gres
        ({"tres_per_job": f"{p}gpu:3", "time_limit": 10}, 3, None, 600),            # --gpus
        ({"tres_per_node": f"{p}gpu:h100:1,{p}gpu:h100:1", "time_limit": 10}, 2, "h100", 600),
        ({"tres_per_task": f"{p}gpu:1", "num_tasks": 3, "time_limit": 10}, 3, None, 600),
        ({"tres_per_socket": f"{p}gpu:1", "sockets_per_node": 2, "time_limit": 10}, 2, None,
         600),
    ]
    for fields, gpus, gtype, seconds in forms:
        r = release_lua.submit(token=token, qos=qos, **fields)
        assert r["rc"] == 0, (fields, r)
        hold = sqlite_ledger.hold(hold_of(r))
        assert (hold.gpus, hold.gpu_type, hold.seconds) == (gpus, gtype, seconds), fields
    shard = release_lua.submit(token=token, qos=qos, tres_per_node=f"{p}shard:2", time_limit=5)
    assert shard["rc"] == CODES["denied"]
    plain = release_lua.submit(qos=qos, tres_per_node=f"{p}gpunic:1", time_limit=5)
    assert plain["rc"] == 0 and plain["admin_comment"] == ""


def test_release_modify_refusal_reaches_the_user_where_slurm_lets_it(release_lua, sqlite_ledger,
                                                                      token):
    """23.02+ hands slurm_job_modify's log_user text to the user; 22.05 drops it with an
    error per call, so the script writes the reason to slurmctld's log instead."""
    p = release_lua.prefix
    r = release_lua.submit(token=token, tres_per_node=f"{p}gpu:h100:2", time_limit=60)
    hold = hold_of(r)
    rec = {"r_admin_comment": r["admin_comment"], "r_time_limit": 60, "r_job_id": 7,
           "r_tres_per_node": f"{p}gpu:h100:2", "r_min_nodes": 1, "r_account": "physics",
           "r_qos": "normal"}
    # scontrol update gres=gpu:h100:1 writes the release's prefix too
    fewer = release_lua.modify(uid=1001, d_tres_per_node=f"{p}gpu:h100:1", **rec)
    assert fewer["rc"] == 0 and sqlite_ledger.hold(hold).gpus == 1
    rec["r_tres_per_node"] = f"{p}gpu:h100:1"
    refused = release_lua.modify(uid=1001, d_time_limit=100 * 60, **rec)
    assert refused["rc"] == CODES["policy"]
    if release_lua.release["modify_log_user"]:
        assert refused["user"].startswith("gpu-token: needs "), refused
    else:
        assert refused["user"] == ""
        assert release_lua.logged("change refused (not shown to the user by this Slurm): "
                                  "gpu-token: needs ")
    assert not any("Use of log.user() in job_modify is not supported" in line
                   for line in release_lua.log)
    qos_only = release_lua.modify(uid=1001, d_qos="normal,high", **rec)  # not a price change
    assert qos_only["rc"] == 0 and sqlite_ledger.hold(hold).gpus == 1


def test_release_modify_log_names_the_sluid(release_lua, sqlite_ledger, token):
    r = release_lua.submit(token=token, tres_per_node=f"{release_lua.prefix}gpu:1", time_limit=5)
    rec = {"r_admin_comment": r["admin_comment"], "r_time_limit": 5, "r_job_id": 9}
    if release_lua.release["job_rec_sluid"]:
        rec["r_original_sluid"] = "s2MXM88KGAAR00"
    assert release_lua.modify(uid=1001, d_time_limit=6, **rec)["rc"] == 0
    want = "job=9 sluid=s2MXM88KGAAR00 hold=" if release_lua.release["job_rec_sluid"] else \
        "job=9 hold="
    assert release_lua.logged("result=resize " + want)


def test_the_jobs_qos_and_partitions_price_its_tier(lua, sqlite_ledger, token):
    """--qos reaches the ledger; the hold takes the worst tier among its candidates."""
    sqlite_ledger.set_multiplier("qos", "premium", 2_000_000)
    sqlite_ledger.set_multiplier("partition", "short", 500_000)
    r = lua.submit(token=token, tres_per_node="gres:gpu:h100:1", time_limit=10, qos="premium",
                   partition="short")
    assert r["rc"] == 0, r
    hold = sqlite_ledger.hold(hold_of(r))
    assert (hold.qos, hold.multiplier_ppm, hold.amount) == ("premium", 1_000_000, 600)
    plain = sqlite_ledger.hold(hold_of(lua.submit(token=token, tres_per_node="gres:gpu:h100:1",
                                                  time_limit=10, partition="gpu,short")))
    assert (plain.qos, plain.multiplier_ppm, plain.amount) == (None, 1_000_000, 600)
    cheap = sqlite_ledger.hold(hold_of(lua.submit(token=token, tres_per_node="gres:gpu:h100:1",
                                                  time_limit=10, partition="short")))
    assert (cheap.multiplier_ppm, cheap.amount) == (500_000, 300)
