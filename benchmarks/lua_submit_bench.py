"""job_submit.lua at the Lua level, before and after: CPU per slurm_job_submit call.

No Slurm needed: a Lua interpreter (lua5.1 + lua-socket, as slurmctld's) loads a tree's
job_submit.lua with a stub ``slurm`` table and calls slurm_job_submit N times in one Lua
state (as slurmctld does), against a live ``gpuledger serve`` of the same tree (SQLite,
``fast_reserve`` unless --durable; every call a real hold). The baseline tree's script and
daemon (--baseline-tree / --baseline-rev, benchmarks/baseline.py) and this tree's run in
interleaved rounds (A B B A …). Reported per call, medians over rounds: CPU of the Lua
process (the part slurmctld pays, inside its job write lock), CPU of the daemon (with its
writer), their sum, wall time; and the request/response bytes of one call.

    .venv/bin/python benchmarks/lua_submit_bench.py --baseline-rev main [--calls 2000]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import baseline
from benchmarks.proccpu import cpu_s
from ledger.schema import set_keys

# One slurmctld Lua state: the script loaded once, slurm_job_submit called N times on a job
# as sbatch --gpu-token=T --gres=gpu:h100:1 -t 10 (or a CPU job) sends it; prints the Lua
# process's CPU seconds (os.clock) and wall seconds over the calls, and how many held.
DRIVER = r"""
local script, calls, kind, token = arg[1], tonumber(arg[2]), arg[3], arg[4]
local socket = require("socket")
slurm = { SUCCESS = 0, ERROR = -1, ESLURM_ACCESS_DENIED = 2002, ESLURM_ACCOUNTING_POLICY = 2050,
  ESLURM_INVALID_ACCOUNT = 2045, ESLURM_INVALID_TIME_LIMIT = 2051, ESLURM_INVALID_JOB_ID = 2017,
  log_info = function() end, log_error = function(...) io.stderr:write(string.format(...), "\n") end,
  log_user = function(...) io.stderr:write("user: ", string.format(...), "\n") end }
dofile(script)
local parts = { gpu = { name = "gpu", flag_default = 1, default_time = 60, max_time = 1440,
  max_nodes = 4294967295, total_nodes = 4 } }
local function job()
  local d = { time_limit = 10, min_nodes = 4294967294, max_nodes = 4294967294,
    num_tasks = 4294967294, ntasks_per_node = 65534, sockets_per_node = 65534,
    user_name = "root", user_id = 0, default_account = "physics",
    spank_job_env = { [0] = "_SLURM_SPANK_OPTION_gpuledger_gpu_token=x",
                      [1] = "GPULEDGER_TOKEN=" .. token }, spank_job_env_size = 2 }
  if kind == "gpu" then d.tres_per_node = "gres:gpu:h100:1" end
  return d
end
local held = 0
local c0, t0 = os.clock(), socket.gettime()
for _ = 1, calls do
  local d = job()
  local rc = slurm_job_submit(d, parts, 0)
  if rc ~= 0 then error("slurm_job_submit returned " .. tostring(rc)) end
  if d.admin_comment then held = held + 1 end
end
io.stdout:write(string.format("%.6f %.6f %d\n", os.clock() - c0, socket.gettime() - t0, held))
"""


def run(cmd: list[str], **kw) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, **kw)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} …: {out.stderr.strip()[-2000:]}")
    return out.stdout.strip()


class Variant:
    """One tree: its ledger, daemon and job_submit.lua."""

    def __init__(self, name: str, tree: Path, root: Path, durable: bool):
        self.name, self.tree = name, tree
        self.script = baseline.lua_script(tree)
        self.dir = root / name
        self.dir.mkdir()
        gl = [*baseline.gpuledger(tree), "--config", str(self.dir / "gpuledger.toml")]
        run([*gl, "init"], cwd=self.dir)
        cfg = self.dir / "gpuledger.toml"
        self.socket = self.dir / "gl.sock"
        cfg.write_text(set_keys(cfg.read_text(), {"daemon": {
            "socket": str(self.socket), "slurm_user": "root", "fast_reserve": not durable}}))
        run([*gl, "keys", "generate", "--kid", "bench"])
        run([*gl, "account", "create", "physics"])
        run([*gl, "rates", "set", "h100", "1.0"])
        # [limits] max_token_hours' default: six million 10-minute jobs
        self.token = run([*gl, "token", "mint", "--account", "physics", "--hours", "1000000"])
        self.log = open(self.dir / "daemon.log", "w")  # noqa: SIM115 - the daemon's lifetime
        self.daemon = subprocess.Popen([*gl, "serve"], stderr=self.log, stdout=self.log)
        for _ in range(200):
            if self.socket.exists():
                break
            time.sleep(0.05)
        else:
            raise SystemExit(f"{name}: the daemon did not start (see {self.dir}/daemon.log)")
        self.conf = self.dir / "job_submit.conf"
        self.conf.write_text(f"socket = {self.socket}\ntimeout = 5.0\n")

    def round(self, lua: str, driver: Path, calls: int, kind: str) -> tuple[float, ...]:
        """(Lua CPU µs, daemon CPU µs, wall µs) per call over one run of ``calls``."""
        before = cpu_s(self.daemon.pid)
        out = run([lua, str(driver), str(self.script), str(calls), kind, self.token],
                  env={**os.environ, "GPULEDGER_JOB_SUBMIT_CONF": str(self.conf)})
        time.sleep(0.05)  # the writer's last batch
        daemon = cpu_s(self.daemon.pid) - before
        lua_cpu, wall, held = out.split()
        if kind == "gpu" and int(held) != calls:
            raise SystemExit(f"{self.name}: {held} of {calls} calls held")
        return (float(lua_cpu) / calls * 1e6, daemon / calls * 1e6, float(wall) / calls * 1e6)

    def wire(self, lua: str, driver: Path) -> tuple[int, int]:
        """Bytes of one GPU call's request line and of its reply, read off a relay."""
        relay = self.dir / "relay.sock"
        seen: list[int] = []
        srv = socket.socket(socket.AF_UNIX)
        srv.bind(str(relay))
        srv.listen(1)

        def serve():
            conn, _ = srv.accept()
            up = socket.socket(socket.AF_UNIX)
            up.connect(str(self.socket))
            with conn, up:
                line = conn.makefile("rb").readline()
                up.sendall(line)
                reply = up.makefile("rb").readline()
                conn.sendall(reply)
                seen.extend((len(line), len(reply)))

        t = threading.Thread(target=serve, daemon=True)
        t.start()
        conf = self.dir / "relay.conf"
        conf.write_text(f"socket = {relay}\ntimeout = 5.0\n")
        run([lua, str(driver), str(self.script), "1", "gpu", self.token],
            env={**os.environ, "GPULEDGER_JOB_SUBMIT_CONF": str(conf)})
        t.join(5)
        srv.close()
        return seen[0], seen[1]

    def close(self) -> None:
        self.daemon.terminate()
        self.daemon.wait(15)
        self.log.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=2000, help="slurm_job_submit calls per run")
    ap.add_argument("--lua", default="lua5.1", help="the interpreter (slurmctld's Lua)")
    ap.add_argument("--durable", action="store_true",
                    help="daemons commit each hold before answering (no fast_reserve)")
    ap.add_argument("--cpu-jobs", action="store_true",
                    help="also time CPU jobs (the shortcut: no daemon contact)")
    baseline.add_options(ap)
    args = ap.parse_args()
    if not shutil.which(args.lua):
        raise SystemExit(f"{args.lua} not found (apt install {args.lua} lua-socket)")
    with baseline.baseline_tree(args) as base:
        if base is None:
            raise SystemExit("name the tree to compare with: --baseline-tree PATH or "
                             "--baseline-rev REV")
        root = Path(tempfile.mkdtemp(prefix="gl-luabench-"))
        driver = root / "driver.lua"
        driver.write_text(DRIVER)
        variants: list[Variant] = []
        try:
            variants = [Variant("baseline", base, root, args.durable),
                        Variant("this", REPO, root, args.durable)]
            kinds = ["gpu", "cpu"] if args.cpu_jobs else ["gpu"]
            for v in variants:  # warm: keys verified and cached, the fast path knows the token
                v.round(args.lua, driver, 50, "gpu")
            results = {(v.name, k): [] for v in variants for k in kinds}
            print(f"{args.rounds} rounds x {args.calls} calls, {args.lua}, "
                  f"{'durable' if args.durable else 'fast_reserve'} daemons, "
                  f"{os.cpu_count()} CPUs; baseline {base}")
            for r in range(args.rounds):
                order = variants if r % 2 == 0 else variants[::-1]
                for kind in kinds:
                    for v in order:
                        results[(v.name, kind)].append(v.round(args.lua, driver, args.calls, kind))
                print(f"  round {r + 1}: " + "  ".join(
                    f"{n}/{k} {sum(res[-1][:2]):7.1f} µs" for (n, k), res in results.items()))
            med = {key: tuple(statistics.median(x[i] for x in res) for i in range(3))
                   for key, res in results.items()}
            print("per call, medians (CPU µs: Lua process, daemon, both; wall µs):")
            for (name, kind), (lua_us, daemon_us, wall_us) in med.items():
                print(f"  {name:<8} {kind}: Lua {lua_us:7.1f}  daemon {daemon_us:7.1f}  "
                      f"both {lua_us + daemon_us:7.1f}  wall {wall_us:7.1f}")
            for kind in kinds:
                b, t = med[("baseline", kind)], med[("this", kind)]
                print(f"  this/baseline {kind}: Lua {t[0] / b[0]:.3f}  daemon "
                      f"{t[1] / b[1]:.3f}  both {(t[0] + t[1]) / (b[0] + b[1]):.3f}  "
                      f"wall {t[2] / b[2]:.3f}" if b[1] else
                      f"  this/baseline {kind}: Lua {t[0] / b[0]:.3f}")
            for v in variants:
                up, down = v.wire(args.lua, driver)
                print(f"  {v.name:<8} one GPU call on the wire: request {up} B, reply {down} B")
        finally:
            for v in variants:
                v.close()
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
